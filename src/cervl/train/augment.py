"""Training-time augmentation, declared per stage in the recipe; deterministic for (seed, epoch, sample).

```yaml
augment: {flip: 0.5, affine: {scale: 0.1, shift: 0.05, rotate: 10}, color: 0.2, blur: 0.1, jpeg: [60, 95],
          erase: 0.25}
augment: {preset: frame}                      # framing as a detector gives it (values below)
augment: {align_noise: {file: errors.json}}   # re-align originals from landmarks + measured detector error
```

Every view is drawn from its own generator, seeded by (stage seed, epoch, position in the epoch's
stream), so a resumed stage sees the same bytes (``kill -9`` resume stays bit-identical) and another
epoch sees another view. With ``views: N`` each image instead has N fixed views (seeded by the image
and the view number; each epoch picks one): the vision-feature cache can then keep them, keyed by image
*and* view. With ``views: 0`` (default) augmented images are never cached, so a cache hit can never
return another view's features.

Alignment noise is the remedy aimed at the measured aligned-versus-original gap: a record that has its
original image and true landmarks (SynthCE, RAF-DB's manual annotations) is aligned from those landmarks
plus an offset drawn from the detector's measured errors (``cervl landmark-error``), so training sees
the crops the detector will give at prediction time. The landmarks are always those of the image the
record names, in its pixels (:meth:`cervl.data.manifest.Record.landmarks_for_image`): an aligned crop
(``cervl align`` output) is re-aligned from its own points, so with zero noise its view is the crop itself
and the noise moves it by the small similarity the offsets imply. The crop is used rather than its
``source``: a source can be a video or absent where the dataset was moved, and a view must depend only on the
record's image.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps


@dataclass
class AffineSpec:
    """Random similarity about the centre: scale by 1 ± ``scale``, shift by ± ``shift`` of the side,
    rotate by ± ``rotate`` degrees (uniform)."""

    scale: float = 0.0
    shift: float = 0.0
    rotate: float = 0.0


@dataclass
class AlignNoiseSpec:
    """``file``: landmark errors written by ``cervl landmark-error``; ``p``: share of the landmark records
    aligned from perturbed landmarks (the rest from their true landmarks); ``size``: crop side."""

    file: str
    p: float = 1.0
    size: int = 112


@dataclass
class AugmentSpec:
    """A stage's augmentation (training only); a ``preset`` fills every key left at its default."""

    preset: str | None = None
    flip: float = 0.0  # probability of a horizontal flip
    affine: AffineSpec = field(default_factory=AffineSpec)
    color: float = 0.0  # brightness, contrast and saturation each scaled by 1 ± color
    blur: float = 0.0  # probability of a Gaussian blur (sigma 0.3-1.2 px)
    jpeg: list[int] = field(default_factory=list)  # [low, high]: re-encode at a quality drawn from the range
    erase: float = 0.0  # probability of erasing one rectangle (2-15% of the area) with noise
    align_noise: AlignNoiseSpec | None = None
    views: int = 0  # 0: a fresh view every time (never cached); N > 0: N fixed views per image (cacheable)

    def active(self) -> bool:
        s = self.resolved()
        return bool(s.flip or s.affine.scale or s.affine.shift or s.affine.rotate or s.color or s.blur or s.jpeg
                    or s.erase or s.align_noise)

    def resolved(self) -> "AugmentSpec":
        """This spec with its preset's values wherever a key was left at its default."""
        if not self.preset:
            return self
        base = PRESETS[self.preset]
        default = AugmentSpec()
        out = AugmentSpec(preset=None, views=self.views, align_noise=self.align_noise or base.align_noise)
        for key in ("flip", "color", "blur", "jpeg", "erase"):
            mine = getattr(self, key)
            setattr(out, key, mine if mine != getattr(default, key) else getattr(base, key))
        out.affine = AffineSpec(**{k: getattr(self.affine, k) or getattr(base.affine, k)
                                   for k in ("scale", "shift", "rotate")})
        return out


# "frame": the framing a face detector gives instead of a perfect 5-point alignment: a few percent of
# scale and shift, a few degrees of roll, mirrored faces, camera colour and compression.
PRESETS: dict[str, AugmentSpec] = {
    "frame": AugmentSpec(flip=0.5, affine=AffineSpec(scale=0.06, shift=0.04, rotate=6.0), color=0.1,
                         jpeg=[70, 95]),
}


def check_spec(spec: AugmentSpec, where: str) -> None:
    """Value checks (the config loader has already refused unknown keys with "did you mean")."""
    from cervl.core.errors import ConfigError
    from cervl.core.registry import suggest

    if spec.preset is not None and spec.preset not in PRESETS:
        raise ConfigError(f"{where}: unknown augment preset {spec.preset!r} (available: {', '.join(PRESETS)})"
                          f"{suggest(spec.preset, PRESETS)}")
    for key in ("flip", "blur", "erase"):
        if not 0 <= getattr(spec, key) <= 1:
            raise ConfigError(f"{where}: 'augment.{key}' is a probability in [0, 1], got {getattr(spec, key)}")
    if not 0 <= spec.color < 1 or spec.affine.scale < 0 or spec.affine.shift < 0 or spec.affine.rotate < 0:
        raise ConfigError(f"{where}: 'augment.color' must be in [0, 1) and the affine ranges >= 0")
    if spec.jpeg and (len(spec.jpeg) != 2 or not 1 <= spec.jpeg[0] <= spec.jpeg[1] <= 100):
        raise ConfigError(f"{where}: 'augment.jpeg' must be [low, high] with 1 <= low <= high <= 100, "
                          f"got {spec.jpeg}")
    if spec.views < 0:
        raise ConfigError(f"{where}: 'augment.views' must be >= 0")
    if spec.align_noise is not None and not 0 <= spec.align_noise.p <= 1:
        raise ConfigError(f"{where}: 'augment.align_noise.p' must be in [0, 1]")


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "little")


class Augmenter:
    """Applies one stage's :class:`AugmentSpec`; ``view(image, record, epoch, index)`` -> (image, view key)."""

    def __init__(self, spec: AugmentSpec, seed: int):
        self.spec, self.seed = spec.resolved(), seed
        self.offsets = None
        if self.spec.align_noise is not None:
            from pathlib import Path

            from cervl.core.errors import InputNotFound, InvalidInput
            from cervl.faces.landmarks import load_offsets

            file = self.spec.align_noise.file
            if not Path(file).is_file():
                raise InputNotFound(f"augment.align_noise.file {file} not found: measure the detector's error on "
                                    f"training originals first: cervl landmark-error MANIFEST --split train -o {file}")
            try:
                self.offsets = load_offsets(file)
            except ValueError as e:
                raise InvalidInput(str(e)) from None

    def key(self, path: str, epoch: int, index: int) -> tuple[int, ...]:
        """The generator seed of a view: (seed, epoch, index), or (seed, image, view) with fixed views."""
        if self.spec.views:
            v = int(np.random.default_rng([self.seed, epoch, index]).integers(self.spec.views))
            return (self.seed, _stable_int(str(path)), v)
        return (self.seed, epoch, index)

    def cache_tag(self, key: tuple[int, ...]) -> str | None:
        """What to add to the image's cache key: the view, or None when the view must not be cached."""
        return f"view{key[-1]}" if self.spec.views else None

    @property
    def uses_landmarks(self) -> bool:
        """Whether views need the record's landmarks (alignment noise), given in the pixels of the image."""
        return self.offsets is not None

    def __call__(self, image: Image.Image, key: tuple[int, ...], landmarks=None) -> Image.Image:
        """The view ``key`` of ``image``; ``landmarks``: five points in ``image``'s pixels (alignment noise)."""
        rng = np.random.default_rng(list(key))
        s = self.spec
        if self.offsets is not None and landmarks is not None:
            image = self._realign(image, np.asarray(landmarks, dtype=np.float64), rng)
        a = s.affine
        if a.scale or a.shift or a.rotate:
            image = _similarity(image, rng.uniform(-a.scale, a.scale), rng.uniform(-a.shift, a.shift, 2),
                                rng.uniform(-a.rotate, a.rotate))
        if s.flip and rng.random() < s.flip:
            image = ImageOps.mirror(image)
        if s.color:
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                image = enhance(image).enhance(1 + rng.uniform(-s.color, s.color))
        if s.blur and rng.random() < s.blur:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
        if s.jpeg:
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=int(rng.integers(s.jpeg[0], s.jpeg[1] + 1)))
            image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        if s.erase and rng.random() < s.erase:
            image = _erase(image, rng)
        return image

    def _realign(self, image: Image.Image, truth: np.ndarray, rng) -> Image.Image:
        from cervl.faces.align import align_face
        from cervl.faces.landmarks import face_frame

        lm = truth
        if rng.random() < self.spec.align_noise.p:
            iod, rot = face_frame(truth)
            off = self.offsets[int(rng.integers(len(self.offsets)))]
            lm = truth + (off @ rot) * iod  # back from the face frame into the image
        return align_face(image, lm, self.spec.align_noise.size)[0]


def _similarity(image: Image.Image, scale: float, shift: np.ndarray, degrees: float) -> Image.Image:
    """``image`` scaled by 1 + scale and rotated about its centre, then shifted (fraction of the side)."""
    w, h = image.size
    angle = math.radians(degrees)
    k = 1 + scale
    c, s = k * math.cos(angle), k * math.sin(angle)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    tx, ty = shift[0] * w, shift[1] * h
    # PIL's affine maps output -> input: invert x' = R(x - c) + c + t
    inv = np.linalg.inv(np.array([[c, -s], [s, c]]))
    ox, oy = inv @ np.array([-cx - tx, -cy - ty]) + np.array([cx, cy])
    return image.transform((w, h), Image.AFFINE, (inv[0, 0], inv[0, 1], ox, inv[1, 0], inv[1, 1], oy),
                           resample=Image.BILINEAR, fillcolor=tuple(int(v) for v in np.asarray(image)[0, 0]))


def _erase(image: Image.Image, rng) -> Image.Image:
    arr = np.asarray(image).copy()
    h, w = arr.shape[:2]
    area = rng.uniform(0.02, 0.15) * h * w
    ratio = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
    eh, ew = min(h, int(round(math.sqrt(area * ratio)))), min(w, int(round(math.sqrt(area / ratio))))
    y, x = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
    arr[y:y + eh, x:x + ew] = rng.integers(0, 256, (eh, ew, arr.shape[2]), dtype=np.uint8)
    return Image.fromarray(arr)


def augment_grid(images: list[Image.Image], path, *, title: str, cols: int = 8):
    """A PNG grid of augmented training samples (``stages/NN/augment.png``): what the model sees."""
    from cervl.core.plotting import matplotlib  # noqa: F401  (Agg)
    import matplotlib.pyplot as plt

    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.6 * rows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, im in zip(axes.ravel(), images):
        ax.imshow(im)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["AffineSpec", "AlignNoiseSpec", "AugmentSpec", "Augmenter", "PRESETS", "augment_grid", "check_spec"]
