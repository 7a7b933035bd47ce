"""Med-R1 / VLM-R1: `problem` (question with inline options such as "A)x, B)y" or "(A) x (B) y") and
`solution` ("<answer> D </answer>", a bare letter or the option text); JSON list or JSONL."""

from __future__ import annotations

from typing import Any

from anatomy_lightning.data.loader.base import Context, Parsed, extra_fields, record_id
from anatomy_lightning.data.loader.fields import text_field
from anatomy_lightning.data.loader.inline import split_inline_options, stem
from anatomy_lightning.data.loader.options import clean_options, resolve_answer
from anatomy_lightning.data.loader.paths import record_images

NAME = "r1"


def matches(rec: dict[str, Any]) -> bool:
    return "problem" in rec


def parse(rec: dict[str, Any], ctx: Context) -> Parsed:
    question, options, trailing = split_inline_options(text_field(rec, "problem"), "problem")
    options = clean_options(options, "problem")
    idx = resolve_answer(rec.get("solution"), options, "solution")
    extra = extra_fields(rec, {"problem", "solution", "image", "images", "id"})
    if trailing:
        extra["prompt_suffix"] = trailing
    extra["prompt"] = rec["problem"]  # the dataset's own prompt (`data.prompt: dataset`)
    return Parsed(stem(question, "problem"), options, idx, record_images(rec, ctx), extra,
                  record_id(rec, "id", "question_id"), "problem")
