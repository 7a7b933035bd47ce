"""MedXpertQA-MM JSONL: `question` (ending in "Answer Choices: (A) .. (B) .."), `options` a list of
`{letter, content}` objects, `label` a list holding the gold letter, `images` a list of
`{image_path}` objects (1-6 per question), and descriptive keys (medical_task, body_system, ...)
that become metadata."""

from __future__ import annotations

from typing import Any

from anatomy_lightning.data.loader.base import Context, Parsed, extra_fields, record_id
from anatomy_lightning.data.loader.fields import kind, text_field
from anatomy_lightning.data.loader.inline import prompt_stem
from anatomy_lightning.data.loader.options import clean_options, option_text, resolve_answer
from anatomy_lightning.data.loader.paths import record_images
from anatomy_lightning.data.loader.report import MISSING, SEVERAL_ANSWERS, WRONG_TYPE, RecordProblem
from anatomy_lightning.data.schema import LETTERS

NAME = "medxpertqa"


def matches(rec: dict[str, Any]) -> bool:
    options = rec.get("options")
    return "question" in rec and "label" in rec and isinstance(options, list) and all(
        isinstance(o, dict) for o in options)


def _options(value: Any) -> list[str]:
    """Option texts from [{letter, content}, ...], in letter order."""
    if not isinstance(value, list):
        raise RecordProblem(MISSING if value is None else WRONG_TYPE, "options",
                            f"expected a list of {{letter, content}} objects, got {kind(value)}")
    by_letter: dict[str, str] = {}
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("letter"), str) or "content" not in item:
            got = f"keys {sorted(item)}" if isinstance(item, dict) else kind(item)
            raise RecordProblem(WRONG_TYPE, f"options[{i}]", f"expected a {{letter, content}} object, got {got}")
        by_letter[item["letter"].strip().upper()] = option_text(item["content"], f"options[{i}].content")
    if sorted(by_letter) != list(LETTERS[: len(by_letter)]) or len(by_letter) != len(value):
        raise RecordProblem(WRONG_TYPE, "options", f"letters {[o.get('letter') for o in value]} are not "
                                                   "A, B, C... each once")
    return [by_letter[x] for x in sorted(by_letter)]


def parse(rec: dict[str, Any], ctx: Context) -> Parsed:
    options = clean_options(_options(rec.get("options")), "options")
    label = rec.get("label")
    if isinstance(label, list) and len(label) > 1:
        raise RecordProblem(SEVERAL_ANSWERS, "label",
                            f"gives {len(label)} answers {label}; only single-answer questions are supported")
    idx = resolve_answer(label, options, "label")
    extra = extra_fields(rec, {"question", "options", "label", "images", "image", "id"})
    extra["prompt"] = rec["question"]  # the question with its answer choices: the dataset's own prompt
    return Parsed(prompt_stem(text_field(rec, "question"), "question"), options, idx, record_images(rec, ctx),
                  extra, record_id(rec, "id"), "options")
