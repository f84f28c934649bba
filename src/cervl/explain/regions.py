"""Where each action unit shows on a SynthCE face, derived from the generator, and the map scores.

SynthCE draws every face from known geometry, so the pixels an AU changes are known exactly: render
the same identity with the AU off and fully on, align both with the same (AU-off) landmarks, and
keep the pixels that change. Averaged over many identities this gives one mask per AU in the
aligned template (112 px). Nothing here looks at a saliency map: the regions come from the
drawing code alone, so a map that lands in them is not there by construction.

:func:`pointing_hit` (the pointing game) and :func:`energy_ratio` score one map against a class's
required-AU region; :data:`PARTS` names the face part each AU moves, for reports.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw

from cervl.core.facs import AU_IDS, PROTOTYPES

# The face part each AU moves (FACS; and what the SynthCE drawing code moves), for tables and captions.
PARTS: dict[int, str] = {1: "brows", 2: "brows", 4: "brows", 5: "eyes", 6: "cheeks", 7: "eyes", 9: "nose",
                         10: "mouth", 11: "cheeks", 12: "mouth", 15: "mouth", 17: "jaw", 20: "mouth",
                         23: "mouth", 24: "mouth", 25: "mouth", 26: "jaw"}


def _render_template(aus: dict[int, float], idn, size: int, landmarks: np.ndarray | None):
    """One face on a flat grey background in the template frame, aligned to ``size`` px.

    ``landmarks``: align with these (the AU-off face's) so that only the AU's own change differs.
    """
    from cervl.data.synth import SUPERSAMPLE, _Pen, draw_face
    from cervl.faces.align import align_face

    canvas = Image.new("RGB", (112 * SUPERSAMPLE,) * 2, (128, 128, 128))
    m = np.array([[SUPERSAMPLE, 0, (SUPERSAMPLE - 1) / 2], [0, SUPERSAMPLE, (SUPERSAMPLE - 1) / 2]], dtype=float)
    lm = draw_face(_Pen(ImageDraw.Draw(canvas), m), idn, aus)
    img = canvas.reduce(SUPERSAMPLE)
    crop, _ = align_face(img, lm if landmarks is None else landmarks, size)
    return np.asarray(crop, dtype=np.float32), lm


@functools.lru_cache(maxsize=4)
def au_masks(size: int = 112, identities: int = 32, seed: int = 0, min_change: float = 12.0,
             min_share: float = 0.25) -> dict[int, np.ndarray]:
    """A boolean (size, size) mask per AU: the pixels that AU visibly moves.

    For each of ``identities`` random SynthCE identities, the face is drawn with every AU at 0 and
    with only this AU at 1; a pixel counts as changed when any channel differs by at least
    ``min_change`` (of 255). A pixel is in the mask when it changes for at least ``min_share`` of the
    identities (faces differ in eye spacing, mouth width and so on, so the union would be too wide).
    """
    from cervl.data.synth import Identity

    rng = np.random.default_rng(seed)
    ids = [Identity.sample(rng) for _ in range(identities)]
    counts = {au: np.zeros((size, size)) for au in AU_IDS}
    zero = {au: 0.0 for au in AU_IDS}
    for idn in ids:
        base, lm = _render_template(zero, idn, size, None)
        for au in AU_IDS:
            moved, _ = _render_template({**zero, au: 1.0}, idn, size, lm)
            counts[au] += np.abs(moved - base).max(axis=2) >= min_change
    return {au: c / identities >= min_share for au, c in counts.items()}


def class_region(label: str, size: int = 112) -> np.ndarray:
    """The union of the masks of ``label``'s required AUs (empty for Neutral and unknown classes)."""
    masks = au_masks(size)
    region = np.zeros((size, size), dtype=bool)
    proto = PROTOTYPES.get(label)
    for au in proto.required if proto else ():
        region |= masks[au]
    return region


def _resized(saliency: np.ndarray, size: int) -> np.ndarray:
    if saliency.shape == (size, size):
        return saliency
    img = Image.fromarray(saliency.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR)
    return np.asarray(img)


def pointing_hit(saliency: np.ndarray, region: np.ndarray) -> float:
    """The pointing game: does the map's maximum lie inside ``region``? (Maps are resized to the region.)

    Occlusion maps have plateaus (every pixel under the same patches gets the same value), so the maximum is
    often a set of pixels; ties are broken at random, in expectation: the share of maximal pixels inside the
    region (1 or 0 for a single peak). Taking the first maximal pixel instead would favour the top left.
    """
    s = _resized(saliency, region.shape[0])
    top = float(s.max())
    peak = s >= top - 1e-9 * max(1.0, abs(top))
    return float(region[peak].mean())


def energy_ratio(saliency: np.ndarray, region: np.ndarray) -> float:
    """The share of the map's positive mass inside ``region``, over the region's share of the area.

    1 is what a map spread evenly over the face gets; NaN for an empty region or a map with no
    positive mass.
    """
    s = np.clip(_resized(saliency, region.shape[0]), 0, None)
    total, area = float(s.sum()), float(region.mean())
    if total <= 0 or area == 0:
        return float("nan")
    return float(s[region].sum()) / total / area


def dilate(region: np.ndarray, px: int) -> np.ndarray:
    """``region`` grown by ``px`` pixels (a square neighbourhood): the pointing game's usual tolerance."""
    if px <= 0:
        return region
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(region.astype(np.float32))[None, None]
    return F.max_pool2d(t, 2 * px + 1, stride=1, padding=px)[0, 0].numpy() > 0


def score_maps(labelled_maps: list[tuple[str, np.ndarray]], *, tolerance_px: int = 8) -> dict:
    """Pointing game and energy ratio of each true class's map, per class and overall.

    ``labelled_maps``: (true label, that class's map) pairs, maps of any square size. ``tolerance_px``:
    a second pointing figure that counts a peak within that many pixels (of the 112-px crop) of the
    region, as Zhang et al. (2016) allow 15 px on 224-px inputs; the strict figure is ``pointing``.
    """
    rows: dict[str, dict[str, list]] = {}
    for label, m in labelled_maps:
        region = class_region(label)
        if not region.any():
            continue
        r = rows.setdefault(label, {"hit": [], "hit_tol": [], "energy": [], "area": []})
        r["hit"].append(pointing_hit(m, region))
        r["hit_tol"].append(pointing_hit(m, dilate(region, tolerance_px)))
        r["energy"].append(energy_ratio(m, region))
        r["area"].append(float(region.mean()))

    def stats(r):
        n = len(r["hit"])
        p = float(np.mean(r["hit"]))
        return {"n": n, "pointing": p, "pointing_se": float(np.sqrt(p * (1 - p) / n)),
                f"pointing_within_{tolerance_px}px": float(np.mean(r["hit_tol"])),
                "energy_median": float(np.nanmedian(r["energy"])), "energy_mean": float(np.nanmean(r["energy"])),
                "area": float(np.mean(r["area"]))}

    out = {label: stats(r) for label, r in sorted(rows.items())}
    every = {key: [v for r in rows.values() for v in r[key]] for key in ("hit", "hit_tol", "energy", "area")}
    out["overall"] = stats(every) if every["hit"] else {"n": 0}
    return out


__all__ = ["PARTS", "au_masks", "class_region", "dilate", "energy_ratio", "pointing_hit", "score_maps"]
