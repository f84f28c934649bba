"""A detector's landmark error, measured on faces whose true landmarks are known, and flip averaging.

The aligned-versus-original gap on SynthCE is landmark error (issue 22): originals aligned with their
true landmarks score like the aligned crops, with MTCNN's they lose about 30 points. This module

* measures that error once (:func:`measure_landmark_error`, ``cervl landmark-error``): per face, the five
  offsets detector - truth in units of the inter-ocular distance (iod), in the face's own frame (eye line
  horizontal), plus the faces missed. The offsets are the distribution that alignment-noise augmentation
  (:mod:`cervl.train.augment`) draws from;
* reduces it (:class:`~cervl.faces.detect.FlipAveraged`): the detector also runs on the mirrored image, and each face's
  landmarks are averaged with its mirrored twin's (left and right swapped back). Errors that do not
  mirror with the face, as a detector's biases and noise mostly do not, partly cancel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cervl.faces.detect import Face, FlipAveraged  # noqa: F401  (FlipAveraged: re-exported)

def face_frame(landmarks: np.ndarray) -> tuple[float, np.ndarray]:
    """(inter-ocular distance, 2x2 rotation that turns the eye line horizontal) of 5 landmarks."""
    d = landmarks[1] - landmarks[0]
    iod = float(np.hypot(*d))
    c, s = d / max(iod, 1e-9)
    return iod, np.array([[c, s], [-s, c]])


def offsets(detected: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(5, 2) detector - truth, in iod units, in the true face's frame."""
    iod, rot = face_frame(truth)
    return (detected - truth) @ rot.T / iod


def nme(detected: np.ndarray, truth: np.ndarray) -> float:
    """Mean point-to-point error over the 5 landmarks, over the inter-ocular distance."""
    return float(np.linalg.norm(detected - truth, axis=1).mean() / face_frame(truth)[0])


def nearest_face(faces: list[Face], truth: np.ndarray) -> Face | None:
    """The face whose landmarks are nearest ``truth``, if within one inter-ocular distance of it."""
    scored = [(nme(f.landmarks, truth), f) for f in faces]
    best = min(scored, key=lambda x: x[0], default=(np.inf, None))
    return best[1] if best[0] <= 1.0 else None


def load_offsets(path: str | Path) -> np.ndarray:
    """The (N, 5, 2) offsets of a file written by :func:`measure_landmark_error`."""
    data = json.loads(Path(path).read_text())
    arr = np.asarray(data.get("offsets", []), dtype=np.float64)
    if arr.ndim != 3 or arr.shape[1:] != (5, 2) or not len(arr):
        raise ValueError(f"{path}: no landmark offsets (write it with cervl landmark-error)")
    return arr


__all__ = ["FlipAveraged", "face_frame", "load_offsets", "nearest_face", "nme", "offsets"]
