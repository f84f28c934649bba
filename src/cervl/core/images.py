"""The one image loader: every stage (prepare, align, train, predict, serve) reads images through it.

It applies the EXIF orientation (phone photos are often stored rotated), converts to RGB (grayscale,
CMYK, palette and alpha images are converted, not rejected), and rejects images that Qwen-VL's image
processor cannot take, with a message that names the file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, ImageOps

from cervl.core.errors import InvalidInput

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # the files a folder input lists

# Qwen-VL's smart_resize refuses an absolute aspect ratio of 200 or more; a face crop never has one.
MAX_ASPECT = 200


class ImageError(InvalidInput):
    """An image that cannot be decoded or used; the message names it."""


def _name(source) -> str:
    return "<bytes>" if isinstance(source, (bytes, bytearray, io.BytesIO)) else str(source)


def check_aspect(im: Image.Image, source="image") -> None:
    """Raise :class:`ImageError` for a size Qwen-VL's processor cannot handle."""
    w, h = im.size
    if min(w, h) < 1 or max(w, h) / min(w, h) >= MAX_ASPECT:
        raise ImageError(f"{_name(source)}: image of {w}x{h} pixels has an aspect ratio of {max(w, h) / max(min(w, h), 1):.0f}:1; "
                         f"Qwen-VL takes less than {MAX_ASPECT}:1 (crop or pad it)")


def to_rgb(im: Image.Image, source="image") -> Image.Image:
    """EXIF-upright RGB copy of an opened image."""
    try:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")  # composite on white: a transparent background is not black
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, rgba)
        rgb = im.convert("RGB")
        rgb.load()
    except (OSError, ValueError, SyntaxError) as e:  # truncated / corrupt data surfaces at load time
        raise ImageError(f"{_name(source)}: cannot decode image: {e}") from None
    check_aspect(rgb, source)
    return rgb


def load_rgb(source: str | os.PathLike | bytes | Image.Image) -> Image.Image:
    """Read an image file (or bytes, or an opened PIL image) as upright RGB; errors name the file."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    try:
        fh = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else Path(source)
        with Image.open(fh) as im:
            return to_rgb(im, source)
    except ImageError:
        raise  # already names the file (an InvalidInput, hence a ValueError: keep it out of the clause below)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise ImageError(f"{_name(source)}: {e.strerror or e}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{_name(source)}: not an image file (or a format PIL cannot read)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{_name(source)}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # a header cut short or corrupt
        raise ImageError(f"{_name(source)}: cannot decode image: {e}") from None


def file_hash(path) -> str:
    """An image file's identity for caches (the vision cache's key): a hash of its bytes."""
    import hashlib

    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) after the EXIF orientation, from the header only (fast)."""
    with Image.open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def image_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be used for training, or None: a full decode (truncation shows only there)."""
    try:
        load_rgb(path)
    except ImageError as e:
        return str(e)
    return None


def check_images(paths: list, *, progress: bool = False) -> dict:
    """``{path: reason}`` for every image that cannot be used; all of them, not just the first."""
    from tqdm import tqdm

    bad = {}
    for p in tqdm(paths, desc="checking images", unit="img", disable=not progress, leave=False):
        reason = image_problem(p)
        if reason:
            bad[p] = reason
    return bad
