"""A synthetic clip of a real face moving along a known path, for testing and benchmarking trackers.

The whole photo moves as if the camera panned, rolled and zoomed: frame ``t`` is the photo warped by a
smooth similarity transform ``T_t``, plus sensor noise. Given the face's landmarks in the photo, the
true landmarks in every frame are ``T_t`` applied to them, so tracking error can be measured without
hand annotation. Expression changes are not simulated: the face is rigid.
"""

from __future__ import annotations

import numpy as np

from cervl.faces.align import apply_affine


def motion(t: int, n: int, centre: np.ndarray, shift: float = 120.0, roll_deg: float = 12.0,
           zoom: float = 0.2) -> np.ndarray:
    """The 2x3 similarity for frame ``t`` of ``n``: rotation and scale about ``centre``, then a shift."""
    phase = 2 * np.pi * t / max(n, 1)
    angle = np.deg2rad(roll_deg * np.sin(1.1 * phase))
    scale = 1.0 + zoom * np.sin(0.7 * phase)
    dx, dy = shift * np.sin(1.3 * phase), 0.4 * shift * np.sin(0.9 * phase + 0.5)
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return np.hstack([rot, (centre - rot @ centre + [dx, dy])[:, None]])


def moving_face_clip(photo: np.ndarray, landmarks: np.ndarray, n: int = 60, size: tuple[int, int] = (640, 480),
                     noise: float = 3.0, seed: int = 0, **motion_kw) -> tuple[list[np.ndarray], np.ndarray]:
    """Frames (RGB uint8, ``size`` = width, height) and the true (n, 5, 2) landmarks in each.

    The photo is first placed so the face centre sits at the frame centre.
    """
    import cv2

    w, h = size
    rng = np.random.default_rng(seed)
    landmarks = np.asarray(landmarks, dtype=np.float64)
    place = np.array([[1.0, 0, w / 2 - landmarks[:, 0].mean()], [0, 1.0, h / 2 - landmarks[:, 1].mean()]])
    centre = np.array([w / 2, h / 2])
    frames, truth = [], []
    for t in range(n):
        m = motion(t, n, centre, **motion_kw)
        full = np.vstack([m, [0, 0, 1]]) @ np.vstack([place, [0, 0, 1]])
        frame = cv2.warpAffine(photo, full[:2], (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        if noise:
            frame = np.clip(frame + rng.normal(0, noise, frame.shape), 0, 255).astype(np.uint8)
        frames.append(frame)
        truth.append(apply_affine(full[:2], landmarks))
    return frames, np.stack(truth)
