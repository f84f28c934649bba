"""5-point face alignment: a least-squares similarity transform to a fixed template.

The template is the standard 112x112 five-point face template (ArcFace / InsightFace), in the
order left eye, right eye, nose tip, left mouth corner, right mouth corner, where "left" is
the image-left side. Other output sizes scale it uniformly; RAF-DB's aligned release is
100x100 and uses the same kind of similarity alignment.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],  # left eye
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float64,
)


def template(size: int = 112) -> np.ndarray:
    """The 5-point template scaled to a ``size`` x ``size`` crop."""
    return TEMPLATE_112 * (size / 112.0)


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` to ``dst``.

    Umeyama's closed form without reflection. Returns a 2x3 matrix ``M`` with ``dst ~ M @ [x, y, 1]``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum() / len(src)
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1
    rot = u @ np.diag(sign) @ vt
    scale = (sig * sign).sum() / var_s
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def apply_affine(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to an (N, 2) array of points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ m[:, :2].T + m[:, 2]


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine matrix."""
    a = np.vstack([m, [0.0, 0.0, 1.0]])
    return np.linalg.inv(a)[:2]


def warp_affine(image: Image.Image, m: np.ndarray, size: int | tuple[int, int],
                resample: int = Image.BICUBIC, fill: int | tuple[int, ...] = 0) -> Image.Image:
    """Warp ``image`` with the forward matrix ``m`` (source -> output pixels) into ``size``.

    Pixel centres are treated consistently: point (x, y) is the continuous coordinate used by the
    landmarks, so a landmark at ``p`` lands at ``m @ p`` in the output.
    """
    w, h = (size, size) if isinstance(size, int) else size
    inv = invert_affine(m)
    # Landmarks use pixel-index coordinates (pixel centres at integers, as OpenCV); PIL's AFFINE
    # works in continuous coordinates (centres at +0.5), so conjugate the inverse map by that shift.
    to_pil = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    from_pil = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]])
    full = to_pil @ np.vstack([inv, [0, 0, 1]]) @ from_pil
    coeffs = tuple(full[:2].reshape(-1))
    return image.transform((w, h), Image.AFFINE, coeffs, resample=resample, fillcolor=fill)


def align_face(image: Image.Image, landmarks: np.ndarray, size: int = 112) -> tuple[Image.Image, np.ndarray]:
    """Crop ``image`` so its five ``landmarks`` land on the template; return crop and matrix."""
    m = fit_similarity(np.asarray(landmarks, dtype=np.float64), template(size))
    return warp_affine(image, m, size), m
