"""Open any dataset image as 8-bit RGB, or raise a `DataError` naming the file and the reason.

Medical datasets mix modes: 16-bit greyscale PNGs (X-ray, CT slices), CMYK JPEGs, palette and
RGBA screenshots. The policy's processor wants RGB, and a silent wrong conversion (a 12-bit image
clipped to white, a transparent background turned black) would change what the model sees.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from anatomy_lightning.data.schema import DataError

_WIDE = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # more than 8 bits per pixel
_UNREADABLE = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


def _stretch(img: Image.Image) -> Image.Image:
    """16/32-bit -> 8-bit by the image's own min..max: such images rarely use their full range."""
    arr = np.asarray(img, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi > lo:
        arr = (arr - lo) * (255.0 / (hi - lo))
    else:  # a flat image: keep its level if it fits in 8 bits
        arr = np.full_like(arr, min(max(lo, 0.0), 255.0))
    return Image.fromarray(np.clip(arr.round(), 0, 255).astype(np.uint8), "L")


def _on_white(img: Image.Image) -> Image.Image:
    """Transparent pixels over a white background (how viewers show them), not over black."""
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `img` whatever its mode."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode in _WIDE:
        return _stretch(img).convert("RGB")
    if img.mode == "P":
        return _on_white(img) if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _on_white(img)
    if img.mode == "1":
        return img.convert("L").convert("RGB")
    return img.convert("RGB")  # L, CMYK, YCbCr, ...


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """The image at `path` as RGB (EXIF orientation applied); DataError if missing or unreadable."""
    if not Path(path).is_file():
        raise DataError(f"{path}: image file not found; check data.image_root and the record's image path")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return to_rgb(img)
    except _UNREADABLE as e:
        raise DataError(
            f"{path}: cannot read the image ({type(e).__name__}: {e}); the file is corrupt or not an image, "
            "replace it or drop the record"
        ) from None


def check_image(path: str | os.PathLike[str]) -> str | None:
    """A cheap check (header and checksums, no decode): None if fine, else the problem message."""
    if not Path(path).is_file():
        return f"{path}: image file not found"
    try:
        with Image.open(path) as img:
            img.verify()
    except _UNREADABLE as e:
        return f"{path}: not a readable image ({type(e).__name__}: {e})"
    return None
