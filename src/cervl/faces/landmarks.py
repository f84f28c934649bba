"""A detector's landmark error, measured on faces whose true landmarks are known, and flip averaging.

The aligned-versus-original gap on SynthCE is landmark error (issue 22): originals aligned with their
true landmarks score like the aligned crops, with MTCNN's they lose about 30 points. This module

* measures that error once (:func:`measure_landmark_error`, ``cervl landmark-error``): per face, the five
  offsets detector - truth in units of the inter-ocular distance (iod), in the face's own frame (eye line
  horizontal), plus the faces missed. The offsets are the distribution that alignment-noise augmentation
  (:mod:`cervl.augment`) draws from;
* reduces it (:class:`~cervl.faces.detect.FlipAveraged`): the detector also runs on the mirrored image, and each face's
  landmarks are averaged with its mirrored twin's (left and right swapped back). Errors that do not
  mirror with the face, as a detector's biases and noise mostly do not, partly cancel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cervl.faces.detect import Face, FaceDetector, FlipAveraged  # noqa: F401  (FlipAveraged: re-exported)

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


def measure_landmark_error(manifest: str | Path, detector: FaceDetector, *, splits: list[str] | None = None,
                           limit: int = 0, progress: bool = True) -> dict:
    """The detector's landmark error on a manifest's records that carry true landmarks (original images).

    The detected face nearest the truth is compared (this measures landmark precision, not which face a
    caller picks); a record with no face within one iod of the truth counts as missed.
    """
    from cervl.data.images import load_rgb
    from cervl.data.manifest import read_manifest

    m = read_manifest(manifest)
    recs = [r for r in m if r.landmarks is not None and (not splits or r.split in splits)]
    recs = recs[:limit] if limit else recs
    if not recs:
        raise ValueError(f"{manifest}: no records with landmarks" + (f" in splits {splits}" if splits else ""))
    errs, offs, missed = [], [], []
    for r in tqdm(recs, desc=f"landmarks ({detector.name})", unit="img", disable=not progress):
        image = load_rgb(m.image_path(r))
        truth = r.landmarks_for_image(image.size)  # in the pixels of the image the detector sees
        face = nearest_face(detector.detect([image])[0], truth)
        if face is None:
            missed.append(r.sample_id)
            continue
        errs.append(nme(face.landmarks, truth))
        offs.append(offsets(face.landmarks, truth).round(5).tolist())
    e = np.array(errs) if errs else np.array([np.nan])
    return {"manifest": str(manifest), "splits": splits, "detector": detector.name, "n": len(recs),
            "found": len(errs), "missed": len(missed), "missed_ids": missed[:50], "nme_mean": float(e.mean()),
            "nme_se": float(e.std(ddof=1) / np.sqrt(len(e))) if len(e) > 1 else float("nan"),
            "nme_median": float(np.median(e)), "offsets": offs}


def load_offsets(path: str | Path) -> np.ndarray:
    """The (N, 5, 2) offsets of a file written by :func:`measure_landmark_error`."""
    data = json.loads(Path(path).read_text())
    arr = np.asarray(data.get("offsets", []), dtype=np.float64)
    if arr.ndim != 3 or arr.shape[1:] != (5, 2) or not len(arr):
        raise ValueError(f"{path}: no landmark offsets (write it with cervl landmark-error)")
    return arr


__all__ = ["FlipAveraged", "face_frame", "load_offsets", "measure_landmark_error", "nearest_face", "nme", "offsets"]
