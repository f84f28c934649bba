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

    Umeyama's solution without reflection, in its 2-D closed form: with centred points, the best
    ``[[a, -b], [b, a]]`` has ``a = sum(s . d) / sum(|s|^2)`` and ``b = sum(s x d) / sum(|s|^2)``.
    (No SVD: this runs for every video frame.) Returns a 2x3 matrix ``M`` with ``dst ~ M @ [x, y, 1]``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    norm = (s * s).sum()
    if norm == 0:
        raise ValueError("cannot fit a similarity to coincident points")
    a = (s * d).sum() / norm
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / norm
    rot = np.array([[a, -b], [b, a]])
    return np.hstack([rot, (mu_d - rot @ mu_s)[:, None]])


def apply_affine(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to an (N, 2) array of points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ m[:, :2].T + m[:, 2]


def warp_affine(image: Image.Image | np.ndarray, m: np.ndarray, size: int | tuple[int, int],
                fill: int | tuple[int, ...] = 0) -> Image.Image:
    """Warp ``image`` with the forward matrix ``m`` (source -> output pixels) into ``size`` (bicubic).

    Landmarks use pixel-index coordinates (pixel centres at integers), which is OpenCV's convention,
    so a landmark at ``p`` lands exactly at ``m @ p`` in the output. OpenCV's warp is ~8x faster than
    PIL's ``Image.transform`` for a 112-px crop (0.1 vs 0.86 ms), which matters per video frame.
    """
    import cv2

    w, h = (size, size) if isinstance(size, int) else size
    arr = np.asarray(image)
    border = (fill,) * 4 if isinstance(fill, (int, float)) else tuple(fill)
    out = cv2.warpAffine(arr, np.asarray(m, dtype=np.float64), (w, h), flags=cv2.INTER_CUBIC,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=border)
    return Image.fromarray(out)


def align_face(image: Image.Image | np.ndarray, landmarks: np.ndarray,
               size: int = 112) -> tuple[Image.Image, np.ndarray]:
    """Crop ``image`` so its five ``landmarks`` land on the template; return crop and matrix."""
    m = fit_similarity(np.asarray(landmarks, dtype=np.float64), template(size))
    return warp_affine(image, m, size), m
