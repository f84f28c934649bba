"""Pictures of saliency maps: one image's top classes, per-class means, confused-pair differences.

Maps are drawn as a heat overlay on the face: only positive values (regions that *raise* the class's
probability) are coloured, with opacity growing with the value, so the face stays readable. Every
figure states the method, the units (probability points) and n.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from cervl.core.plotting import matplotlib  # noqa: F401  (Agg backend)


def overlay(face: Image.Image, saliency: np.ndarray, vmax: float | None = None, *, signed: bool = False) -> Image.Image:
    """The face with ``saliency`` (resized to it) as a heat overlay; ``vmax``: the value drawn fully opaque.

    ``signed``: also colour negative values (blue), for difference maps.
    """
    from matplotlib import colormaps

    face = face.convert("RGB")
    s = np.asarray(Image.fromarray(saliency.astype(np.float32), mode="F").resize(face.size, Image.BILINEAR))
    vmax = vmax or float(np.abs(s).max()) or 1.0
    base = np.asarray(face, dtype=np.float32) / 255
    if signed:
        rgba = colormaps["coolwarm"](np.clip(s / vmax, -1, 1) * 0.5 + 0.5)
        alpha = np.clip(np.abs(s) / vmax, 0, 1)[..., None] * 0.75
    else:
        rgba = colormaps["inferno"](np.clip(s / vmax, 0, 1))
        alpha = np.clip(s / vmax, 0, 1)[..., None] * 0.75
    out = base * (1 - alpha) + rgba[..., :3] * alpha
    return Image.fromarray((out * 255).round().astype(np.uint8))


def heat_rgba(saliency: np.ndarray, size: tuple[int, int], vmax: float | None = None) -> Image.Image:
    """A transparent PNG layer (for the web page): the positive map in colour, opacity by value."""
    from matplotlib import colormaps

    s = np.asarray(Image.fromarray(saliency.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
    vmax = vmax or float(s.max()) or 1.0
    v = np.clip(s / vmax, 0, 1)
    rgba = colormaps["inferno"](v)
    rgba[..., 3] = v * 0.75
    return Image.fromarray((rgba * 255).round().astype(np.uint8), mode="RGBA")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def explanation_figure(face: Image.Image, expl, names: tuple[str, ...], path: Path, *, title: str = "") -> Path:
    """One image: the face, then each explained class's map over it with its probability."""
    import matplotlib.pyplot as plt

    n = len(expl.classes)
    fig, axes = plt.subplots(1, n + 1, figsize=(2.4 * (n + 1), 2.9))
    vmax = float(max(expl.maps.max(), 1e-9))  # one colour scale per figure: maps are comparable
    axes[0].imshow(face)
    axes[0].set_title("aligned face", fontsize=9)
    for ax, k, m in zip(axes[1:], expl.classes, expl.maps):
        ax.imshow(overlay(face, m, vmax))
        ax.set_title(f"{names[k]}\np = {expl.probs[k]:.2f}", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f"where the model looks ({expl.method}; colour: probability drop, max {vmax:.3f})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def map_grid(panels: list[tuple[str, Image.Image, np.ndarray]], path: Path, *, title: str, signed: bool = False,
             cols: int = 6) -> Path:
    """A grid of (caption, face, map) panels on one colour scale (per-class means, pair differences)."""
    import matplotlib.pyplot as plt

    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.8 * rows + 0.4), squeeze=False)
    vmax = max((float(np.abs(m).max()) for _, _, m in panels), default=1.0) or 1.0
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (caption, face, m) in zip(axes.ravel(), panels):
        ax.imshow(overlay(face, m, vmax, signed=signed))
        ax.set_title(caption, fontsize=8)
    fig.suptitle(f"{title}\n(colour scale max {vmax:.3f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["explanation_figure", "heat_rgba", "map_grid", "overlay", "png_bytes"]
