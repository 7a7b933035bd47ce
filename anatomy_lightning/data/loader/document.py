"""From a file on disk to raw records: UTF-8 text, any line ending, a JSON list, a wrapping object, or JSON Lines.

Nothing here knows a question format; every record keeps where it came from ("record 3" in a
JSON list, 0-based, or "line 4" in JSON Lines, 1-based) so later messages can point at it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from anatomy_lightning.data.loader.fields import kind
from anatomy_lightning.data.loader.report import INVALID_JSON, TRUNCATED, RecordProblem
from anatomy_lightning.data.schema import DataError

WRAPPER_KEYS = ("data", "questions", "records", "items", "annotations")


class Raw(NamedTuple):
    where: str  # "record 3" (JSON list, 0-based) or "line 4" (JSONL, 1-based)
    index: int
    value: Any
    problem: RecordProblem | None = None


def read_text(path: Path) -> str:
    """The file as text with every line ending (CRLF, CR-only) turned into LF.

    A raw CR can only sit between JSON tokens (inside a string it must be escaped), so turning it
    into LF never changes a record; it lets CR-only JSON Lines files (old Mac exports) split into lines.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (working directory {os.getcwd()}); check the path") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a question file; give the .json/.jsonl file inside it") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from None
    offset = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte order mark is fine
    try:
        text = data[offset:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = e.start + offset
        line = data.count(b"\n", 0, at) + 1
        raise DataError(
            f"{path}: not UTF-8 text: byte 0x{data[at]:02x} at byte offset {at} (line {line}) is not valid UTF-8; "
            "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`)"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _json_error(path: Path, text: str, e: json.JSONDecodeError) -> DataError:
    body = text.rstrip()
    closer = "]" if body.lstrip().startswith("[") else "}"
    if not body.endswith(closer) or e.pos >= len(body):
        return DataError(
            f"{path}: the file ends before the JSON is complete (truncated; parser stopped at line {e.lineno}, "
            f"column {e.colno}: {e.msg}); re-export or re-download the file"
        )
    return DataError(
        f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}; fix the file there "
        "(a JSON list needs commas between records; JSON Lines needs one record per line)"
    )


def parse_document(path: Path, text: str, looks_like_record: Any = None) -> list[Raw]:
    """Records of a JSON list, an object wrapping one list, a single pretty-printed object, or JSON Lines.

    `looks_like_record(obj) -> bool` tells a lone question record (whose own lists are options or
    images) from an object that wraps the records under some key.
    """
    head = text.lstrip()
    if not head:
        raise DataError(f"{path}: the file is empty; expected a JSON list of records or JSON Lines")
    if head[0] == "{" and "\n" in text.strip():
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            return _parse_jsonl(text)  # JSON Lines (several objects): parsed line by line below
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if head[0] == "{":  # a single JSONL line
                return _parse_jsonl(text)
            raise _json_error(path, text, e) from None
    if isinstance(doc, dict):
        doc = _unwrap(path, doc, looks_like_record)
    if not isinstance(doc, list):
        raise DataError(f"{path}: the top level is {kind(doc)}; expected a JSON list of records or JSON Lines")
    return [Raw(f"record {i}", i, rec) for i, rec in enumerate(doc)]


def _unwrap(path: Path, doc: dict[str, Any], looks_like_record: Any) -> list[Any]:
    """The record list inside a top-level object: a known wrapper key, else the one list of objects in it."""
    for key in WRAPPER_KEYS:
        if isinstance(doc.get(key), list):
            return doc[key]
    if looks_like_record is not None and looks_like_record(doc):
        return [doc]
    lists = {k: v for k, v in doc.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)}
    if len(lists) == 1:
        return next(iter(lists.values()))
    if len(lists) > 1:
        found = ", ".join(f"{k!r} ({len(v)} objects)" for k, v in lists.items())
        raise DataError(
            f"{path}: the top level is an object with several lists of records: {found}; "
            "keep one list per file (e.g. one file per split) or make the file a JSON list"
        )
    return [doc]  # a single record; the format check says what it lacks


def _parse_jsonl(text: str) -> list[Raw]:
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"line {i + 1}"
        try:
            out.append(Raw(where, i + 1, json.loads(line)))
        except json.JSONDecodeError as e:
            if i == last and not text.endswith("\n") and (e.pos >= len(line.rstrip()) or "Unterminated" in e.msg):
                problem = RecordProblem(
                    TRUNCATED, None,
                    "the file ends in the middle of this record (truncated); re-export the file or delete the line",
                )
            else:
                problem = RecordProblem(
                    INVALID_JSON, None,
                    f"invalid JSON at column {e.colno}: {e.msg}; JSON Lines needs one complete object per line",
                )
            out.append(Raw(where, i + 1, None, problem))
    return out
