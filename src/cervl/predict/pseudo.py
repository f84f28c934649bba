"""Pseudo-labelled compound frames: ``cervl pseudo-label``.

Aff-Wild2 carries basic labels only and C-EXPR-DB none, but a trained compound run can label their frames. A
frame is kept as compound class C (the run's top class) when all of these hold:

* C's two components include the frame's annotated basic emotion, where it has one (a frame annotated
  "Happiness" may become "Happily Surprised", never "Sadly Angry");
* p(C) is at least ``threshold``;
* C is the top class of the ``window`` scored records before and after it in its track (a class that flickers
  for one frame is not a label). A track is one face of one video: the records of the same ``video`` and face
  (``subject``, or the ``#faceK`` that ``cervl align --faces all`` adds to the id), ordered by frame number, so
  frames prepared ``--every 3`` have neighbours and two faces in one frame are judged apart. Images outside any
  video skip this check.

The run must be a compound run (every class of its label set compound); a basic run is refused. Each output
record is its input record relabelled: it keeps its split (a val or test frame stays evaluation data), its
image, ``source``, landmarks (and their frame), ``bbox`` and ``aus``, and carries the kept class's probability
and where it came from (``provenance``).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

from cervl.data.manifest import Record
from cervl.core.errors import InvalidInput
from cervl.core.labels import LabelSet, components, is_compound

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class Frame:
    """One scored input: its record (label: the annotated basic emotion, or None) and the run's probabilities."""

    record: Record
    image: str  # absolute path
    probs: dict[str, float]

    @property
    def top(self) -> tuple[str, float]:
        c = max(self.probs, key=self.probs.get)
        return c, self.probs[c]


def track(record: Record) -> tuple:
    """The face a video record shows: its video, ``subject`` and face number (``#faceK`` of the id, 0 without)."""
    face = re.search(r"#face(\d+)$", record.id or "")
    return record.video, record.subject, int(face.group(1)) if face else 0


def stable(frames: list[Frame], window: int) -> list[bool]:
    """For each frame, whether its top class is the top class of the ``window`` scored records before and after
    it in its :func:`track`, ordered by frame number (records, not frame numbers: with frames taken every 3rd
    the neighbours are 3 frames apart); True outside videos or with ``window`` 0."""
    tracks: dict[tuple, list[int]] = defaultdict(list)
    for i, f in enumerate(frames):
        if f.record.video is not None and f.record.frame is not None:
            tracks[track(f.record)].append(i)
    out = [True] * len(frames)
    if window <= 0:
        return out
    for members in tracks.values():
        members.sort(key=lambda i: (frames[i].record.frame, i))
        tops = [frames[i].top[0] for i in members]
        for k, i in enumerate(members):
            out[i] = all(t == tops[k] for t in tops[max(0, k - window):k + window + 1])
    return out


def keep(frame: Frame, threshold: float, is_stable: bool) -> str | None:
    """The compound class ``frame`` is kept as, or None (see the module docstring)."""
    c, p = frame.top
    basic = frame.record.label
    if basic is not None and not is_compound(basic) and basic not in components(c):
        return None
    return c if p >= threshold and is_stable else None


def select(frames: list[Frame], label_set: LabelSet, *, threshold: float, window: int, run: str) -> list[Record]:
    """The kept frames as compound records (``dataset: pseudo``): each is its input record with the compound
    label, its split and every other field kept (image made absolute, the landmarks' frame stated)."""
    out = []
    for f, ok in zip(frames, stable(frames, window)):
        c = keep(f, threshold, ok)
        if c is None:
            continue
        r = f.record
        points = r.landmarks is not None or r.bbox is not None
        out.append(replace(r, image=f.image, root=None, label=c, label_set=label_set.name, dataset="pseudo",
                           id=f"pseudo/{r.sample_id}", landmarks_frame=r.frame_of_landmarks if points else None,
                           provenance={"mode": "pseudo-label", "from": f.image, "p": round(f.probs[c], 6),
                                       "annotated": r.label, "run": run, "threshold": threshold, "window": window}))
    return out


def compound_labels(run) -> LabelSet:
    """The label set of ``run`` (read from its description, before any model loads), refused unless compound."""
    labels = _run_label_set(run)
    basic = [c for c in labels.classes if not is_compound(c)]
    if basic:
        raise InvalidInput(f"{run}: pseudo-label needs a compound run, and this run's label set {labels.name!r} "
                           f"has non-compound classes ({', '.join(basic[:4])}{', ...' if len(basic) > 4 else ''})")
    return labels


def coverage(frames: list[Frame], *, window: int, thresholds=THRESHOLDS, truth: dict[str, str] | None = None) -> list[dict]:
    """Per threshold: how many frames are kept (coverage) and, where the true compound labels are known
    (``truth``: image -> class, e.g. SynthCE's, for measuring), how many of those are right (precision)."""
    ok = stable(frames, window)
    rows = []
    for t in thresholds:
        kept = [(f, c) for f, s in zip(frames, ok) if (c := keep(f, t, s)) is not None]
        row = {"threshold": t, "kept": len(kept), "coverage": len(kept) / max(1, len(frames)),
               "per_class": dict(Counter(c for _, c in kept))}
        if truth is not None:
            right = sum(truth.get(f.image) == c for f, c in kept)
            row["precision"] = right / len(kept) if kept else None
        rows.append(row)
    return rows


def pseudo_label(run, manifest, out, *, splits: list[str] | None = None, threshold: float = 0.7, window: int = 2,
                 batch_size: int = 8, rows=None, truth_from=None) -> dict:
    """Score ``manifest``'s records with the compound run ``run`` (or take ``rows``, e.g. from the Ray engine, in
    the records' order), keep the frames that pass (see the module docstring) and write them to ``out``.

    ``truth_from``: a manifest of the same images with their true compound labels, to measure precision
    (SynthCE). Returns a summary with the per-class counts and the coverage table.
    """
    import json
    from pathlib import Path

    from cervl.data.manifest import atomic_write_text, read_manifest, write_manifest
    from cervl.predict.predictor import Item, Predictor

    if not 0 < threshold <= 1 or window < 0:
        raise InvalidInput(f"--threshold must be in (0, 1] and --window >= 0 (got {threshold}, {window})")
    label_set = compound_labels(run)
    m = read_manifest(manifest)
    records = [r for r in m if not splits or r.split in splits]
    if not records:
        raise InvalidInput(f"{manifest}: no records in split(s) {splits}")
    if rows is None:
        predictor = Predictor.from_run(run)
        items = [Item(id=r.sample_id, image=m.image_path(r), label=None, video=r.video, frame=r.frame) for r in records]
        rows = list(predictor.predict(items, batch_size=batch_size))
    frames = [Frame(r, str(m.image_path(r)), row["probs"]) for r, row in zip(records, rows) if row.get("probs")]
    kept = select(frames, label_set, threshold=threshold, window=window, run=str(run))
    write_manifest(out, kept)
    truth = None
    if truth_from is not None:
        t = read_manifest(truth_from)
        truth = {str(t.image_path(r)): r.label for r in t}
    table = coverage(frames, window=window, truth=truth)
    # every record keeps its split: say which, so no one trains on val/test frames by surprise
    summary = {"run": str(run), "manifest": str(manifest), "splits": sorted({r.split for r in records}),
               "threshold": threshold, "window": window, "scored": len(frames), "unscored": len(records) - len(frames),
               "kept": len(kept), "per_split": dict(sorted(Counter(r.split for r in kept).items())),
               "per_class": dict(Counter(r.label for r in kept)), "coverage": table}
    atomic_write_text(Path(str(out) + ".summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary


def _run_label_set(run) -> LabelSet:
    from cervl.run import RunMeta

    return RunMeta.read(run).labels


__all__ = ["Frame", "THRESHOLDS", "compound_labels", "coverage", "keep", "pseudo_label", "select", "stable", "track"]
