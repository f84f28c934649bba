"""Evaluation of a model on a labelled manifest split: quick metrics during training, and the test report.

:func:`evaluate` gives accuracy, macro-F1 and the confusion matrix (stage validation);
:func:`test_report` scores the held-out split, writes ``test_predictions.jsonl`` and the report
folder (metrics.json, report.md/html, plots).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cervl.data.mixture import Sample, load_samples
from cervl.core.errors import UserError
from cervl.core.labels import LabelSet
from cervl.evaluate.metrics import accuracy, confusion_matrix, macro_f1
from cervl.predict.predictor import Item, Predictor, write_predictions
from cervl.models.prompts import PromptStyle
from cervl.evaluate.report import evaluate_predictions


def subsample(samples: list[Sample], max_samples: int) -> list[Sample]:
    """At most ``max_samples`` samples, the same ones every time (seed 0), in manifest order."""
    if not max_samples or len(samples) <= max_samples:
        return samples
    idx = np.random.default_rng(0).choice(len(samples), max_samples, replace=False)
    return [samples[i] for i in sorted(idx)]


def score_samples(predictor: Predictor, samples: list[Sample], *, progress: bool = False, align: str = "none",
                  detector_options: dict | None = None) -> list[dict]:
    """Prediction rows for manifest samples: the one scoring path of stage validation and the test report.

    ``align``: ``none`` (images as they are), ``detector`` (MTCNN + 5-point alignment, as ``predict --align``;
    a face not found is an error row, which counts as wrong) or ``landmarks`` (aligned with the records' own
    landmarks: the ceiling of any detector).
    """
    items = [Item(id=s.record.sample_id, image=s.path, label=s.record.label, video=s.record.video,
                  frame=s.record.frame) for s in samples]
    if align == "detector":
        from cervl.predict.predictor import align_items

        align_items(items, detector_options=detector_options)
    elif align == "landmarks":
        from cervl.core.images import load_rgb
        from cervl.faces.align import align_face

        for item, s in zip(items, samples):
            image = load_rgb(s.path)
            try:  # in the pixels of the image opened (cervl align's records store the photo's)
                landmarks = s.record.landmarks_for_image(image.size)
            except UserError as e:
                landmarks, item.error = None, str(e)
            if landmarks is None:
                item.error = item.error or "no landmarks in the manifest record"
            else:
                item.crop = align_face(image, landmarks, 112)[0]
    return list(predictor.predict(items, mode="score", progress=progress))


def evaluate(model, processor, style: PromptStyle, label_set: LabelSet, manifest: str, splits: list[str], *,
             max_samples: int = 0, progress: bool = False) -> dict:
    """Accuracy and macro-F1 of constrained scoring on a labelled manifest split (stage validation).

    It scores through :func:`score_samples`, as :func:`test_report` does, so a stage's validation and the
    test report of the same split give the same numbers.
    """
    samples = subsample(load_samples(manifest, splits, label_set), max_samples)
    was_training = model.training
    rows = score_samples(Predictor(model, processor, style, label_set), samples, progress=progress)
    model.train(was_training)
    y_true = np.array([label_set.index_of[s.record.label] for s in samples])
    y_pred = np.array([label_set.index_of[r["pred"]] if r.get("pred") in label_set else -1 for r in rows])
    return {"manifest": str(manifest), "splits": splits, "n": len(samples), "label_set": label_set.name,
            "accuracy": accuracy(y_true, y_pred), "macro_f1": macro_f1(y_true, y_pred, len(label_set)),
            "confusion": confusion_matrix(y_true, y_pred, len(label_set)).tolist()}


def test_report(predictor: Predictor, manifest: str, splits: list[str], out_dir: Path, *, max_samples: int = 0,
                title: str = "", progress: bool = True, align: str = "none", detector_options: dict | None = None
                ) -> dict:
    """Score a test split, write ``test_predictions.jsonl`` (+ meta) and the report folder; return the metrics.

    ``align``/``detector_options``: how test images become crops (see :func:`score_samples`).
    """
    label_set = predictor.label_set
    samples = subsample(load_samples(manifest, splits, label_set), max_samples)
    rows = score_samples(predictor, samples, progress=progress, align=align, detector_options=detector_options)
    out_dir = Path(out_dir)
    pred_path = out_dir / "test_predictions.jsonl"
    write_predictions(pred_path, rows, {"mode": "score", "normalize": "sum", "label_set": label_set.name,
                                        "prompt": predictor.style.name, "manifest": str(manifest), "splits": splits})
    metrics = evaluate_predictions(pred_path, out_dir / "report",
                                   title=title or f"{Path(manifest).name} {'+'.join(splits)}")
    return {"label_set": label_set.name, "classes": list(label_set.classes), "predictions": str(pred_path),
            "align": align, **metrics}


__all__ = ["evaluate", "score_samples", "subsample", "test_report"]
