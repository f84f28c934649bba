"""``POST /v1/predict?explain=true``: the predicted class's saliency map, as numbers and as a layer for the photo.

The map is computed on what the model scored (the aligned crop, or the photo itself), then, for an aligned
face, warped back through the inverse of the alignment so the web page can lay it over the photo as it is.
Also: what the model was trained on, from its lineage, and the one-line notice for the SynthCE demo model.
"""

from __future__ import annotations

import base64

import numpy as np
from PIL import Image

from cervl.explain.figures import heat_rgba, png_bytes
from cervl.explain.maps import Explainer, VLMScorer

GRID = 28  # the map as numbers: GRID x GRID cells over the scored image
LAYER_MAX_SIDE = 512  # the overlay PNG is at most this many pixels on its longer side (the page stretches it)

SYNTHETIC_NOTICE = ("This is the SynthCE demo model: it was trained on drawn faces, so its answers on real photos "
                    "mean little.")


class MapMaker:
    """Builds explain payloads for one predictor (its scorer is built once, on first use)."""

    def __init__(self, predictor, method: str = "gradient"):
        self.predictor, self.method, self._explainer = predictor, method, None

    def __call__(self, scored: Image.Image, photo_size: tuple[int, int], landmarks, class_name: str) -> dict:
        """The payload for ``class_name`` on ``scored``; ``landmarks`` (5x2, photo pixels) when it was aligned.

        ``grid``: the map on GRID x GRID cells of the scored image, scaled to a maximum of 1 (``max`` is the
        map's maximum in its own units); ``overlay``: a transparent PNG of the photo's shape (the map warped
        back onto the photo when the face was aligned).
        """
        if self._explainer is None:
            self._explainer = Explainer(VLMScorer(self.predictor), self.method)
        ex = self._explainer.explain([scored], [class_name])[0]
        m = ex.maps[0]
        vmax = float(m.max()) if m.max() > 0 else 1.0
        grid = np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize((GRID, GRID), Image.BILINEAR))
        layer = _photo_layer(heat_rgba(m, scored.size, vmax), photo_size, landmarks)
        return {"class": class_name, "method": ex.method, "units": "probability drop" if ex.method == "occlusion"
                else "log-probability drop (gradient x input)", "max": round(vmax, 6),
                "grid": np.round(grid / (grid.max() if grid.max() > 0 else 1.0), 4).tolist(), "overlay": "data:image/png;base64,"
                + base64.b64encode(png_bytes(layer)).decode()}


def _photo_layer(layer: Image.Image, photo_size: tuple[int, int], landmarks) -> Image.Image:
    """The crop's heat layer placed on the photo (scaled to LAYER_MAX_SIDE), transparent elsewhere."""
    from cervl.faces.align import fit_similarity, template, warp_affine

    w, h = photo_size
    s = min(1.0, LAYER_MAX_SIDE / max(w, h))
    out_size = (max(1, round(w * s)), max(1, round(h * s)))
    if landmarks is None:  # the photo itself was scored
        return layer.resize(out_size, Image.BILINEAR)
    m = fit_similarity(np.asarray(landmarks, dtype=np.float64), template(layer.size[0]))  # photo -> crop
    a_inv = np.linalg.inv(m[:, :2])
    inverse = np.hstack([a_inv, (-a_inv @ m[:, 2])[:, None]])  # crop -> photo
    inverse = np.diag([s, s]) @ inverse
    return warp_affine(np.asarray(layer), inverse, out_size, fill=(0, 0, 0, 0))


def trained_on(run_info: dict) -> dict:
    """What ``/v1/model`` and the page header say the model learned from, and the SynthCE notice if it applies."""
    stages = [e for e in run_info.get("lineage", []) if e.get("kind") != "base"]
    data = sorted({d.rsplit("/", 1)[-1] for e in stages for d in e.get("data") or []})
    base = run_info.get("base_model")
    synthetic = base == "pretrained-tiny" or any("synthce" in d.lower() for d in data)
    summary = ", ".join(f"{e['stage']} ({e.get('label_set')}, {e.get('kind')})" for e in stages) or "no fine-tuning"
    return {"trained_on": data, "stages_summary": summary, "synthetic": synthetic,
            "notice": SYNTHETIC_NOTICE if synthetic else None}


__all__ = ["MapMaker", "SYNTHETIC_NOTICE", "trained_on"]
