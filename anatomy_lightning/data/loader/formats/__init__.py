"""One reader per question format, and auto-detection from the records' keys.

A reader is a module with `NAME`, `matches(record) -> bool` (does a record unambiguously look like
this format?) and `parse(record, ctx) -> Parsed` (raise `RecordProblem` naming the field at
fault). To add a format, copy `generic.py`, change the three, and list the module in `READERS`:
the order is the detection priority, most specific first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from types import ModuleType
from typing import Any

from anatomy_lightning.data.loader.base import Context, Parsed
from anatomy_lightning.data.loader.formats import (
    anatomy_r1,
    easyr1,
    generic,
    medvlm_r1,
    medxpertqa,
    omnimedvqa,
    r1,
)

# detection order: MedVLM-R1 records also carry R1's `problem` and generic's `question`/`options`,
# MedXpertQA's carry generic's `question`/`options`; so the specific readers go first
READERS: tuple[ModuleType, ...] = (anatomy_r1, easyr1, omnimedvqa, medvlm_r1, medxpertqa, r1, generic)
PARSERS: dict[str, Callable[[dict[str, Any], Context], Parsed]] = {m.NAME: m.parse for m in READERS}
FORMATS = ("auto", *(m.NAME for m in READERS))
DETECT_RECORDS = 20  # how many leading records vote on the format


def format_of(rec: dict[str, Any]) -> str | None:
    """The first reader that claims the record, or None."""
    return next((m.NAME for m in READERS if m.matches(rec)), None)


def detect_format(records: list[Any]) -> str | None:
    """The format most of the first records look like, or None."""
    votes = Counter(f for f in (format_of(r) for r in records[:DETECT_RECORDS] if isinstance(r, dict)) if f)
    return votes.most_common(1)[0][0] if votes else None
