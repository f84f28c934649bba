"""A face detector's landmark error on a manifest whose records carry true landmarks (``cervl landmark-error``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from cervl.core.images import load_rgb
from cervl.data.manifest import read_manifest
from cervl.faces.detect import FaceDetector
from cervl.faces.landmarks import nearest_face, nme, offsets


def measure_landmark_error(manifest: str | Path, detector: FaceDetector, *, splits: list[str] | None = None,
                           limit: int = 0, progress: bool = True) -> dict:
    """The detector's landmark error on a manifest's records that carry true landmarks (original images).

    The detected face nearest the truth is compared (this measures landmark precision, not which face a
    caller picks); a record with no face within one iod of the truth counts as missed.
    """
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


__all__ = ["measure_landmark_error"]
