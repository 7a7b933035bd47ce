"""Generic JSON list or JSONL: `question`, `options` (a list, or a letter -> text mapping), `answer`
(letter or text), `image`/`images`, optional `id` and `metadata`. This is what
`Question.to_record()` writes, and what `data.fields` maps other column names onto.

The smallest reader: copy this file to add a format (see `formats/__init__.py`)."""

from __future__ import annotations

from typing import Any

from anatomy_lightning.data.loader.base import Context, Parsed, extra_fields, record_id
from anatomy_lightning.data.loader.fields import kind, text_field
from anatomy_lightning.data.loader.inline import stem
from anatomy_lightning.data.loader.options import clean_options, options_list, resolve_answer
from anatomy_lightning.data.loader.paths import record_images
from anatomy_lightning.data.loader.report import WRONG_TYPE, RecordProblem

NAME = "generic"
FIELDS = ("id", "question", "options", "answer", "images", "metadata")  # what `data.fields` can map onto


def matches(rec: dict[str, Any]) -> bool:
    return "question" in rec


def parse(rec: dict[str, Any], ctx: Context) -> Parsed:
    question = stem(text_field(rec, "question"), "question")
    options = clean_options(options_list(rec.get("options")), "options")
    idx = resolve_answer(rec.get("answer"), options, "answer")
    meta = rec.get("metadata", {})
    if not isinstance(meta, dict):
        raise RecordProblem(WRONG_TYPE, "metadata", f"expected an object, got {kind(meta)}")
    extra = {**extra_fields(rec, {"id", "question", "options", "answer", "image", "images", "metadata"}), **meta}
    return Parsed(question, options, idx, record_images(rec, ctx), extra, record_id(rec, "id", "question_id"),
                  "options")
