"""What every reader gets (`Context`) and returns (`Parsed`): the contract a new format's reader fills in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


@dataclass
class Context:
    path: str
    stem: str  # the file name without suffix: ids default to "<stem>:<record>"
    base: str  # the data file's folder: relative image paths are resolved against it
    root: str | None  # image_root, absolute
    format: str
    answer_optional: bool = False  # `predict` reads unlabelled records (answer_index None); nothing else does


class Parsed(NamedTuple):
    """One record read by a format's `parse`; `load_questions` turns it into a `Question`."""

    question: str  # the bare stem
    options: list[str]  # texts in their original order, markers stripped (`options.clean_options`)
    answer_index: int | None  # None: an unlabelled record (`Context.answer_optional`)
    images: list[str]  # resolved paths (`paths.record_images`)
    extra: dict[str, Any]  # goes into metadata
    id: str | None
    options_field: str  # named in option problems


def record_id(rec: dict[str, Any], *names: str) -> str | None:
    """The first of `names` holding a usable id (text or integer, not empty)."""
    for n in names:
        value = rec.get(n)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            return str(value)
    return None


def extra_fields(rec: dict[str, Any], used: set[str]) -> dict[str, Any]:
    """The record's other keys, kept as metadata."""
    return {k: v for k, v in rec.items() if k not in used}
