"""Per-frame prediction for videos: track, align and score every sampled frame, then smooth over time.

Crops are scored in batches as they arrive from the face tracker, so memory does not grow with a
video's length; frames without a face borrow the nearest scored frame's probabilities before the
temporal smoothing, and keep ``status: lost``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cervl.faces.video import many_video_faces, video_faces, video_name
from cervl.predict.predictor import Predictor


class VideoScorer:
    """Scores one video's :class:`~cervl.faces.video.FrameFace` stream in batches as frames arrive
    (memory does not grow with the video's length), then smooths the per-frame probabilities."""

    def __init__(self, predictor: Predictor, video: str, batch_size: int = 16):
        self.predictor, self.video, self.batch_size = predictor, video, batch_size
        self.frames, self.raw, self.pending = [], [], []

    def add(self, f) -> None:
        self.raw.append(np.full(len(self.predictor.label_set), np.nan))
        if f.crop is not None:
            self.pending.append((len(self.frames), f.crop))
            if len(self.pending) >= self.batch_size:
                self._flush()
        self.frames.append(dataclasses.replace(f, crop=None))  # keep only the metadata of scored frames

    def _flush(self) -> None:
        probs = self.predictor.score([crop for _, crop in self.pending], batch_size=self.batch_size)
        for (i, _), p in zip(self.pending, probs):
            self.raw[i] = p
        self.pending.clear()

    def rows(self, smoothing: str = "gaussian", window: int = 5, sigma: float = 1.5) -> list[dict]:
        if self.pending:
            self._flush()
        return video_rows(self.video, self.frames, self.raw, self.predictor.label_set.classes, smoothing,
                          window, sigma)


def video_rows(video: str, frames: list, raw: list, classes: tuple[str, ...], smoothing: str = "gaussian",
               window: int = 5, sigma: float = 1.5) -> list[dict]:
    """One video's prediction rows from its frames (:class:`~cervl.faces.video.FrameFace` metadata) and
    their raw probabilities (NaN rows for frames without a face): gap filling, smoothing, arg-max.

    Shared by the one-machine path (:class:`VideoScorer`) and the Ray engine, so both give the same rows.
    """
    if not frames:
        raise ValueError(f"{video}: no frames decoded")
    raw = np.stack(raw)
    have = [i for i in range(len(frames)) if not np.isnan(raw[i, 0])]
    # Fill frames without a face from the nearest frame with one, then smooth over time.
    filled = raw.copy()
    if have:
        idx = np.array(have)
        for i in range(len(frames)):
            if np.isnan(filled[i, 0]):
                filled[i] = raw[idx[np.argmin(np.abs(idx - i))]]
        smoothed = smooth(filled, smoothing, window=window, sigma=sigma)
    rows = []
    for i, f in enumerate(frames):
        row = {"video": video, "frame": f.frame, "id": f"{video}/{f.frame:05d}", "status": f.status,
               "box": f.box,
               "probs": None if np.isnan(raw[i, 0]) else {c: round(float(v), 6) for c, v in zip(classes, raw[i])}}
        if have:
            row["probs_smoothed"] = {c: round(float(v), 6) for c, v in zip(classes, smoothed[i])}
            row["pred"] = classes[int(smoothed[i].argmax())]
        else:
            row["pred"] = None
        rows.append(row)
    return rows


def predict_video(predictor: Predictor, path, detector, *, every: int = 1, smoothing: str = "gaussian",
                  window: int = 5, sigma: float = 1.5, batch_size: int = 16, size: int = 112,
                  redetect_every: int = 120, verify_every: int = 10, name: str | None = None,
                  on_frame=None, progress: bool = True) -> list[dict]:
    """Per-frame predictions for one video (file or frame folder): detect, track, align, score, smooth.

    Crops are scored in batches as they come, so memory does not grow with the video's length.
    ``redetect_every`` and ``verify_every`` set the tracking (see :func:`cervl.faces.video.track_faces`).
    ``name`` is the video's id in the rows (default: the file's stem); ``on_frame(frame_face)`` is called for
    every decoded frame before it is scored (it may raise to stop the video).
    Frames without a face keep ``status: lost`` and no probabilities of their own; the smoothed
    output carries the neighbours' probabilities over them (so every sampled frame gets a label),
    and ``pred`` of a lost frame is None when no face was seen anywhere in the video.
    """
    scorer = VideoScorer(predictor, name or video_name(path), batch_size)
    stream = video_faces(path, detector, every=every, size=size, redetect_every=redetect_every,
                         verify_every=verify_every)
    for f in tqdm(stream, desc=scorer.video, unit="frame", leave=False, disable=not progress):
        if on_frame is not None:
            on_frame(f)  # the server's jobs: progress, and the length limit while decoding
        scorer.add(f)
    return scorer.rows(smoothing, window, sigma)


def predict_videos(predictor: Predictor, paths: list, *, detector: str = "mtcnn",
                   detector_options: dict | None = None, workers: int = 1, every: int = 1,
                   smoothing: str = "gaussian", window: int = 5, sigma: float = 1.5, batch_size: int = 16,
                   size: int = 112, redetect_every: int = 120, verify_every: int = 10
                   ) -> Iterator[tuple[int, list[dict] | str]]:
    """:func:`predict_video` over many videos; yields ``(index in paths, rows)`` as each video ends,
    or ``(index, error text)`` for a video that cannot be decoded (the others go on).

    With ``workers > 1``, decoding, face tracking and alignment run in that many processes (one core
    and one video each, see :func:`cervl.faces.video.many_video_faces`) while this process scores
    the crops as they arrive, so the model is never waiting on one video's preprocessing.
    """
    scorers: dict[int, VideoScorer] = {}
    bar = tqdm(total=len(paths), unit="video", desc=f"videos ({workers} worker{'s' if workers > 1 else ''})")
    frames = 0
    events = many_video_faces(paths, detector=detector, detector_options=detector_options, workers=workers,
                              every=every, size=size, redetect_every=redetect_every, verify_every=verify_every)
    try:
        for kind, i, payload in events:
            if kind == "frames":
                scorer = scorers.setdefault(i, VideoScorer(predictor, video_name(paths[i]), batch_size))
                for f in payload:
                    scorer.add(f)
                frames += len(payload)
                bar.set_postfix(frames=frames)
                continue
            bar.update(1)
            scorer = scorers.pop(i, None)
            if kind == "error":
                yield i, payload
            elif scorer is None:
                yield i, f"{paths[i]}: no frames decoded"
            else:
                yield i, scorer.rows(smoothing, window, sigma)
    finally:
        bar.close()


def plot_video_probs(rows: list[dict], classes: tuple[str, ...], path) -> Path:
    """Smoothed class probabilities over time (one line per class), frames without a face shaded."""
    import matplotlib.pyplot as plt

    from cervl.core.plotting import class_style, legend_outside

    frames = [r["frame"] for r in rows]
    fig, ax = plt.subplots(figsize=(12, 4.0))
    if rows and "probs_smoothed" in rows[0]:
        share = {c: np.mean([r["pred"] == c for r in rows]) for c in classes}
        for i, c in enumerate(classes):  # the dominant class drawn thicker
            ax.plot(frames, [r["probs_smoothed"][c] for r in rows], label=f"{c} ({share[c]:.0%} of frames)",
                    lw=2.2 if share[c] == max(share.values()) else 1.3, **class_style(i))
    for r in rows:
        if r["status"] == "lost":
            ax.axvspan(r["frame"] - 0.5, r["frame"] + 0.5, color="0.85", lw=0)
    ax.set_xlabel("frame")
    ax.set_ylabel("probability (smoothed)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{rows[0]['video'] if rows else ''}: expression over time ({len(rows)} frames; grey: no face; "
                 f"legend: share of frames where the class is top)", fontsize=10)
    legend_outside(ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def smooth(probs: np.ndarray, method: str = "gaussian", window: int = 5, sigma: float = 1.5) -> np.ndarray:
    """Temporal smoothing of per-frame class probabilities (T, K): ``none``, ``moving`` or ``gaussian``.

    Edges use the available neighbours (renormalised weights), so the output stays a distribution.
    """
    probs = np.asarray(probs, dtype=float)
    if method == "none" or len(probs) < 2:
        return probs.copy()
    if method == "moving":
        half = window // 2
        weights = np.ones(2 * half + 1)
    elif method == "gaussian":
        half = max(1, int(round(3 * sigma)))
        weights = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    else:
        raise ValueError(f"smoothing must be none, moving or gaussian, got {method!r}")
    out = np.zeros_like(probs)
    t = len(probs)
    for i in range(t):
        lo, hi = max(0, i - half), min(t, i + half + 1)
        w = weights[lo - i + half: hi - i + half]
        out[i] = (w[:, None] * probs[lo:hi]).sum(0) / w.sum()
    return out
