"""`data.prompt: dataset`: show the model the record's own instruction instead of our template.

Papers train on their files' exact prompt text (Anatomy-R1's `instruction`: system text, question
and an "Anatomy Options:" block; Med-R1's `problem`; EasyR1's `prompt`; MedXpertQA's `question`
with its answer choices). The readers keep that text as question metadata `prompt`; with
`data.prompt: dataset` the DataModule pins it to the question it was read with
(`attach_dataset_prompts`), and the prompt builder shows it verbatim as the user turn, images
first, with no system turn of ours (the chat template's default, as ms-swift and EasyR1 do).

The pin holds the uid, stem and options it was made for: the curriculum, the rewards and the
rewriters keep working on the parsed question, and a rewritten question (another uid, stem or
option order) no longer matches its pin, so it falls back to the template.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from anatomy_lightning.data.schema import Question

PROMPTS = ("template", "dataset")
SOURCE_KEY = "prompt"  # where the readers keep the record's own prompt text
PIN_KEY = "dataset_prompt"  # the pinned copy `data.prompt: dataset` shows

# EasyR1 prompts end with a literal answer example ("<answer> A </answer>"): the same letter for
# every question, which a policy would learn to copy. It becomes a letter-free format instruction.
_ANSWER_EXAMPLE = re.compile(r"\s*<answer>\s*[A-F]\s*</answer>\s*$", re.I)
NEUTRAL_EXAMPLE = "Give it inside <answer> </answer>."
_IMAGE_TAG = re.compile(r"<image>\s*")  # ms-swift image placeholders: images are placed by the chat template


def clean_dataset_prompt(text: str) -> str:
    """The record's prompt as shown: image tags dropped, a literal answer example neutralised."""
    text = _IMAGE_TAG.sub("", text).strip()
    if _ANSWER_EXAMPLE.search(text):
        text = _ANSWER_EXAMPLE.sub("", text).rstrip() + "\n" + NEUTRAL_EXAMPLE
    return text


def attach_dataset_prompts(questions: Sequence[Question]) -> int:
    """Pin each question's own prompt (metadata `prompt`) to it; returns how many had none."""
    missing = 0
    for q in questions:
        text = q.metadata.get(SOURCE_KEY)
        if not isinstance(text, str) or not text.strip():
            missing += 1
            continue
        q.metadata[PIN_KEY] = {"text": clean_dataset_prompt(text), "uid": q.uid, "question": q.question,
                               "options": list(q.options)}
    return missing


def dataset_prompt(q: Question) -> str | None:
    """The pinned dataset prompt of `q`, or None (not pinned, or `q` is a rewrite of the pinned one)."""
    pin: Any = q.metadata.get(PIN_KEY)
    if not isinstance(pin, dict):
        return None
    if pin.get("uid") != q.uid or pin.get("question") != q.question or pin.get("options") != list(q.options):
        return None
    return pin["text"]
