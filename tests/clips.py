"""A synthetic clip of a real face moving along a known path, for testing and benchmarking trackers.

The whole photo moves as if the camera panned, rolled and zoomed: frame ``t`` is the photo warped by a
smooth similarity transform ``T_t``, plus sensor noise. Given the face's landmarks in the photo, the
true landmarks in every frame are ``T_t`` applied to them, so tracking error can be measured without
hand annotation.

With ``smile > 0`` the face also changes expression: a smooth displacement field pulls the mouth
corners outwards and upwards and lets them go again, so the mouth-corner landmarks move relative to
the eyes (non-rigid motion, as in a real smile) along a known path too.
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


class Smile:
    """A smooth displacement field around the two mouth corners of a face with known landmarks.

    At strength ``a`` (0..1) a point ``x`` of the deformed image shows the photo at ``x - d(x)``,
    with ``d(x) = a * sum_k v_k * exp(-|x - c_k|^2 / (2 s^2))``: Gaussian bumps of width ``s`` = 0.3
    inter-ocular distances (iod) at the corners ``c_k``, pulling them 0.18 iod outwards and 0.1 iod up.
    """

    def __init__(self, landmarks: np.ndarray):
        lm = np.asarray(landmarks, dtype=np.float64)
        iod = float(np.linalg.norm(lm[1] - lm[0]))
        self.centres = lm[3:5]
        self.shifts = np.array([[-0.18, -0.10], [0.18, -0.10]]) * iod  # image-left corner moves left
        self.sigma = 0.3 * iod

    def displacement(self, points: np.ndarray, a: float) -> np.ndarray:
        d2 = ((points[..., None, :] - self.centres) ** 2).sum(-1)  # (..., 2 corners)
        return a * (np.exp(-d2 / (2 * self.sigma ** 2))[..., None] * self.shifts).sum(-2)

    def warp(self, photo: np.ndarray, a: float) -> np.ndarray:
        import cv2

        h, w = photo.shape[:2]
        grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)), -1)
        src = (grid - self.displacement(grid, a)).astype(np.float32)
        return cv2.remap(photo, src[..., 0], src[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

    def move(self, points: np.ndarray, a: float) -> np.ndarray:
        """Where ``points`` of the photo appear after :meth:`warp`: solves ``y - d(y) = x`` by
        fixed-point iteration (a contraction: the field's gradient stays under 0.4)."""
        y = np.asarray(points, dtype=np.float64).copy()
        for _ in range(50):
            y = points + self.displacement(y, a)
        return y


def moving_face_clip(photo: np.ndarray, landmarks: np.ndarray, n: int = 60, size: tuple[int, int] = (640, 480),
                     noise: float = 3.0, seed: int = 0, smile: float = 0.0,
                     **motion_kw) -> tuple[list[np.ndarray], np.ndarray]:
    """Frames (RGB uint8, ``size`` = width, height) and the true (n, 5, 2) landmarks in each.

    The photo is first placed so the face centre sits at the frame centre. ``smile``: peak strength
    of the expression change (0 = rigid face; 1 = the :class:`Smile` field at full strength), which
    rises and falls twice over the clip.
    """
    import cv2

    w, h = size
    rng = np.random.default_rng(seed)
    landmarks = np.asarray(landmarks, dtype=np.float64)
    place = np.array([[1.0, 0, w / 2 - landmarks[:, 0].mean()], [0, 1.0, h / 2 - landmarks[:, 1].mean()]])
    centre = np.array([w / 2, h / 2])
    field = Smile(landmarks) if smile else None
    frames, truth = [], []
    for t in range(n):
        m = motion(t, n, centre, **motion_kw)
        full = np.vstack([m, [0, 0, 1]]) @ np.vstack([place, [0, 0, 1]])
        src, lm = photo, landmarks
        if field is not None:
            a = smile * 0.5 * (1 - np.cos(4 * np.pi * t / max(n, 1)))
            src, lm = field.warp(photo, a), field.move(landmarks, a)
        frame = cv2.warpAffine(src, full[:2], (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        if noise:
            frame = np.clip(frame + rng.normal(0, noise, frame.shape), 0, 255).astype(np.uint8)
        frames.append(frame)
        truth.append(apply_affine(full[:2], lm))
    return frames, np.stack(truth)
