"""Anatomy-R1 / ms-swift JSON list: `instruction` = system text + "Question:" + stem + an options block
("Anatomy Options:" / "Options:" then "A. x" lines); `solution` is the letter, `answer` the option
text (checked against each other); `images` a path or a list."""

from __future__ import annotations

from typing import Any

from anatomy_lightning.data.loader.base import Context, Parsed, extra_fields, record_id
from anatomy_lightning.data.loader.fields import short, text_field
from anatomy_lightning.data.loader.inline import split_instruction
from anatomy_lightning.data.loader.options import clean_options, resolve_answer
from anatomy_lightning.data.loader.paths import record_images
from anatomy_lightning.data.loader.report import MISMATCH, MISSING, RecordProblem
from anatomy_lightning.data.schema import LETTERS

NAME = "anatomy_r1"


def matches(rec: dict[str, Any]) -> bool:
    return "instruction" in rec


def parse(rec: dict[str, Any], ctx: Context) -> Parsed:
    _, stem, options = split_instruction(text_field(rec, "instruction"))
    options = clean_options(options, "instruction")
    if rec.get("solution") is not None:
        idx = resolve_answer(rec["solution"], options, "solution")
        if rec.get("answer") is not None and resolve_answer(rec["answer"], options, "answer") != idx:
            raise RecordProblem(
                MISMATCH, "answer",
                f"{short(rec['answer'])} disagrees with solution {LETTERS[idx]} ({short(options[idx])}); "
                "fix one of them",
            )
    elif rec.get("answer") is not None:
        idx = resolve_answer(rec["answer"], options, "answer")
    else:
        raise RecordProblem(MISSING, "solution", "is missing (and so is answer); give the answer letter")
    extra = extra_fields(rec, {"instruction", "solution", "answer", "images", "image", "id"})
    extra["prompt"] = rec["instruction"]  # the dataset's own prompt (`data.prompt: dataset`)
    return Parsed(stem, options, idx, record_images(rec, ctx), extra, record_id(rec, "id"), "instruction")
