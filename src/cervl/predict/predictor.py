"""The Predictor facade: a trained model with its prompt style and label set, and what feeds it.

``Predictor.from_run(RUN)`` restores everything from a run folder. :class:`Item` is one input (a
file, a manifest record, or an already aligned crop); :meth:`Predictor.predict` turns items into
prediction rows, in input order, with bad images as error rows instead of exceptions.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cervl.data.base import IMAGE_SUFFIXES
from cervl.core.images import load_rgb
from cervl.data.manifest import atomic_write_lines, atomic_write_text, read_manifest
from cervl.core.errors import InputNotFound, InvalidInput
from cervl.core.labels import LabelSet, get_label_set
from cervl.predict.generate import generate_answers, parse_answer
from cervl.predict.scoring import LabelScorer
from cervl.models.prompts import PromptStyle, get_prompt_style
from cervl.core.registry import suggest

log = logging.getLogger(__name__)



@dataclass
class Item:
    """One image to predict.

    ``image`` is where it came from (a path, for the output row); ``crop`` is the image to score when
    it is already in memory (an aligned face); ``error`` marks an item that failed before scoring
    (unreadable file, no face), which becomes an error row.
    """

    id: str
    image: str | Path
    label: str | None = None
    video: str | None = None
    frame: int | None = None
    crop: Image.Image | None = None
    face_status: str | None = None
    face_box: list[float] | None = None
    error: str | None = None

    def row(self) -> dict:
        """The identifying part of this item's prediction row."""
        row = {"id": self.id, "image": str(self.image), "label": self.label}
        if self.video is not None:
            row["video"] = self.video
        if self.frame is not None:
            row["frame"] = self.frame
        if self.face_status is not None:
            row["face"] = self.face_status
        if self.face_box is not None:
            row["face_box"] = self.face_box  # x0, y0, x1, y1 in the photo's pixels, as the server returns it
        return row


def items_from_manifest(path: str | Path, splits: list[str] | None = None) -> list[Item]:
    """One item per record of a manifest (all splits, or those in ``splits``)."""
    m = read_manifest(path)
    present = sorted({r.split for r in m})
    unknown = [s for s in splits or () if s not in present]
    if unknown:
        raise InvalidInput(f"{path}: no records in split {unknown[0]!r} (the manifest has {present})"
                           f"{suggest(unknown[0], present)}")
    return [Item(id=r.sample_id, image=m.image_path(r), label=r.label, video=r.video, frame=r.frame)
            for r in m if not splits or r.split in splits]


def items_from_paths(paths: list[Path]) -> list[Item]:
    """One item per image file, or per image below a folder (ids relative to that folder)."""
    items = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            items += [Item(id=str(f.relative_to(path)), image=f) for f in files]
        elif path.exists():
            items.append(Item(id=path.name, image=path))
        else:
            raise InputNotFound(f"input not found: {path}")
    return items


def align_items(items: list[Item], *, detector: str = "mtcnn", detector_options: dict | None = None,
                workers: int = 1) -> list[Item]:
    """Detect and align the largest face of every item's photo (``crop``); failures set ``error``."""
    from cervl.faces.pipeline import align_files

    aligned = align_files([item.image for item in items], detector=detector, detector_options=detector_options,
                          workers=workers)
    for i, res in tqdm(aligned, total=len(items), desc="align", unit="img"):
        apply_alignment(items[i], res)
    return items


def apply_alignment(item: Item, res) -> Item:
    """Put one alignment result (a list of :class:`~cervl.faces.pipeline.AlignResult`, or an error text)
    on ``item``: its largest face's crop and status, or ``error``."""
    if isinstance(res, str):
        item.error = res
        return item
    item.face_status, item.face_box = res[0].status, res[0].box
    item.crop = res[0].crop
    if item.crop is None:
        item.error = f"no face found ({item.face_status})"
    return item


def write_predictions(path: str | Path, rows: Iterable[dict], meta: dict) -> None:
    """Atomically write prediction rows as JSON Lines, plus ``PATH.meta.json`` (strict JSON: no NaN).

    ``rows`` may be a generator: they are written one by one, never joined in memory.
    """
    path = Path(path)
    if path.is_dir():
        raise InvalidInput(f"-o {path} is a folder; give a file name such as {path / 'predictions.jsonl'}")
    atomic_write_lines(path, (json.dumps(r, allow_nan=False) + "\n" for r in rows))
    atomic_write_text(Path(str(path) + ".meta.json"), json.dumps(meta, indent=2, allow_nan=False) + "\n")


def prediction_meta(run, label_set: LabelSet, style: PromptStyle, *, mode: str, normalize: str,
                    manifest=None) -> dict:
    """``PREDICTIONS.meta.json``: what ``cervl eval`` needs to read a predictions file (both engines)."""
    return {"run": str(run), "mode": mode, "normalize": normalize, "label_set": label_set.name,
            "prompt": style.name, "manifest": str(manifest) if manifest else None}


class Predictor:
    """A trained model plus the prompt style and label set it was trained with.

    ``Predictor.from_run(run_dir)`` restores everything from the run directory; ``Predictor(model,
    processor, style, label_set)`` wraps an already loaded model.
    """

    def __init__(self, model, processor, style: PromptStyle | str, label_set: LabelSet | str):
        self.model, self.processor = model, processor
        self.style = get_prompt_style(style) if isinstance(style, str) else style
        self.label_set = get_label_set(label_set) if isinstance(label_set, str) else label_set
        self._scorer = None

    @classmethod
    def from_run(cls, run_dir, *, dtype: str | None = None, device: str | None = None) -> "Predictor":
        """The final model of a run folder (``dtype``: bf16 on a GPU, fp32 on the CPU by default)."""
        from cervl.run import load_run

        model, processor, meta = load_run(run_dir, dtype=dtype)
        if device:
            model.to(device)
        return cls(model, processor, meta.style, meta.labels)

    @classmethod
    def from_model(cls, name_or_path: str, *, prompt: str, label_set: str, dtype: str | None = None) -> "Predictor":
        """A base model with no run folder (zero-shot): a hub id, a local folder, or ``pretrained-tiny`` (the
        package's tiny base), scored with ``prompt`` over ``label_set`` by the same exact scorer. Errors name
        the model when it cannot be loaded (offline, a typo, gated)."""
        from cervl.models.loading import TINY_BASE, load_model

        style, labels = get_prompt_style(prompt), get_label_set(label_set)  # bad names fail before the model loads
        model, processor = load_model(TINY_BASE if name_or_path == "pretrained-tiny" else name_or_path, dtype=dtype)
        return cls(model, processor, style, labels)

    @classmethod
    def from_adapter(cls, base: str, adapter: str, *, prompt: str, label_set: str,
                     dtype: str | None = None) -> "Predictor":
        """A base model (hub id or folder) plus a peft adapter folder written by cervl, merged for inference.

        Non-LoRA weights the stage trained (``extra_trainables.safetensors``) are applied too.
        """
        from cervl.models.loading import load_model
        from cervl.run import StageRecord, apply_stage

        model, processor = load_model(base, dtype=dtype)
        model = apply_stage(model, StageRecord(stage="adapter", kind="lora", adapter=str(Path(adapter).resolve())))
        return cls(model, processor, prompt, label_set)

    def score(self, images: list, *, batch_size: int = 8, normalize: str = "sum") -> np.ndarray:
        """Class probabilities (N, K) in label-set order, by exact constrained scoring.

        ``images``: PIL images, arrays or paths. ``None`` (what an aligner gives when it finds no face)
        is refused with its position, since there is nothing to score.
        """
        missing = [i for i, im in enumerate(images) if im is None]
        if missing:
            raise InvalidInput(f"image {missing[0]} of {len(images)} is None: no face was found there (check the "
                               f"aligner's .status, or .crop is not None, before scoring)")
        if self._scorer is None or self._scorer.normalize != normalize:
            if self.style.answers_with == "aus+label":  # AUs first, then the label: see cervl.predict.aucaption
                from cervl.predict.aucaption import AuCaptionScorer

                self._scorer = AuCaptionScorer(self.model, self.processor, self.style, self.label_set,
                                               normalize=normalize)
            else:
                self._scorer = LabelScorer(self.model, self.processor, self.style, self.label_set,
                                           normalize=normalize)
        return self._scorer(images, batch_size=batch_size)

    def generate(self, images: list, *, max_new_tokens: int = 24) -> list[tuple[str, str | None]]:
        """Greedy answers and the class each names (None when it names none or several)."""
        texts = generate_answers(self.model, self.processor, self.style, self.label_set, images,
                                 max_new_tokens=max_new_tokens)
        return [(t, parse_answer(t, self.label_set.name)) for t in texts]

    def predict(self, items: list[Item], *, mode: str = "score", batch_size: int = 8, normalize: str = "sum",
                progress: bool = True):
        """Yield one prediction row per item, in input order; bad images become error rows."""
        if mode not in ("score", "generate"):
            raise InvalidInput(f"mode must be 'score' or 'generate', got {mode!r}")
        bar = tqdm(total=len(items), desc=f"predict ({mode})", unit="img", disable=not progress)
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            rows: list[dict | None] = [None] * len(batch)
            ok, images = [], []
            for i, item in enumerate(batch):
                try:
                    if item.error:
                        raise InvalidInput(item.error)
                    images.append(load_rgb(item.crop if item.crop is not None else item.image))
                    ok.append(i)
                except InvalidInput as e:  # corrupt/missing file, no face: report it, keep going
                    log.error("%s: %s", item.image, e)
                    rows[i] = {**item.row(), "pred": None, "error": str(e)}
            if ok:
                self._predict_batch([batch[i] for i in ok], images, mode, normalize, rows, ok)
            yield from rows  # input order, errors included
            bar.update(len(batch))
        bar.close()

    def _predict_batch(self, items: list[Item], images: list, mode: str, normalize: str, rows: list,
                       slots: list[int]) -> None:
        t0 = time.perf_counter()
        if mode == "score":
            probs = self.score(images, batch_size=len(images), normalize=normalize)
            latency = round((time.perf_counter() - t0) / len(items) * 1000, 2)
            captions = getattr(self._scorer, "captions", None)  # the au-caption mode names AUs too
            for i, (slot, item, p) in enumerate(zip(slots, items, probs)):
                if not np.all(np.isfinite(p)):  # never write NaN: it is not JSON, and not a prediction
                    rows[slot] = {**item.row(), "pred": None, "error": "the model produced non-finite scores"}
                    continue
                rows[slot] = {**item.row(), "pred": self.label_set.classes[int(p.argmax())],
                              "probs": {c: round(float(v), 6) for c, v in zip(self.label_set.classes, p)},
                              "latency_ms": latency}
                if captions is not None:
                    from cervl.predict.aucaption import caption_fields

                    rows[slot].update(caption_fields(captions[i]))
        else:
            answers = self.generate(images)
            latency = round((time.perf_counter() - t0) / len(items) * 1000, 2)
            for slot, item, (raw, parsed) in zip(slots, items, answers):
                rows[slot] = {**item.row(), "pred": parsed, "raw": raw, "latency_ms": latency}


__all__ = ["Item", "Predictor", "align_items", "apply_alignment", "items_from_manifest", "items_from_paths",
           "prediction_meta", "write_predictions"]
