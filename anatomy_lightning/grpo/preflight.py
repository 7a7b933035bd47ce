"""Before the model loads: can the processor take every image, and does every prompt fit the model?

Without this, an image the processor refuses (Qwen's resize rejects an aspect ratio above 200:1) or
a prompt longer than the model's context surfaced as a traceback when a batch reached it, hours
into a run. Here every question of the stage is measured once with the real processor and
tokenizer: the text through the chat template and the tokenizer, the images by their header sizes.
Each distinct combination of image sizes goes through the processor once, on blank images of
those sizes, which gives the exact number of tokens it expands them to (or its refusal). Prompts
are never truncated: image tokens must stay whole, and cutting a multiple-choice question's text
loses its options, so an over-long prompt is refused, or dropped on request
(`model.truncation_strategy: delete`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from anatomy_lightning.data.schema import DataError, Question
from anatomy_lightning.grpo.prompts import build_messages
from anatomy_lightning.models.families import ModelFamily

__all__ = ["TRUNCATION_STRATEGIES", "PromptReport", "check_prompts", "context_length", "measure_prompts"]

log = logging.getLogger(__name__)

TRUNCATION_STRATEGIES = ("raise", "delete")  # ms-swift's names; its "left"/"right" would cut image tokens
SHOWN = 3  # records named per problem


@dataclass
class PromptReport:
    """Prompt tokens per question (uid), and the questions whose images the processor refuses."""

    tokens: dict[str, int] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # uid -> the processor's reason


def _size(path: str) -> tuple[int, int] | None:
    try:
        with Image.open(path) as img:  # the header only
            return img.height, img.width
    except (OSError, ValueError):  # unreadable: the image pre-flight names it (unless data.check_images is off)
        return None


def _image_sizes(questions: Sequence[Question]) -> dict[str, tuple[int, int] | None]:
    paths = list(dict.fromkeys(p for q in questions for p in q.images))
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(paths)))) as pool:
        return dict(zip(paths, pool.map(_size, paths)))


def _probe_question(n_images: int) -> Question:
    return Question(id="preflight", question="x", options=["a", "b"], answer_index=0,
                    images=[f"{i}.png" for i in range(n_images)])


def _chat_text(processor: Any, q: Question, system_prompt: str, template: str) -> str:
    messages = build_messages(q, system_prompt, template)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class _Expansion:
    """Tokens a combination of image sizes adds to a prompt, measured with the real processor."""

    def __init__(self, processor: Any, family: ModelFamily) -> None:
        self.processor, self.family = processor, family
        self.cache: dict[tuple[tuple[int, int], ...], int | str] = {}

    def __call__(self, sizes: tuple[tuple[int, int], ...]) -> int | str:
        """Extra tokens over the unexpanded text, or the processor's refusal as a string."""
        if sizes not in self.cache:
            self.cache[sizes] = self._measure(sizes)
        return self.cache[sizes]

    def _measure(self, sizes: tuple[tuple[int, int], ...]) -> int | str:
        probe = _probe_question(len(sizes))
        text = _chat_text(self.processor, probe, "", "{question}")
        plain = len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        blanks = [Image.new("RGB", (w, h)) for h, w in sizes]
        try:
            out = self.processor(text=[text], images=self.family.images_argument([blanks]), return_tensors="pt")
        except (ValueError, RuntimeError, IndexError, ZeroDivisionError) as err:
            return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return int(out["input_ids"].shape[1]) - plain


def measure_prompts(questions: Sequence[Question], processor: Any, family: ModelFamily, system_prompt: str,
                    template: str) -> PromptReport:
    """Every question's prompt length in tokens as the processor would build it, and its refusals."""
    sizes = _image_sizes(questions)
    texts = [_chat_text(processor, q, system_prompt, template) for q in questions]
    plain = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
    expansion, report = _Expansion(processor, family), PromptReport()
    for q, ids in zip(questions, plain):
        shapes = tuple(sizes[p] for p in q.images)
        if any(s is None for s in shapes):
            continue  # an image that cannot be read is not measured here
        extra = expansion(shapes) if shapes else _text_only(expansion)  # type: ignore[arg-type]
        if isinstance(extra, str):
            report.refused[q.uid] = extra
        else:
            report.tokens[q.uid] = len(ids) + extra
    return report


def _text_only(expansion: _Expansion) -> int:
    """What the processor adds to a text-only prompt (a BOS token in some families)."""
    if () not in expansion.cache:
        proc = expansion.processor
        text = _chat_text(proc, _probe_question(0), "", "{question}")
        full = proc(text=[text], return_tensors="pt")["input_ids"].shape[1]
        expansion.cache[()] = int(full) - len(proc.tokenizer(text, add_special_tokens=False)["input_ids"])
    return int(expansion.cache[()])


def context_length(config: Any) -> int | None:
    """The model's context window (its text model's `max_position_embeddings`), if it declares one."""
    for cfg in (getattr(config, "text_config", None), config):
        n = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
        if isinstance(n, int) and n > 0:
            return n
    return None


def _record(q: Question) -> str:
    return f"record {q.metadata.get('record')} (id {q.id!r})"


def check_prompts(questions: list[Question], report: PromptReport, limit: int | None, limit_name: str,
                  strategy: str, what: str) -> set[str]:
    """Raise `DataError` naming the questions the processor refuses or whose prompts exceed `limit`,
    with counts and the first records; with strategy "delete", return the over-long ones' uids instead
    (refused images always stop the run: the data needs fixing)."""
    by_uid = {q.uid: q for q in questions}
    if report.refused:
        uids = list(report.refused)
        lines = [f"  {_record(by_uid[u])}: images {', '.join(by_uid[u].images)}: {report.refused[u]}"
                 for u in uids[:SHOWN]]
        raise DataError(
            f"{what}: the processor refuses the images of {len(uids)} of {len(questions)} questions (extreme "
            "aspect ratio or too small), before the model loads:\n" + "\n".join(lines) +
            "\ncrop or pad these images, or drop their records"
        )
    if limit is None:
        return set()
    long = sorted((u for u, n in report.tokens.items() if n > limit), key=lambda u: -report.tokens[u])
    if not long:
        return set()
    longest = report.tokens[long[0]]
    if strategy == "delete":
        log.warning("%s: dropped %d of %d questions whose prompts exceed %s=%d tokens (longest %d)", what,
                    len(long), len(questions), limit_name, limit, longest)
        return set(long)
    lines = [f"  {_record(by_uid[u])}: {report.tokens[u]} tokens ({len(by_uid[u].images)} images)" for u in long[:SHOWN]]
    raise DataError(
        f"{what}: {len(long)} of {len(questions)} prompts are longer than {limit_name}={limit} tokens "
        f"(longest {longest}):\n" + "\n".join(lines) +
        "\nlower model.max_pixels (image tokens grow with pixels), shorten the prompt, raise the limit, or set "
        "model.truncation_strategy: delete to drop them (prompts are never cut: image tokens must stay whole)"
    )


# stage -> the DataModule lists its questions come from
STAGE_SPLITS = {"fit": ("train_questions", "val_questions"), "validate": ("val_questions",),
                "test": ("test_questions",), "predict": ("predict_questions",)}


def load_processor(model: str, min_pixels: int | None, max_pixels: int | None) -> tuple[Any, ModelFamily, Any]:
    """(processor with the run's pixel bounds, family, config) of `model`, without its weights."""
    from transformers import AutoProcessor

    from anatomy_lightning.models.families import family_for_type
    from anatomy_lightning.models.loading import load_model_config, resolve_model_path

    path = resolve_model_path(model)
    config = load_model_config(path, model)
    family = family_for_type(config.model_type, str(model))
    processor = AutoProcessor.from_pretrained(path)
    family.set_pixel_bounds(processor, min_pixels, max_pixels)
    return processor, family, config


def preflight(hp: Any, datamodule: Any, stage: str) -> None:
    """Measure the stage's prompts with the model's processor (`model.*` settings in `hp`); refuse
    images the processor cannot take and prompts over the limit, or drop the latter from the
    DataModule (`truncation_strategy: delete`)."""
    stage = str(getattr(stage, "value", stage))  # Lightning passes its TrainerFn
    splits = [(name, list(getattr(datamodule, name, None) or [])) for name in STAGE_SPLITS.get(stage, ())]
    questions = [q for _, qs in splits for q in qs]
    if not questions:
        return
    processor, family, config = load_processor(hp.model, hp.min_pixels, hp.max_pixels)
    report = measure_prompts(questions, processor, family, hp.system_prompt, hp.prompt_template)
    if hp.max_prompt_length is not None:
        limit, name = hp.max_prompt_length, "model.max_prompt_length"
    else:
        context = context_length(config)
        limit = None if context is None else context - hp.max_new_tokens
        name = f"the model's context ({context}) minus model.max_new_tokens ({hp.max_new_tokens}), i.e. limit"
    drop = check_prompts(questions, report, limit, name, hp.truncation_strategy, f"{stage} ({hp.model})")
    if drop:
        for attr, qs in splits:
            setattr(datamodule, attr, [q for q in qs if q.uid not in drop])
    elif report.tokens:
        log.info("%s: prompts of %d questions fit (longest %d tokens%s)", stage, len(report.tokens),
                 max(report.tokens.values()), "" if limit is None else f", limit {limit}")
