"""The ABAW compound-expression challenge: predictions for C-EXPR-DB test videos -> the official file.

The challenge scores 7 classes (the ``cexprdb`` label set). A run may predict a superset (such as
``rafdb-compound``): its probabilities are narrowed to the 7 classes before the arg-max. With
``every > 1`` only every Nth frame is scored; every frame then takes the nearest scored frame's label.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cervl.core.fsio import atomic_write_text
from cervl.core.errors import InvalidInput
from cervl.faces.video import frame_numbers, list_videos
from cervl.core.labels import LabelSet, get_label_set
from cervl.predict.predictor import Predictor
from cervl.predict.video import predict_videos

log = logging.getLogger(__name__)

CHALLENGE = get_label_set("cexprdb")


@dataclass
class Submission:
    path: Path
    rows: int
    videos: int
    failed: list[str] = field(default_factory=list)


def challenge_indices(label_set: LabelSet) -> list[int]:
    """Positions of the 7 challenge classes in a run's label set (error if the run lacks one)."""
    missing = [c for c in CHALLENGE.classes if c not in label_set]
    if missing:
        raise InvalidInput(f"the run predicts {label_set.name}, which lacks the challenge classes {missing}")
    return [label_set.index_of[c] for c in CHALLENGE.classes]


def narrow(rows: list[dict], label_set: LabelSet) -> list[dict]:
    """Per-frame rows -> ``{video, frame, pred}`` with ``pred`` among the 7 challenge classes."""
    keep = challenge_indices(label_set)
    out = []
    for r in rows:
        p = np.array([r["probs_smoothed"][label_set.classes[k]] for k in keep])
        out.append({"video": r["video"], "frame": r["frame"], "pred": CHALLENGE.classes[int(p.argmax())]})
    return out


def fill_every_frame(scored: list[dict], video) -> list[dict]:
    """Give every decoded frame of ``video`` the row of the nearest scored frame."""
    by_frame = {r["frame"]: r for r in scored}
    keys = sorted(by_frame)
    out = []
    for n in frame_numbers(video):
        i = bisect.bisect_left(keys, n)
        near = min((k for k in keys[max(0, i - 1): i + 1]), key=lambda k: abs(k - n))
        out.append({**by_frame[near], "frame": n})
    return out


def abaw_submission(predictor: Predictor, root: Path, out: Path, *, every: int = 1, smoothing: str = "gaussian",
                    **video_options) -> Submission:
    """Predict every frame of every video in ``root`` and write the official submission to ``out``.

    ``video_options`` go to :func:`cervl.predict.video.predict_videos` (detector, workers, tracking).
    A video that fails, or shows no face in any frame, is reported in ``failed`` and left out.
    """
    challenge_indices(predictor.label_set)  # fail before any video is decoded
    inputs = list_videos(root)
    results = predict_videos(predictor, inputs, every=every, smoothing=smoothing, **video_options)
    return write_submission(results, inputs, predictor.label_set, out, every=every)


def write_submission(results, inputs: list[Path], label_set: LabelSet, out: Path, *, every: int = 1) -> Submission:
    """The submission from per-video results ``(index in inputs, rows | error text)``, in any order.

    Shared by the one-machine path and ``--engine ray``, so both write the same bytes.
    """
    per_video: dict[int, list[dict]] = {}
    failed: list[str] = []
    for i, result in results:
        video = inputs[i]
        if isinstance(result, str):
            log.error("%s", result)
            failed.append(str(video))
        elif all(r.get("probs_smoothed") is None for r in result):
            failed.append(f"{video} (no face in any frame)")
        else:
            per_video[i] = narrow(fill_every_frame(result, video) if every > 1 else result, label_set)
    rows = [r for i in sorted(per_video) for r in per_video[i]]
    write_abaw_submission(rows, out)
    return Submission(Path(out), len(rows), len(per_video), sorted(failed))


ABAW_HEADER = ("image_location,Fearfully_Surprised,Happily_Surprised,Sadly_Surprised,Disgustedly_Surprised,"
               "Angrily_Surprised,Sadly_Fearful,Sadly_Angry")


def write_abaw_submission(rows: list[dict], path: str | Path) -> Path:
    """The official ABAW compound-expression submission file.

    ``rows`` carry ``video``, ``frame`` (1-based) and ``pred`` (a C-EXPR-DB class name). Lines are
    ``<video>/<frame:05d>.jpg,<index 0-6>`` sorted by video and frame, after the official header.
    """
    ls = CHALLENGE
    lines = [ABAW_HEADER]
    for r in sorted(rows, key=lambda r: (str(r["video"]), int(r["frame"]))):
        if r.get("pred") not in ls:
            raise InvalidInput(f"frame {r.get('video')}/{r.get('frame')}: prediction {r.get('pred')!r} is not a "
                             f"C-EXPR-DB class; the submission needs one of {list(ls.classes)}")
        if int(r["frame"]) < 1:
            raise InvalidInput(f"frame numbers are 1-based; got {r['frame']} for video {r['video']}")
        lines.append(f"{r['video']}/{int(r['frame']):05d}.jpg,{ls.index_of[r['pred']]}")
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
    return Path(path)
