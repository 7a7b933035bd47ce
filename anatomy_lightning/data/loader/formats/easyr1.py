"""EasyR1 JSONL: `prompt` (the dataset's full prompt: "Question: ...", an "Options:" block, an answer
instruction), `images` (a list) and `answer`, an object with `correct_answer` (the letter),
`option_A`.. (the texts) and optional `label` (the gold text), `answer_id`, `question_id` and
descriptive keys (dataset, modality_type, ...) that become metadata. The prompt is kept as
metadata `prompt`; the stem is its question line."""

from __future__ import annotations

from typing import Any

from anatomy_lightning.data.loader.base import Context, Parsed, extra_fields, record_id
from anatomy_lightning.data.loader.fields import kind, short, text_field
from anatomy_lightning.data.loader.formats.omnimedvqa import OPTION_KEYS, letter_columns
from anatomy_lightning.data.loader.inline import prompt_stem
from anatomy_lightning.data.loader.options import clean_options, resolve_answer
from anatomy_lightning.data.loader.paths import record_images
from anatomy_lightning.data.loader.report import MISMATCH, MISSING, WRONG_TYPE, RecordProblem
from anatomy_lightning.data.schema import LETTERS

NAME = "easyr1"
_ANSWER_KEYS = ("correct_answer", "answer_id", "label")  # letter, letter, text: all must agree


def matches(rec: dict[str, Any]) -> bool:
    return "prompt" in rec and isinstance(rec.get("answer"), dict)


def parse(rec: dict[str, Any], ctx: Context) -> Parsed:
    prompt = text_field(rec, "prompt")
    answer = rec.get("answer")
    if not isinstance(answer, dict):
        raise RecordProblem(MISSING if answer is None else WRONG_TYPE, "answer",
                            f"expected an object with correct_answer and option_A.., got {kind(answer)}")
    options = clean_options(letter_columns(answer, "answer."), "answer.option_A..")
    given = [k for k in _ANSWER_KEYS if answer.get(k) is not None]
    if not given:
        raise RecordProblem(MISSING, "answer.correct_answer", "is missing; give the answer letter")
    idx = resolve_answer(answer[given[0]], options, f"answer.{given[0]}")
    for key in given[1:]:
        if resolve_answer(answer[key], options, f"answer.{key}") != idx:
            raise RecordProblem(
                MISMATCH, f"answer.{key}",
                f"{short(answer[key])} disagrees with answer.{given[0]} {LETTERS[idx]} ({short(options[idx])}); "
                "fix one of them",
            )
    extra = {**extra_fields(answer, {*_ANSWER_KEYS, *OPTION_KEYS}), **extra_fields(rec, {"answer", "images", "image"})}
    return Parsed(prompt_stem(prompt, "prompt"), options, idx, record_images(rec, ctx), extra,
                  record_id(answer, "question_id", "id") or record_id(rec, "id"), "answer.option_A..")
