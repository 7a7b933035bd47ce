"""How a question becomes a prompt: the system turn, the text template and the processor call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from anatomy_lightning.data.prompts import dataset_prompt
from anatomy_lightning.data.schema import Question
from anatomy_lightning.models.families import ModelFamily


DEFAULT_SYSTEM_PROMPT = (
    "You are an expert in surgical anatomy. Look at the image and answer the multiple-choice question."
)


DEFAULT_PROMPT_TEMPLATE = (
    "{question}\n{options}\n"
    "Think inside <think> </think>, then give the letter of your choice inside <answer> </answer>."
)


def render_prompt(q: Question, template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    return template.format(question=q.question, options=q.options_block())


def build_messages(q: Question, system_prompt: str, template: str) -> list[dict[str, Any]]:
    """One image entry per image of the question (in order), then the text. A question pinned to
    its dataset's own prompt (`data.prompt: dataset`) shows that text, without our system turn."""
    own = dataset_prompt(q)
    if own is not None:
        system_prompt = ""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in q.images]
    content.append({"type": "text", "text": render_prompt(q, template) if own is None else own})
    messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    return messages


def encode_prompts(
    questions: Sequence[Question],
    processor: Any,
    image_loader: Callable[[str], Any],
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    template: str = DEFAULT_PROMPT_TEMPLATE,
    family: ModelFamily | None = None,
) -> dict[str, Tensor]:
    """Chat-template the questions and run the processor (left padding, never truncated).

    Images go in as the family's processor wants them (one list per prompt, or flat; default flat,
    as Qwen's processors take them). Image size is bounded by the processor's pixel bounds, not by
    cutting tokens: truncating a prompt that holds image tokens would desynchronise tokens and
    image features.
    """
    texts = [
        processor.apply_chat_template(build_messages(q, system_prompt, template), add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    per_prompt = [[image_loader(p) for p in q.images] for q in questions]
    processor.tokenizer.padding_side = "left"
    kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
    if family is not None:
        images = family.images_argument(per_prompt)
    else:
        images = [img for imgs in per_prompt for img in imgs] or None
    if images:
        kwargs["images"] = images
    out = processor(**kwargs)
    return dict(out)
