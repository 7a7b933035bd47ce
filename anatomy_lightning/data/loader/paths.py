"""Image paths of a record: one path, a list of paths, or a list of objects ({"image_path": ...}), resolved."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from anatomy_lightning.data.loader.base import Context
from anatomy_lightning.data.loader.fields import kind, short
from anatomy_lightning.data.loader.report import ESCAPES, WRONG_TYPE, RecordProblem

PATH_KEYS = ("image_path", "path", "image", "file")  # the path inside an image object


def _within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def resolve_image(raw: str, base: str, root: str | None, name: str = "images") -> str:
    """Where an image path from a record points to on this machine.

    Without `root`, relative paths are taken from the data file's folder. With it, relative paths
    and dataset-absolute paths that do not exist here ("/CholecT45/data/VID66/000791.png") are
    looked up under `root`: the whole path first, then shorter tails (at least folder/file), so
    root may point at any level of the dataset's tree. A path escaping `root` via ".." is an error
    (absolute ones included: "/../../etc/passwd" is read as relative to `root`).
    """
    path = raw.strip()
    if root is None:
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))
    if os.path.isabs(path):
        if os.path.exists(path) and ".." not in Path(path).parts:
            return path
        path = path.lstrip("/\\")
    candidate = os.path.normpath(os.path.join(root, path))
    if not _within(candidate, root):
        raise RecordProblem(
            ESCAPES, name, f"{short(raw)} points outside image_root {root} (via '..'); fix the path or image_root"
        )
    if os.path.exists(candidate):
        return candidate
    parts = Path(os.path.relpath(candidate, root)).parts
    for k in range(1, len(parts) - 1):
        tail = os.path.join(root, *parts[k:])
        if os.path.exists(tail):
            return tail
    return candidate




def _path_of(item: Any, name: str, i: int) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        key = next((k for k in PATH_KEYS if isinstance(item.get(k), str)), None)
        if key is not None:
            return item[key]
        raise RecordProblem(WRONG_TYPE, f"{name}[{i}]", f"an image object needs one of the keys {list(PATH_KEYS)} "
                                                        f"holding the path, got keys {sorted(item)}")
    raise RecordProblem(WRONG_TYPE, f"{name}[{i}]", f"expected an image path, got {kind(item)}")


def record_images(rec: dict[str, Any], ctx: Context, names: tuple[str, ...] = ("images", "image")) -> list[str]:
    """Every image of a record, in order (multi-image questions keep all of them), resolved."""
    name = next((n for n in names if rec.get(n) is not None), None)
    if name is None:
        return []
    value = rec[name]
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise RecordProblem(WRONG_TYPE, name, f"expected an image path or a list of paths, got {kind(value)}")
    paths = [_path_of(item, name, i) for i, item in enumerate(value)]
    return [resolve_image(p, ctx.base, ctx.root, name) for p in paths if p.strip()]
