"""SynthCE: a procedurally drawn compound-expression dataset in RAF-DB's directory layout.

Each sample draws an identity (face shape, tones, eye spacing, glasses, fringe) and an
expression: the class's required FACS action units at random intensities, its optional AUs
with the probabilities of :data:`cervl.core.facs.PROTOTYPES`, plus low-intensity noise on the
others. The AUs move facial parts (brows, lids, cheeks, nose, lips, jaw), so classes overlap
the way real ones do (Sadly Fearful vs Fearfully Surprised share AUs 1, 20 and 25).

Two variants per sample, as in RAF-DB:

* ``original``: the face drawn under a random pose (position, scale, in-plane rotation, a small
  yaw-like squash) on a cluttered background, with lighting, blur and noise;
* ``aligned``: that original image warped to the 5-point template by
  :func:`cervl.faces.align.align_face`, using the face's known landmarks.

``cervl synth -o DIR --per-class N --seed S`` writes ``DIR/basic`` and ``DIR/compound`` so that
``cervl prepare rafdb DIR/compound --subset compound`` reads them like the real dataset.
Every sample has its own RNG seeded from (seed, subset, class, index): the same seed gives
byte-identical files whatever the number of workers.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

from cervl.core.fsio import atomic_write_text
from cervl.core.errors import InvalidInput
from cervl.core.facs import AU_IDS, PROTOTYPES, au_key
from cervl.faces.align import align_face, apply_affine
from cervl.core.labels import get_label_set
from cervl.core.workers import ignore_interrupts, start_workers

log = logging.getLogger(__name__)

SYNTH_VERSION = 1
SUBSETS = {"basic": "rafdb-basic", "compound": "rafdb-compound"}
SUPERSAMPLE = 2  # faces are drawn at 2x and box-downsampled: cheap anti-aliasing
CX = 56.0  # face centre line in the 112-px template frame the geometry is written in

SKIN = [(255, 224, 196), (241, 194, 167), (224, 172, 138), (198, 134, 97), (161, 102, 72), (120, 76, 52),
        (92, 58, 40)]
HAIR = [(20, 16, 14), (60, 40, 25), (110, 75, 45), (190, 150, 90), (150, 60, 30), (140, 140, 140)]
IRIS = [(90, 60, 40), (60, 40, 25), (70, 110, 150), (80, 120, 80), (40, 30, 25)]


# ----------------------------------------------------------------------------------------------
# Sampling identities and expressions
# ----------------------------------------------------------------------------------------------

def sample_aus(label: str, rng: np.random.Generator, noise_p: float = 0.25) -> dict[int, float]:
    """Draw AU intensities in [0, 1] for one sample of ``label``."""
    proto = PROTOTYPES[label]
    aus = {}
    for au in AU_IDS:
        if au in proto.required:
            aus[au] = rng.uniform(0.55, 1.0)
        elif au in proto.optional and rng.random() < proto.optional[au]:
            aus[au] = rng.uniform(0.3, 0.9)
        elif rng.random() < noise_p:
            aus[au] = rng.uniform(0.0, 0.2)
        else:
            aus[au] = 0.0
    return aus


@dataclass
class Identity:
    face_w: float
    face_h: float
    eye_dx: float
    eye_y: float
    eye_w: float
    eye_h: float
    brow_gap: float
    brow_thick: float
    nose_y: float
    mouth_y: float
    mouth_dx: float
    lip_t: float
    hairline: float
    skin: tuple
    hair: tuple
    iris: tuple
    glasses: bool
    fringe: bool
    long_hair: bool
    clothes: tuple

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Identity":
        def jitter(c, a=10):
            return tuple(int(np.clip(v + rng.integers(-a, a + 1), 0, 255)) for v in c)

        return cls(
            face_w=rng.uniform(0.92, 1.08), face_h=rng.uniform(0.95, 1.06),
            eye_dx=17.6 + rng.uniform(-1.5, 1.5), eye_y=51.6 + rng.uniform(-1.2, 1.2),
            eye_w=rng.uniform(6.2, 7.6), eye_h=rng.uniform(2.8, 3.6),
            brow_gap=rng.uniform(10.5, 13.0), brow_thick=rng.uniform(2.4, 3.8),
            nose_y=71.7 + rng.uniform(-1.2, 1.2), mouth_y=92.3 + rng.uniform(-1.2, 1.2),
            mouth_dx=14.6 + rng.uniform(-1.5, 1.5), lip_t=rng.uniform(0.85, 1.25),
            hairline=rng.uniform(14, 22),
            skin=jitter(SKIN[rng.integers(len(SKIN))], 8), hair=jitter(HAIR[rng.integers(len(HAIR))]),
            iris=jitter(IRIS[rng.integers(len(IRIS))]), glasses=bool(rng.random() < 0.15),
            fringe=bool(rng.random() < 0.25), long_hair=bool(rng.random() < 0.4),
            clothes=tuple(int(v) for v in rng.integers(20, 235, 3)),
        )


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------

def _shade(c: tuple, f: float) -> tuple:
    return tuple(int(np.clip(v * f, 0, 255)) for v in c)


def _mix(a: tuple, b: tuple, t: float) -> tuple:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))


class _Pen:
    """Draws template-frame geometry through an affine map onto a supersampled canvas."""

    def __init__(self, draw: ImageDraw.ImageDraw, m: np.ndarray):
        self.draw, self.m = draw, m
        self.scale = math.sqrt(abs(np.linalg.det(m[:, :2])))

    def _pts(self, pts) -> list[tuple[float, float]]:
        return [tuple(p) for p in apply_affine(self.m, np.asarray(pts, dtype=np.float64)).tolist()]

    def poly(self, pts, fill) -> None:
        self.draw.polygon(self._pts(pts), fill=fill)

    def line(self, pts, fill, width: float) -> None:
        self.draw.line(self._pts(pts), fill=fill, width=max(1, int(round(width * self.scale))), joint="curve")

    def ellipse(self, cx, cy, rx, ry, fill, n: int = 28) -> None:
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        self.poly(np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1), fill)

    def ring(self, cx, cy, rx, ry, fill, width: float, n: int = 28) -> None:
        t = np.linspace(0, 2 * np.pi, n + 1)
        self.line(np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1), fill, width)


def _curve(x0, y0, x1, y1, bulge, n=11, power=2.0):
    """Points from (x0, y0) to (x1, y1), displaced by ``bulge`` at the middle (profile 1-|t|^p)."""
    t = np.linspace(-1, 1, n)
    xs = x0 + (x1 - x0) * (t + 1) / 2
    ys = y0 + (y1 - y0) * (t + 1) / 2 + bulge * (1 - np.abs(t) ** power)
    return np.stack([xs, ys], 1)


def _clip_between(cx, cy, r, upper, lower, n=16):
    """A disc clipped to lie between two curves given as (x, y) arrays sorted by x."""
    xs = np.linspace(cx - r, cx + r, n)
    half = np.sqrt(np.maximum(r * r - (xs - cx) ** 2, 0))
    top = np.maximum(cy - half, np.interp(xs, upper[:, 0], upper[:, 1]))
    bot = np.minimum(cy + half, np.interp(xs, lower[:, 0], lower[:, 1]))
    keep = bot > top
    if keep.sum() < 2:
        return None
    xs, top, bot = xs[keep], top[keep], bot[keep]
    return np.concatenate([np.stack([xs, top], 1), np.stack([xs[::-1], bot[::-1]], 1)])


def draw_face(pen: _Pen, idn: Identity, aus: dict[int, float]) -> np.ndarray:
    """Draw one face in template coordinates; return its 5 landmarks (template frame)."""
    a = {k: float(v) for k, v in aus.items()}
    skin, hair = idn.skin, idn.hair
    c = {"skin": skin, "hair": hair, "shadow": _shade(skin, 0.78), "line": _shade(skin, 0.55),
         "lip": _mix(_shade(skin, 0.85), (175, 70, 75), 0.45),
         "brow": _shade(hair, 0.8) if sum(hair) < 450 else _shade(hair, 0.55)}
    brow_base = _draw_head(pen, idn, a, c)
    _draw_brows(pen, idn, a, c, brow_base)
    eye_pts = _draw_eyes(pen, idn, a, c)
    tip_y, nostril_y, spread = _draw_nose(pen, idn, a, c)
    left, right = _draw_mouth(pen, idn, a, c, nostril_y, spread)
    return np.array([eye_pts[0], eye_pts[1], (CX, tip_y), left, right], dtype=np.float64)


def _unpack(c: dict):
    return c["skin"], c["hair"], c["shadow"], c["line"], c["lip"], c["brow"]


def _draw_head(pen: _Pen, idn: Identity, a: dict, c: dict) -> float:
    """Body, neck, ears, face outline, hair, forehead wrinkles and cheeks; returns the brow baseline."""
    skin, hair, shadow, line_c, _, _ = _unpack(c)
    fw, fh = idn.face_w, idn.face_h

    # Body, hair behind the head, ears, neck.
    pen.ellipse(CX, 160, 75, 38, idn.clothes)
    if idn.long_hair:
        pen.poly([(CX - 50 * fw, 40), (CX + 50 * fw, 40), (CX + 54 * fw, 125), (CX - 54 * fw, 125)], hair)
    pen.ellipse(CX, 48, 50 * fw, 50, hair)
    pen.poly([(CX - 17, 95), (CX + 17, 95), (CX + 19, 140), (CX - 19, 140)], shadow)
    for side in (-1, 1):
        pen.ellipse(CX + side * 44 * fw, 62, 4.5, 9, shadow)

    # Face outline; the jaw drop (AU26) lengthens the lower face.
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    fx, fy = CX + 44 * fw * np.cos(t), 58 + 56 * fh * np.sin(t)
    below = np.clip((fy - 70) / (58 + 56 * fh - 70), 0, 1)
    fy = fy + 7 * a[26] * below
    pen.poly(np.stack([fx, fy], 1), skin)

    # Hair cap and optional fringe.
    top = 58 - 56 * fh
    cap = np.concatenate([_curve(CX - 46 * fw, 44, CX + 46 * fw, 44, top - 48, 15),
                          _curve(CX + 40 * fw, 40, CX - 40 * fw, 40, idn.hairline - 40, 15)])
    pen.poly(cap, hair)
    brow_base = idn.eye_y - idn.brow_gap
    if idn.fringe:
        edge = brow_base - 4.5
        xs = np.linspace(CX - 38 * fw, CX + 38 * fw, 9)
        jag = np.array([edge - (2.5 if i % 2 else 0) for i in range(9)])
        pen.poly(np.concatenate([np.stack([xs, jag], 1), [(CX + 40 * fw, 15), (CX - 40 * fw, 15)]]), hair)

    # Forehead wrinkles from raised brows (AU1/AU2).
    raise_ = max(a[1], a[2])
    if raise_ > 0.25 and not idn.fringe:
        col = _mix(skin, line_c, min(1.0, raise_))
        for k in range(2):
            y = brow_base - 7 - 4 * k
            pen.line(_curve(CX - 14, y + 1, CX + 14, y + 1, -1.5, 7), col, 0.8)

    # Cheeks: the cheek raiser (AU6) lifts a rounded bulge under each eye.
    for side in (-1, 1):
        ex = CX + side * idn.eye_dx
        cy = idn.eye_y + 13 - 4 * a[6]
        pen.ellipse(ex + side * 2, cy, 9, 5 + 1.5 * a[6], _mix(skin, (230, 130, 120), 0.12 + 0.25 * a[6]))

    return brow_base


def _draw_brows(pen: _Pen, idn: Identity, a: dict, c: dict, brow_base: float) -> None:
    skin, _, _, line_c, _, brow_c = _unpack(c)
    # Brows: inner/mid/outer points moved by AU1, AU2, AU4 (and AU9 pulls them down a little).
    brows = []
    for side in (-1, 1):
        inner = [CX + side * 6.5, brow_base + 1.0]
        mid = [CX + side * idn.eye_dx, brow_base - 1.5]
        outer = [CX + side * (idn.eye_dx + 8.5), brow_base + 1.5]
        inner[1] += -5.5 * a[1] + 4.5 * a[4] + 1.5 * a[9]
        inner[0] -= side * 2.5 * a[4]
        mid[1] += -1.5 * a[1] - 3.5 * a[2] + 2.5 * a[4]
        outer[1] += -5.0 * a[2] + 1.0 * a[4]
        brows.append((inner, mid, outer))
        pen.line([outer, mid, inner], brow_c, idn.brow_thick)
    if a[4] > 0.2:  # vertical furrows between the brows
        col = _mix(skin, line_c, min(1.0, a[4]))
        y0 = brows[0][0][1]
        for dx in (-2.2, 2.2):
            pen.line([(CX + dx, y0 - 3), (CX + dx * 0.8, y0 + 4)], col, 0.8)


def _draw_eyes(pen: _Pen, idn: Identity, a: dict, c: dict) -> list:
    skin, _, _, line_c, _, _ = _unpack(c)
    # Eyes: lid apertures from AU5 (wider), AU7 (tighter), AU6 and AU4 (narrower).
    upper_h = np.clip(idn.eye_h + 3.2 * a[5] - 1.3 * a[7] - 0.9 * a[4] - 0.7 * a[6] - 0.4 * a[9], 0.4, None)
    lower_h = np.clip(0.75 * idn.eye_h - 1.5 * a[7] - 1.2 * a[6] + 0.4 * a[5], 0.3, None)
    eye_pts = []
    for side in (-1, 1):
        ex, ey = CX + side * idn.eye_dx, idn.eye_y
        upper = _curve(ex - idn.eye_w, ey, ex + idn.eye_w, ey, -upper_h, 13)
        lower = _curve(ex - idn.eye_w, ey, ex + idn.eye_w, ey, lower_h, 13)
        pen.poly(np.concatenate([upper, lower[::-1]]), (245, 242, 238))
        iris = _clip_between(ex, ey + 0.3, 3.4, upper, lower)
        if iris is not None:
            pen.poly(iris, idn.iris)
        pupil = _clip_between(ex, ey + 0.3, 1.4, upper, lower, 8)
        if pupil is not None:
            pen.poly(pupil, (15, 12, 12))
        pen.line(upper, (35, 25, 25), 1.3)
        pen.line(lower, _mix(skin, (60, 40, 40), 0.5), 0.6)
        if a[6] > 0.3:  # crow's feet
            ox = ex + side * (idn.eye_w + 1.5)
            col = _mix(skin, line_c, min(1.0, a[6]))
            for dy in (-1.5, 1.0, 3.5):
                pen.line([(ox, ey + dy * 0.5), (ox + side * 4, ey + dy)], col, 0.6)
        if idn.glasses:
            pen.ring(ex, ey + 0.5, idn.eye_w + 4.5, idn.eye_w + 2.5, (30, 30, 35), 1.2)
        eye_pts.append((ex, ey))
    if idn.glasses:
        pen.line([(CX - idn.eye_dx + idn.eye_w + 4.5, idn.eye_y), (CX + idn.eye_dx - idn.eye_w - 4.5, idn.eye_y)],
                 (30, 30, 35), 1.2)
    return eye_pts


def _draw_nose(pen: _Pen, idn: Identity, a: dict, c: dict) -> tuple[float, float, float]:
    skin, _, shadow, line_c, _, _ = _unpack(c)
    # Nose: AU9 wrinkles the bridge and lifts/widens the nostrils, AU10 lifts them slightly.
    tip_y = idn.nose_y - 0.8 * a[9] - 0.4 * a[10]
    for side in (-1, 1):
        pen.line([(CX + side * 2.8, idn.eye_y + 3), (CX + side * 3.8, tip_y - 4)], _mix(skin, shadow, 0.6), 0.8)
    nostril_y = tip_y + 1.6 - 1.4 * a[9] - 0.8 * a[10]
    spread = 4.2 * (1 + 0.25 * a[9] + 0.12 * a[10])
    for side in (-1, 1):
        wing = [(CX + side * (spread + 2.6), nostril_y - 3.2), (CX + side * (spread + 3.0), nostril_y),
                (CX + side * (spread + 1.2), nostril_y + 1.6)]
        pen.line(wing, line_c, 0.8)
        pen.ellipse(CX + side * spread * 0.62, nostril_y + 0.4, 1.9, 1.0, _shade(skin, 0.4), 12)
    pen.ellipse(CX, tip_y - 0.6, 3.0, 2.2, _mix(skin, (255, 255, 255), 0.08), 12)
    if a[9] > 0.2:
        col = _mix(skin, line_c, min(1.0, a[9]))
        for k in range(3):
            y = idn.eye_y + 5 + 2.4 * k
            pen.line(_curve(CX - 3.5, y, CX + 3.5, y, -0.8, 5), col, 0.7)
    return tip_y, nostril_y, spread


def _draw_mouth(pen: _Pen, idn: Identity, a: dict, c: dict, nostril_y: float, spread: float):
    skin, _, _, line_c, lip_c, _ = _unpack(c)
    # Mouth corners: AU12 up/out, AU15 down, AU20 out, AU23/24 in, AU10/AU17 small shifts.
    dx = 4.0 * a[12] + 5.5 * a[20] - 3.0 * a[23] - 2.5 * a[24] - 0.6 * a[15]
    dy = -5.0 * a[12] + 4.5 * a[15] + 1.0 * a[20] - 1.0 * a[10] + 1.2 * a[17] - 0.4 * a[6]
    left = np.array([CX - idn.mouth_dx - dx, idn.mouth_y + dy])
    right = np.array([CX + idn.mouth_dx + dx, idn.mouth_y + dy])
    mid_y = idn.mouth_y - 0.8 * a[17] - 0.6 * a[10]
    bulge = mid_y - (left[1] + right[1]) / 2  # > 0: corners above the centre (smile)
    opening = (3.2 * a[25] + 9.0 * a[26] + 1.5 * a[10] * a[25]) * (1 - 0.7 * a[24]) * (1 - 0.4 * a[23])
    if a[25] < 0.15:
        opening *= 0.3
    power = 2.0 + 3.0 * a[20]  # stretched mouths are flatter, more rectangular
    thin = 1 - 0.55 * max(a[23], a[24])
    up_inner = _curve(*left, *right, bulge - 0.3 * opening - 1.6 * a[10] * (opening > 1), 13, power)
    lo_inner = _curve(*left, *right, bulge + 0.7 * opening - 1.0 * a[17], 13, power)
    t_up = 3.2 * idn.lip_t * thin * (1 - 0.3 * a[20])
    t_lo = 4.2 * idn.lip_t * thin * (1 - 0.3 * a[20])
    up_outer = _curve(*left, *right, bulge - 0.3 * opening - t_up - 2.5 * a[10], 13, 2.0)
    up_outer[5:8, 1] += 0.8  # cupid's bow
    lo_outer = _curve(*left, *right, bulge + 0.7 * opening + t_lo - 0.6 * a[17], 13, 2.0)
    # Nasolabial folds deepen with AU9/10/11/12/20.
    fold = max(0.6 * a[10], a[11], 0.8 * a[12], 0.6 * a[9], 0.5 * a[20])
    if fold > 0.2:
        col = _mix(skin, line_c, min(1.0, fold))
        for side, corner in ((-1, left), (1, right)):
            start = (CX + side * (spread + 3.5), nostril_y - 1.5)
            end = (corner[0] + side * 3.0, corner[1] + 2.0)
            pen.line([start, ((start[0] + end[0]) / 2 + side * 2.5, (start[1] + end[1]) / 2), end], col, 0.9)
    if opening > 0.6:
        pen.poly(np.concatenate([up_inner, lo_inner[::-1]]), (70, 20, 25))
        teeth_h = min(0.45 * opening, 3.5)
        teeth = np.concatenate([up_inner[2:-2], (up_inner[2:-2] + [0, teeth_h])[::-1]])
        pen.poly(teeth, (238, 235, 225))
    pen.poly(np.concatenate([up_outer, up_inner[::-1]]), lip_c)
    pen.poly(np.concatenate([lo_inner, lo_outer[::-1]]), _shade(lip_c, 1.06))
    pen.line(up_inner if opening <= 0.6 else up_inner[1:-1], _shade(lip_c, 0.55), 0.8)
    if a[17] > 0.25:  # chin boss wrinkles
        col = _mix(skin, line_c, min(1.0, a[17]))
        cy = lo_outer[6, 1] + 5.5 - 1.5 * a[17]
        pen.line(_curve(CX - 5, cy, CX + 5, cy, 1.2, 7), col, 0.7)
        pen.ellipse(CX - 2.5, cy + 3, 0.6, 0.6, col, 6)
        pen.ellipse(CX + 2.0, cy + 3.5, 0.6, 0.6, col, 6)
    return left, right


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    base = tuple(int(v) for v in rng.integers(30, 225, 3))
    img = Image.new("RGB", (size, size), base)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
        w, h = rng.uniform(0.05, 0.6, 2) * size
        kind = rng.integers(3)
        if kind == 0:
            d.rectangle([x0, y0, x0 + w, y0 + h], fill=col)
        elif kind == 1:
            d.ellipse([x0, y0, x0 + w, y0 + h], fill=col)
        else:
            d.line([x0, y0, x0 + w, y0 + h], fill=col, width=int(rng.integers(2, 12)))
    return img


@dataclass
class Rendered:
    original: Image.Image
    aligned: Image.Image
    landmarks_original: np.ndarray  # 5x2, original-image pixel coordinates
    landmarks_aligned: np.ndarray  # 5x2, aligned-image pixel coordinates


def render_sample(aus: dict[int, float], idn: Identity, rng: np.random.Generator, *, original_size: int = 192,
                  aligned_size: int = 112) -> Rendered:
    """Draw the original (posed, cluttered) image and derive the aligned crop from its landmarks."""
    # Pose: template frame -> original image, about the face centre.
    scale = rng.uniform(0.95, 1.35) * original_size / 192
    angle = math.radians(rng.uniform(-20, 20))
    squash = rng.uniform(0.92, 1.0)  # a small yaw-like horizontal compression
    centre = rng.uniform(0.4, 0.6, 2) * original_size
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]]) @ np.diag([scale * squash, scale])
    pose = np.zeros((2, 3))
    pose[:, :2] = rot
    pose[:, 2] = centre - rot @ np.array([CX, 62.0])
    # Output pixel x corresponds to supersampled coordinate SS*x + (SS-1)/2 (box-filter centres).
    ss = np.array([[SUPERSAMPLE, 0, (SUPERSAMPLE - 1) / 2], [0, SUPERSAMPLE, (SUPERSAMPLE - 1) / 2]])
    m = ss[:, :2] @ pose
    m[:, 2] += ss[:, 2]

    canvas = _background(rng, original_size).resize((original_size * SUPERSAMPLE,) * 2, Image.NEAREST)
    landmarks = draw_face(_Pen(ImageDraw.Draw(canvas), m), idn, aus)
    img = canvas.reduce(SUPERSAMPLE)
    lm_orig = apply_affine(pose, landmarks)

    # Photometric variation: global gain/bias, a lighting gradient, blur or noise.
    arr = np.asarray(img, dtype=np.float32)
    gx = np.linspace(-1, 1, original_size, dtype=np.float32)
    direction = rng.uniform(-1, 1, 2)
    grad = 1 + 0.25 * (direction[0] * gx[None, :] + direction[1] * gx[:, None])
    arr = arr * rng.uniform(0.75, 1.2) * grad[..., None] + rng.uniform(-15, 15)
    if rng.random() < 0.5:
        arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(rng.uniform(2, 7))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))

    aligned, m_align = align_face(img, lm_orig, aligned_size)
    return Rendered(img, aligned, lm_orig, apply_affine(m_align, lm_orig))


# ----------------------------------------------------------------------------------------------
# Dataset writer
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleSpec:
    subset: str
    label: str
    class_index: int
    index: int  # index within the class
    name: str  # RAF-DB-style file name, e.g. train_00012.jpg


def _sample_rng(seed: int, spec: SampleSpec) -> np.random.Generator:
    return np.random.default_rng([seed, list(SUBSETS).index(spec.subset), spec.class_index, spec.index])


def _jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def generate_one(args: tuple) -> dict:
    """Render one sample and write its files; returns its annotation (picklable for workers)."""
    spec, seed, out, original_size, aligned_size = args
    rng = _sample_rng(seed, spec)
    aus = sample_aus(spec.label, rng)
    idn = Identity.sample(rng)
    r = render_sample(aus, idn, rng, original_size=original_size, aligned_size=aligned_size)
    root = Path(out) / spec.subset
    stem = Path(spec.name).stem
    (root / "Image" / "original" / spec.name).write_bytes(_jpeg(r.original))
    (root / "Image" / "aligned" / f"{stem}_aligned.jpg").write_bytes(_jpeg(r.aligned))
    # RAF-DB manual-landmark format: 5 lines "x<TAB>y", then gender, race, age (synthetic values).
    lm_lines = "".join(f"{x:.2f}\t{y:.2f}\n" for x, y in r.landmarks_original)
    meta = rng.integers(0, [3, 3, 5])
    (root / "Annotation" / "manual" / f"{stem}_manu_attri.txt").write_text(
        lm_lines + f"{meta[0]}\n{meta[1]}\n{meta[2]}\n")
    return {"name": spec.name, "label": spec.label, "aus": {au_key(k): round(v, 4) for k, v in aus.items()},
            "landmarks_aligned": r.landmarks_aligned.round(3).tolist()}


def plan_samples(subset: str, per_class: int, test_fraction: float, seed: int) -> list[SampleSpec]:
    """RAF-DB-style names: per class, ``round(per_class * test_fraction)`` go to test; names shuffled."""
    label_set = get_label_set(SUBSETS[subset])
    entries = {"train": [], "test": []}
    for ci, label in enumerate(label_set.classes):
        n_test = int(round(per_class * test_fraction))
        for k in range(per_class):
            entries["test" if k < n_test else "train"].append((label, ci, k))
    rng = np.random.default_rng([seed, 1000 + list(SUBSETS).index(subset)])
    specs = []
    for split in ("train", "test"):
        order = rng.permutation(len(entries[split]))
        for n, j in enumerate(order, 1):
            label, ci, k = entries[split][j]
            specs.append(SampleSpec(subset, label, ci, k, f"{split}_{n:05d}.jpg"))
    return specs


def generate(out: str | Path, *, per_class: int = 100, seed: int = 0, test_fraction: float = 0.2,
             subsets: tuple[str, ...] = ("basic", "compound"), original_size: int = 192, aligned_size: int = 112,
             workers: int = 1, progress: bool = True) -> dict:
    """Write SynthCE to ``out``; return a summary with counts and the generation rate."""
    out = Path(out)
    summary = {"version": SYNTH_VERSION, "seed": seed, "per_class": per_class, "test_fraction": test_fraction,
               "original_size": original_size, "aligned_size": aligned_size, "subsets": {}}
    t0, n_total = time.perf_counter(), 0
    claim_output(out, subsets)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "synthce.json", json.dumps({**summary, "complete": False}, indent=2) + "\n")
    for subset in subsets:
        root = out / subset
        for d in ("EmoLabel", "Image/original", "Image/aligned", "Annotation/manual"):
            (root / d).mkdir(parents=True, exist_ok=True)
        specs = plan_samples(subset, per_class, test_fraction, seed)
        jobs = [(s, seed, str(out), original_size, aligned_size) for s in specs]
        bar = tqdm(total=len(jobs), desc=f"SynthCE {subset}", unit="img", disable=not progress)
        if workers > 1:
            with start_workers() as ctx:
                pool = ctx.Pool(workers, initializer=ignore_interrupts)
            with pool:
                results = []
                for res in pool.imap(generate_one, jobs, chunksize=16):
                    results.append(res)
                    bar.update()
        else:
            results = []
            for job in jobs:
                results.append(generate_one(job))
                bar.update()
        bar.close()
        label_set = get_label_set(SUBSETS[subset])
        atomic_write_text(root / "EmoLabel" / "list_patition_label.txt",
                          "".join(f"{r['name']} {label_set.name_to_id[r['label']]}\n" for r in results))
        header = "image," + ",".join(au_key(a) for a in AU_IDS)
        rows = [f"{r['name']}," + ",".join(f"{r['aus'][au_key(a)]:.4f}" for a in AU_IDS) for r in results]
        atomic_write_text(root / "Annotation" / "aus.csv", header + "\n" + "\n".join(rows) + "\n")
        summary["subsets"][subset] = {"label_set": label_set.name, "samples": len(results),
                                      "train": sum(r["name"].startswith("train_") for r in results),
                                      "test": sum(r["name"].startswith("test_") for r in results)}
        n_total += len(results)
        write_sample_sheet(out / f"sample_sheet_{subset}.png", root, results, label_set.classes)
    atomic_write_text(out / "synthce.json", json.dumps({**summary, "complete": True}, indent=2) + "\n")
    elapsed = time.perf_counter() - t0
    summary["seconds"] = elapsed
    summary["samples_per_second"] = n_total / elapsed if elapsed else float("inf")
    return summary


SYNTH_FILE = re.compile(r"^(train|test)_\d{5}(\.jpg|_aligned\.jpg|_manu_attri\.txt)$")
SYNTH_DIRS = ("Image/original", "Image/aligned", "Annotation/manual")


def claim_output(out: Path, subsets: tuple[str, ...]) -> None:
    """Make ``out`` ready for a new SynthCE: remove the sample files an earlier SynthCE wrote there, so an
    interrupted run with more samples leaves none behind; refuse a folder cervl did not write.

    A SynthCE folder is recognised by its ``synthce.json`` (written before the first image); only files
    named as SynthCE names them are removed.
    """
    ours = (out / "synthce.json").is_file()
    for subset in subsets:
        for d in SYNTH_DIRS:
            folder = out / subset / d
            files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
            if files and not ours:
                raise InvalidInput(f"{out} holds files that cervl did not write ({folder} has {len(files)}, and "
                                   f"there is no synthce.json): choose a new or empty --out")
            for p in files:
                if SYNTH_FILE.match(p.name):
                    p.unlink()


def write_sample_sheet(path: Path, root: Path, results: list[dict], classes: tuple[str, ...], cell: int = 200) -> None:
    """A PNG grid with one sample per class (aligned crop beside its original), labelled.

    For each class the training sample with the strongest required AUs is shown, so the sheet
    displays what the class looks like rather than its faintest instance.
    """
    best = {}
    for r in results:
        req = PROTOTYPES[r["label"]].required
        score = np.mean([r["aus"][au_key(a)] for a in req]) if req else -np.mean(list(r["aus"].values()))
        if r["label"] not in best or score > best[r["label"]][0]:
            best[r["label"]] = (score, r["name"])
    cols = 4 if len(classes) <= 8 else 6
    rows = math.ceil(len(classes) / cols)
    pad, text_h, head = 6, 22, 28
    sheet = Image.new("RGB", (cols * (2 * cell + pad) + pad, head + rows * (cell + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    draw.text((pad, 6), "Each pair: the aligned crop (left, 5-point template) and the original image it was "
              "cut from (right); one sample per class, the one with the strongest required AUs.",
              fill="black", font=font)
    for i, label in enumerate(classes):
        name = best[label][1]
        x = pad + (i % cols) * (2 * cell + pad)
        y = head + pad + (i // cols) * (cell + text_h + pad)
        with Image.open(root / "Image" / "aligned" / f"{Path(name).stem}_aligned.jpg") as al:
            sheet.paste(al.convert("RGB").resize((cell, cell), Image.BICUBIC), (x, y))
        with Image.open(root / "Image" / "original" / name) as orig:
            sheet.paste(orig.convert("RGB").resize((cell, cell), Image.BICUBIC), (x + cell, y))
        for dx, tag in ((0, "aligned"), (cell, "original")):
            draw.rectangle((x + dx, y, x + dx + 8 * len(tag) + 6, y + 16), fill="white")
            draw.text((x + dx + 3, y + 1), tag, fill="black", font=small)
        draw.text((x + 2, y + cell + 3), f"{label}  ({name})", fill="black", font=font)
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    path.write_bytes(buf.getvalue())
