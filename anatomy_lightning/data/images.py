"""Open any dataset image as 8-bit RGB, or raise a `DataError` naming the file and the reason.

Medical datasets mix modes: 16-bit greyscale PNGs (X-ray, CT slices), CMYK JPEGs, palette and
RGBA screenshots. The policy's processor wants RGB, and a silent wrong conversion (a 12-bit image
clipped to white, a transparent background turned black) would change what the model sees.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from anatomy_lightning.data.schema import DataError, Question

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
    if Path(path).is_dir():
        raise DataError(f"{path}: is a folder, not an image file; the record should name an image inside it")
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


class ImageCache:
    """Decoded images by path, so a small (synthetic) set is decoded once per run, not once per step."""

    def __init__(self, max_items: int = 4096) -> None:
        self.max_items, self._images = max_items, {}

    def load(self, path: str) -> Image.Image:
        img = self._images.get(path)
        if img is None:
            img = load_image(path)
            if len(self._images) < self.max_items:
                self._images[path] = img
        return img


def check_image(path: str | os.PathLike[str]) -> str | None:
    """A cheap check (header and checksums, no decode): None if fine, else the problem message."""
    issue = probe_image(path)
    return None if issue is None else f"{path}: {issue.detail}"


# -- pre-flight: every image of a set opened once ------------------------------------------------

MISSING_IMAGE, FOLDER, ZERO_SIZE, UNDECODABLE = "missing", "folder", "zero size", "undecodable"


@dataclass
class ImageIssue:
    path: str
    kind: str  # one of MISSING_IMAGE, FOLDER, ZERO_SIZE, UNDECODABLE
    detail: str


def probe_image(path: str | os.PathLike[str]) -> ImageIssue | None:
    """Open one image far enough to know its size and mode (header plus `verify()`), no pixel decode.

    A folder is not "missing": a path like "VID01/" usually means the record names a frame folder
    or a path was cut short, and the fix differs.
    """
    p = str(path)
    if os.path.isdir(p):
        return ImageIssue(p, FOLDER, "is a folder, not an image file")
    try:
        size = os.path.getsize(p)
    except OSError:
        return ImageIssue(p, MISSING_IMAGE, "image file not found")
    if size == 0:
        return ImageIssue(p, ZERO_SIZE, "is an empty file (0 bytes)")
    try:
        with Image.open(p) as img:  # reads the header: size and mode
            img.verify()  # checksums and structure, without decoding the pixels
    except _UNREADABLE as e:
        return ImageIssue(p, UNDECODABLE, f"not a readable image ({type(e).__name__}: {e})")
    return None


def probe_images(paths: Iterable[str], workers: int = 8) -> dict[str, ImageIssue]:
    """`probe_image` on every distinct path, in a thread pool (file reads dominate): path -> issue."""
    unique = list(dict.fromkeys(paths))
    if not unique:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(unique)))) as pool:
        found = pool.map(probe_image, unique)
    return {issue.path: issue for issue in found if issue is not None}


def issues_by_kind(issues: dict[str, ImageIssue], questions: list[Question], unit: str = "record",
                   shown: int = 3) -> dict[str, dict[str, Any]]:
    """kind -> {"count": distinct paths, "examples": the first records with that kind of issue}."""
    out: dict[str, dict[str, Any]] = {}
    for q in questions:
        for p in q.images:
            issue = issues.get(p)
            if issue is not None:
                examples = out.setdefault(issue.kind, {"count": 0, "examples": []})["examples"]
                if len(examples) < shown:
                    examples.append(f"{unit} {q.metadata.get('record')} (id {q.id!r}): image {p} {issue.detail}")
    for issue in issues.values():
        if issue.kind in out:
            out[issue.kind]["count"] += 1
    return out


_WORDS = {MISSING_IMAGE: "image files are missing", FOLDER: "image paths are folders",
          ZERO_SIZE: "image files are empty (0 bytes)", UNDECODABLE: "image files cannot be decoded"}


def describe_image_issues(issues: dict[str, ImageIssue], questions: list[Question], path: str,
                          unit: str = "record") -> str:
    """One message for a data file: counts per kind, then the first records with each kind of issue."""
    grouped = issues_by_kind(issues, questions, unit)
    head = ", ".join(f"{g['count']} {_WORDS[k]}" for k, g in grouped.items())
    return "\n".join([f"{path}: {head}", *(f"  {m}" for g in grouped.values() for m in g["examples"])])
