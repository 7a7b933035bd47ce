"""OmniMedVQA: `question`, `option_A`..`option_F` (absent or empty ones dropped), `gt_answer` (option
text) and `image_path`."""

from __future__ import annotations

from typing import Any

from anatomy_lightning.data.loader.base import Context, Parsed, extra_fields, record_id
from anatomy_lightning.data.loader.fields import text_field
from anatomy_lightning.data.loader.inline import stem
from anatomy_lightning.data.loader.options import clean_options, option_text, resolve_answer
from anatomy_lightning.data.loader.paths import record_images
from anatomy_lightning.data.schema import LETTERS

NAME = "omnimedvqa"
OPTION_KEYS = tuple(f"option_{x}" for x in LETTERS)


def matches(rec: dict[str, Any]) -> bool:
    return "option_A" in rec or "gt_answer" in rec


def letter_columns(rec: dict[str, Any], prefix: str = "") -> list[str]:
    """The non-empty `option_A`..`option_F` texts in letter order (shared with the EasyR1 reader)."""
    options: list[str] = []
    for key in OPTION_KEYS:
        if rec.get(key) is not None:
            text = option_text(rec[key], prefix + key)
            if text:
                options.append(text)
    return options


def parse(rec: dict[str, Any], ctx: Context) -> Parsed:
    question = stem(text_field(rec, "question"), "question")
    options = clean_options(letter_columns(rec), "option_A..option_F")
    idx = resolve_answer(rec.get("gt_answer"), options, "gt_answer")
    extra = extra_fields(rec, {"question", "gt_answer", "image_path", "image", "images", *OPTION_KEYS})
    images = record_images(rec, ctx, ("image_path", "images", "image"))
    return Parsed(question, options, idx, images, extra, record_id(rec, "question_id", "id"), "option_A..option_F")
