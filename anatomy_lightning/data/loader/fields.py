"""Reading one field of a record: JSON type names for messages, required text, and `data.fields` mapping.

A field mapping (our field -> their key or dotted path, e.g. ``{"question": "q.text",
"answer": "labels.0"}``) lets any JSON/JSONL file with other names be read by an existing reader:
the mapped values are copied under our names before the reader sees the record, and problems name
their key ("field \\"labels.0\\" (data.fields.answer)").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from anatomy_lightning.data.loader.report import MISSING, WRONG_TYPE, RecordProblem
from anatomy_lightning.data.schema import DataError

_ABSENT = object()
ABSENT = _ABSENT  # what `lookup` returns for a key the record lacks


def kind(value: Any) -> str:
    """A value's JSON type name, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def short(text: Any, n: int = 60) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def text_field(rec: Mapping[str, Any], name: str) -> str:
    """A required text field."""
    value = rec.get(name)
    if value is None:
        raise RecordProblem(MISSING, name, "is missing; every record of this format needs it")
    if not isinstance(value, str):
        raise RecordProblem(WRONG_TYPE, name, f"expected text, got {kind(value)}")
    return value


def lookup(rec: Any, path: str) -> Any:
    """The value at a key or dotted path ("answer.correct_answer", "labels.0"), or `_ABSENT`.

    A key that itself contains dots is found first, so {"a.b": 1} still works with "a.b".
    """
    if isinstance(rec, dict) and path in rec:
        return rec[path]
    value = rec
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return _ABSENT
    return value


class FieldMap:
    """`data.fields`: our field name -> their key or dotted path, checked once and applied per record."""

    def __init__(self, fields: Mapping[str, str] | None) -> None:
        fields = dict(fields or {})
        bad = [f"{k!r}: {v!r}" for k, v in fields.items()
               if not (isinstance(k, str) and k.strip() and isinstance(v, str) and v.strip())]
        if bad:
            raise DataError(
                f"data.fields must map our field names to their key or dotted path (text -> text); bad entries: "
                f"{', '.join(bad)}"
            )
        self.fields = fields
        self._theirs = {ours: theirs for ours, theirs in fields.items() if ours != theirs}

    def __bool__(self) -> bool:
        return bool(self.fields)

    def apply(self, rec: dict[str, Any]) -> dict[str, Any]:
        """A copy of `rec` with each mapped value under our name (absent when their path is absent)."""
        if not self._theirs:
            return rec
        out = dict(rec)
        for ours, theirs in self._theirs.items():
            value = lookup(rec, theirs)
            if value is _ABSENT:
                out.pop(ours, None)
            else:
                out[ours] = value
        return out

    def used(self) -> set[str]:
        """Their top-level keys consumed by the mapping (kept out of a question's metadata)."""
        return {theirs.split(".")[0] for theirs in self._theirs.values()}

    def name(self, field: str | None) -> str | None:
        """How a problem names a field: their key, with the mapping entry it came from."""
        if field is None:
            return None
        root, sep, rest = field.partition(".")
        bracket = root.find("[")
        if bracket > 0:
            root, rest, sep = root[:bracket], root[bracket:] + (sep + rest if rest else ""), ""
        if root not in self._theirs:
            return field
        return f"{self._theirs[root]}{sep}{rest} (data.fields.{root})"
