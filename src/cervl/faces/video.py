"""Videos -> per-frame aligned face crops: decoding (OpenCV), face tracking, alignment.

Frames are numbered from 1, as in Aff-Wild2/C-EXPR-DB (``<video>/<frame:05d>.jpg``). A folder of
frame images is accepted too; its frame numbers come from the file names.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from cervl.faces.align import align_face
from cervl.faces.detect import Face, FaceDetector

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
_DIGITS = re.compile(r"(\d+)")


class VideoError(RuntimeError):
    """A video that cannot be decoded (corrupt, truncated, unsupported codec, no frames)."""


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def read_frames(path: str | Path, every: int = 1) -> Iterator[tuple[int, Image.Image]]:
    """Yield ``(frame_number, RGB image)`` for frames 1, 1+every, ... of a video file or frame folder."""
    path = Path(path)
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if path.is_dir():
        from cervl.data.base import IMAGE_SUFFIXES

        files = []
        for p in path.iterdir():
            if p.suffix.lower() in IMAGE_SUFFIXES:
                digits = _DIGITS.findall(p.stem)
                if digits:
                    files.append((int(digits[-1]), p))
        if not files:
            raise VideoError(f"{path}: no numbered frame images")
        for n, p in sorted(files):
            if (n - 1) % every == 0:
                with Image.open(p) as im:
                    yield n, im.convert("RGB")
        return
    import cv2

    if not path.is_file():
        raise VideoError(f"{path}: file not found")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoError(f"{path}: cannot open (corrupt file or unsupported codec)")
    n, produced = 0, 0
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            n += 1
            if (n - 1) % every == 0:
                produced += 1
                yield n, Image.fromarray(frame[:, :, ::-1].copy())
    finally:
        cap.release()
    if n == 0:
        raise VideoError(f"{path}: no decodable frames (empty, truncated or unsupported codec)")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class FrameFace:
    frame: int
    status: str  # tracked | lost (no face in this frame) | switched (track re-acquired elsewhere)
    crop: Image.Image | None
    box: list[float] | None
    landmarks: list[list[float]] | None


class FaceTracker:
    """Follow one person: start with the largest face, then keep the face overlapping the last box most."""

    def __init__(self, min_iou: float = 0.2):
        self.min_iou = min_iou
        self.last: np.ndarray | None = None

    def choose(self, faces: list[Face]) -> tuple[Face | None, str]:
        if not faces:
            return None, "lost"
        if self.last is None:
            chosen, status = faces[0], "tracked"
        else:
            scores = [iou(self.last, f.box) for f in faces]
            best = int(np.argmax(scores))
            if scores[best] >= self.min_iou:
                chosen, status = faces[best], "tracked"
            else:  # the person left or was missed: fall back to the nearest face centre
                centre = (self.last[:2] + self.last[2:]) / 2
                dist = [np.linalg.norm((f.box[:2] + f.box[2:]) / 2 - centre) for f in faces]
                chosen, status = faces[int(np.argmin(dist))], "switched"
        self.last = chosen.box
        return chosen, status


def video_faces(path: str | Path, detector: FaceDetector, *, every: int = 1, size: int = 112,
                redetect_every: int = 10) -> Iterator[FrameFace]:
    """Decode, detect, track and align; one result per sampled frame.

    A full detection runs every ``redetect_every`` sampled frames (and whenever the face is lost);
    in between, a detector with a ``refine`` method (MTCNN's O-Net alone) re-locates the tracked face
    around its previous box, which is an order of magnitude cheaper than a full image pyramid.
    """
    tracker = FaceTracker()
    since = redetect_every
    for n, im in read_frames(path, every):
        face, status = None, "lost"
        if since < redetect_every and tracker.last is not None and hasattr(detector, "refine"):
            face = detector.refine([im], [tracker.last])[0]
            if face is not None:
                tracker.last, status = face.box, "tracked"
                since += 1
        if face is None:
            face, status = tracker.choose(detector.detect([im])[0])
            since = 1
        if face is None:
            yield FrameFace(n, status, None, None, None)
        else:
            crop, _ = align_face(im, face.landmarks, size)
            yield FrameFace(n, status, crop, face.box.round(2).tolist(), face.landmarks.round(2).tolist())


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
