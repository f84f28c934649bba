"""``cervl explain``: maps for images or a manifest, written as PNGs, arrays and a report section.

For images, every input gets ``OUT/<id>.png`` (the face, then its explained classes' maps) and
``OUT/<id>.npz`` (``maps``, ``classes``, ``probs``). For a labelled manifest it also writes:

* ``class_means.png``: the mean map of each true class, over its images, on its mean face;
* ``confused_pairs.png``: for the three most-confused pairs (A, B) of the confusion matrix, the mean
  of map(A) - map(B) over the images of A and B: red where the model sees A rather than B;
* ``au_regions.json`` (with ``au_check``, SynthCE only): the pointing game and energy ratio per class
  against the generator's AU regions (:mod:`cervl.explain.regions`);
* ``explain.json`` (what was run and the summary) and ``where_it_looks.html`` (the report section
  that ``cervl eval --explain OUT`` embeds).
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from cervl.core.images import load_rgb
from cervl.core.fsio import atomic_write_text
from cervl.explain.figures import explanation_figure, map_grid
from cervl.explain.maps import Explainer, Explanation, select_classes

ANALYSIS_SIZE = 56  # maps kept in memory for the per-class analysis (every class of every image)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "image"


def _small(m: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(x.astype(np.float32), mode="F")
                                .resize((ANALYSIS_SIZE, ANALYSIS_SIZE), Image.BILINEAR)) for x in m])


def video_items(path: str | Path, *, detector: str = "mtcnn", detector_options: dict | None = None, every: int = 1,
                **tracking) -> list:
    """One :class:`~cervl.predict.Item` per sampled frame of a video, aligned by the tracker (as predict does)."""
    from cervl.faces.detect import make_detector
    from cervl.faces.video import video_faces, video_name
    from cervl.predict import Item

    det = make_detector(detector, **(detector_options or {}))
    name = video_name(path)
    return [Item(id=f"{name}/{f.frame:05d}", image=str(path), video=name, frame=f.frame, crop=f.crop,
                 face_status=f.status, error=None if f.crop is not None else f"no face in frame {f.frame}")
            for f in video_faces(path, det, every=every, **tracking)]


def confused_pairs(confusion: np.ndarray, n: int = 3) -> list[tuple[int, int, int]]:
    """The ``n`` class pairs (a, b), a < b, with the most mistakes between them: (a, b, count)."""
    k = len(confusion)
    pairs = [(a, b, int(confusion[a, b] + confusion[b, a])) for a in range(k) for b in range(a + 1, k)]
    return [p for p in sorted(pairs, key=lambda p: -p[2]) if p[2] > 0][:n]


def explain_items(explainer: Explainer, items: list, out: str | Path, *, classes="top2", au_check: bool = False,
                  progress: bool = True) -> dict:
    """Explain every item (see the module docstring for what is written); returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = explainer.scorer.classes
    labelled = all(it.label in names for it in items) and len(items) > 1
    # The per-class analysis needs every class's map; occlusion gives them at no extra cost.
    which = "all" if labelled else classes
    ok = [it for it in items if not it.error]
    rows, small, faces, truths, preds, true_maps = [], [], [], [], [], []
    expls = explainer.explain([it.crop if it.crop is not None else it.image for it in ok], which, progress=progress)
    for it, ex in zip(ok, expls):
        face = load_rgb(it.crop if it.crop is not None else it.image)
        shown = select_classes(ex.probs, classes, names)
        view = Explanation(ex.probs, shown, ex.maps[[ex.classes.index(k) for k in shown]], ex.method)
        stem = _safe(Path(str(it.id)).with_suffix("").as_posix())
        explanation_figure(face, view, names, out / f"{stem}.png")
        np.savez_compressed(out / f"{stem}.npz", maps=view.maps.astype(np.float16), classes=np.array(
            [names[k] for k in shown]), probs=ex.probs.astype(np.float32))
        rows.append({"id": it.id, "image": str(it.image), "label": it.label, "pred": names[int(ex.probs.argmax())],
                     "explained": [names[k] for k in shown], "png": f"{stem}.png", "npz": f"{stem}.npz"})
        if labelled:
            small.append(_small(ex.maps))
            faces.append(np.asarray(face.resize((ANALYSIS_SIZE * 2,) * 2), dtype=np.float32))
            truths.append(names.index(it.label))
            preds.append(int(ex.probs.argmax()))
            true_maps.append(ex.maps[ex.classes.index(truths[-1])].astype(np.float32))  # full size: the AU check
    summary = {"method": explainer.method, "n": len(ok), "failed": [{"id": it.id, "error": it.error}
                                                                    for it in items if it.error], "images": rows}
    if labelled and small:
        summary.update(_class_analysis(np.stack(small), np.stack(faces), np.array(truths), np.array(preds), names,
                                       out, explainer.method))
        if au_check:
            from cervl.explain.regions import score_maps

            per_class = score_maps([(names[t], m) for m, t in zip(true_maps, truths)])
            atomic_write_text(out / "au_regions.json", json.dumps(per_class, indent=2) + "\n")
            summary["au_regions"] = per_class["overall"]
    atomic_write_text(out / "explain.json", json.dumps(summary, indent=2) + "\n")
    if labelled and small:
        atomic_write_text(out / "where_it_looks.html", section_html(out, summary))
    return summary


def _class_analysis(maps: np.ndarray, faces: np.ndarray, truth: np.ndarray, pred: np.ndarray, names, out: Path,
                    method: str) -> dict:
    """Per-class mean maps and the three most-confused pairs' difference maps (PNGs + their numbers)."""
    k = len(names)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (truth, pred), 1)
    panels, means = [], {}
    for c in range(k):
        sel = truth == c
        if not sel.any():
            continue
        mean = maps[sel, c].mean(0)
        means[names[c]] = mean
        face = Image.fromarray(faces[sel].mean(0).round().astype(np.uint8))
        panels.append((f"{names[c]}\nn={int(sel.sum())}, acc {float((pred[sel] == c).mean()):.0%}", face, mean))
    map_grid(panels, out / "class_means.png", title=f"Mean map of each true class ({method})")
    np.savez_compressed(out / "class_means.npz", **{_safe(c): m.astype(np.float32) for c, m in means.items()})
    pairs, pair_panels = [], []
    for a, b, count in confused_pairs(confusion):
        sel = (truth == a) | (truth == b)
        diff = (maps[sel, a] - maps[sel, b]).mean(0)
        face = Image.fromarray(faces[sel].mean(0).round().astype(np.uint8))
        pair_panels.append((f"{names[a]} rather than\n{names[b]} ({count} mistakes)", face, diff))
        pairs.append({"a": names[a], "b": names[b], "mistakes": count, "n": int(sel.sum())})
    if pair_panels:
        map_grid(pair_panels, out / "confused_pairs.png", signed=True, cols=3,
                 title=f"Most-confused pairs: red where the model sees A rather than B ({method})")
    return {"accuracy": float((truth == pred).mean()), "confusion": confusion.tolist(), "confused_pairs": pairs}


def section_html(out: Path, summary: dict) -> str:
    """The report section "Where the model looks": the per-class means, the pair differences, AU checks."""
    parts = ["<h2>Where the model looks</h2>",
             f"<p>{html.escape(summary['method'])} maps of {summary['n']} images: colour marks the regions whose "
             "removal lowers the class's score most.</p>"]
    for name, caption in (("class_means.png", "Mean map of each true class"),
                          ("confused_pairs.png", "Most-confused pairs: where the model sees A rather than B")):
        if (out / name).is_file():
            data = base64.b64encode((out / name).read_bytes()).decode()
            parts.append(f"<h3>{caption}</h3><img alt='{name}' src='data:image/png;base64,{data}'>")
    if "au_regions" in summary:
        o = summary["au_regions"]
        parts.append(f"<p>Against SynthCE's AU regions: pointing game {o['pointing']:.1%} (n={o['n']}, chance "
                     f"{o['area']:.1%}), median energy ratio {o['energy_median']:.2f}.</p>")
    return "\n".join(parts) + "\n"


__all__ = ["confused_pairs", "explain_items", "section_html", "video_items"]
