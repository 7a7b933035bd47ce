"""MedVLM-R1 JSON list: the R1 `problem`/`solution` pair *and* the explicit `question`, `options`
(list) and `answer` (option text), plus `image` (a list). The explicit fields are read; the
`solution` letter must name the same option, so a record whose two answers disagree is reported."""

from __future__ import annotations

from typing import Any

from anatomy_lightning.data.loader.base import Context, Parsed, extra_fields, record_id
from anatomy_lightning.data.loader.fields import short, text_field
from anatomy_lightning.data.loader.inline import stem
from anatomy_lightning.data.loader.options import clean_options, options_list, resolve_answer
from anatomy_lightning.data.loader.paths import record_images
from anatomy_lightning.data.loader.report import MISMATCH, RecordProblem
from anatomy_lightning.data.schema import LETTERS

NAME = "medvlm_r1"


def matches(rec: dict[str, Any]) -> bool:
    return {"problem", "question", "options"} <= set(rec)


def parse(rec: dict[str, Any], ctx: Context) -> Parsed:
    question = stem(text_field(rec, "question"), "question")
    options = clean_options(options_list(rec.get("options")), "options")
    idx = resolve_answer(rec.get("answer"), options, "answer")
    if rec.get("solution") is not None and resolve_answer(rec["solution"], options, "solution") != idx:
        raise RecordProblem(
            MISMATCH, "solution",
            f"{short(rec['solution'])} disagrees with answer {short(rec['answer'])} (option {LETTERS[idx]}); "
            "fix one of them",
        )
    extra = extra_fields(rec, {"problem", "solution", "question", "options", "answer", "image", "images", "id"})
    if isinstance(rec.get("problem"), str):
        extra["prompt"] = rec["problem"]  # the dataset's own prompt (`data.prompt: dataset`)
    return Parsed(question, options, idx, record_images(rec, ctx), extra, record_id(rec, "id", "question_id"),
                  "options")
