"""Prompts, sampled completions and their per-token log-probabilities.

Shapes: N prompts, G completions each, B = N * G sequences, P prompt tokens (left padded),
C completion tokens (right padded). Groups are consecutive rows: sequence b belongs to prompt b // G.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from anatomy_lightning.data.schema import Question
from anatomy_lightning.grpo.loss import token_logprobs

DEFAULT_SYSTEM_PROMPT = (
    "You are an expert in surgical anatomy. Look at the image and answer the multiple-choice question."
)
DEFAULT_PROMPT_TEMPLATE = (
    "{question}\n{options}\n"
    "Think inside <think> </think>, then give the letter of your choice inside <answer> </answer>."
)
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def render_prompt(q: Question, template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    return template.format(question=q.question, options=q.options_block())


def build_messages(q: Question, system_prompt: str, template: str) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image"} for _ in q.images]
    content.append({"type": "text", "text": render_prompt(q, template)})
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
) -> dict[str, Tensor]:
    """Chat-template the questions and run the processor (left padding, never truncated).

    Image size is bounded by the processor's `max_pixels`, not by cutting tokens: truncating a
    prompt that holds image tokens would desynchronise tokens and image features.
    """
    texts = [
        processor.apply_chat_template(build_messages(q, system_prompt, template), add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    images = [image_loader(p) for q in questions for p in q.images]
    processor.tokenizer.padding_side = "left"
    kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    out = processor(**kwargs)
    return dict(out)


@dataclass
class Rollout:
    prompt_inputs: dict[str, Tensor]  # the N prompts, as the processor returned them
    completion_ids: Tensor  # (B, C)
    completion_mask: Tensor  # (B, C) float: 1 up to and including the end-of-turn token
    truncated: Tensor  # (B,) bool: hit max_new_tokens without an end-of-turn token
    texts: list[str]  # decoded completions, B of them
    group_size: int

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(-1)


@dataclass
class SequenceInputs:
    """Model inputs with one row per sequence, sliceable by rows (images follow their row)."""

    tensors: dict[str, Tensor]
    pixel_rows: list[int]  # rows of `pixel_values` per sequence
    grid_rows: list[int]  # rows of `image_grid_thw` (images) per sequence

    def rows(self, start: int, stop: int) -> dict[str, Tensor]:
        n = len(self.pixel_rows) or self.tensors["input_ids"].shape[0]
        if start == 0 and stop >= n:
            return self.tensors
        out = {k: v[start:stop] for k, v in self.tensors.items() if k not in ("pixel_values", "image_grid_thw")}
        if "pixel_values" in self.tensors:
            p0, p1 = sum(self.pixel_rows[:start]), sum(self.pixel_rows[:stop])
            g0, g1 = sum(self.grid_rows[:start]), sum(self.grid_rows[:stop])
            out["pixel_values"] = self.tensors["pixel_values"][p0:p1]
            out["image_grid_thw"] = self.tensors["image_grid_thw"][g0:g1]
        return out


def _per_prompt_images(inputs: dict[str, Tensor], image_token_id: int, merge: int) -> tuple[list[int], list[int]]:
    """(patch rows, images) of `pixel_values`/`image_grid_thw` belonging to each prompt, in order."""
    n = inputs["input_ids"].shape[0]
    grid = inputs.get("image_grid_thw")
    if grid is None:
        return [0] * n, [0] * n
    patches = grid.prod(-1).tolist()
    tokens = [p // (merge * merge) for p in patches]
    counts = (inputs["input_ids"] == image_token_id).sum(-1).tolist()
    pixel_rows, grid_rows, k = [], [], 0
    for left in counts:  # walk the images in order until this prompt's image tokens are used up
        r, g = 0, 0
        while left > 0:
            left -= tokens[k]
            r, g, k = r + patches[k], g + 1, k + 1
        pixel_rows.append(r)
        grid_rows.append(g)
    return pixel_rows, grid_rows


def expand_prompts(inputs: dict[str, Tensor], group_size: int, image_token_id: int, merge: int = 2) -> SequenceInputs:
    """Repeat each prompt's tensors G times, keeping images aligned with their prompt."""
    pixel_rows, grid_rows = _per_prompt_images(inputs, image_token_id, merge)
    out = {
        k: v.repeat_interleave(group_size, dim=0)
        for k, v in inputs.items()
        if k in ("input_ids", "attention_mask", "mm_token_type_ids")
    }
    if "pixel_values" in inputs:
        pix = torch.split(inputs["pixel_values"], pixel_rows)
        grid = torch.split(inputs["image_grid_thw"], grid_rows)
        out["pixel_values"] = torch.cat([c for c in pix for _ in range(group_size)])
        out["image_grid_thw"] = torch.cat([g for g in grid for _ in range(group_size)])
    rep = lambda xs: [x for x in xs for _ in range(group_size)]  # noqa: E731
    return SequenceInputs(out, rep(pixel_rows), rep(grid_rows))


def completion_mask_from_ids(ids: Tensor, stop_ids: Sequence[int], pad_id: int | None) -> tuple[Tensor, Tensor]:
    """Mask up to and including the first stop token; `truncated` where no stop token appears."""
    is_stop = torch.zeros_like(ids, dtype=torch.bool)
    for s in stop_ids:
        is_stop |= ids == s
    has_stop = is_stop.any(-1)
    first = torch.where(has_stop, is_stop.float().argmax(-1), torch.full_like(has_stop, ids.shape[1], dtype=torch.long))
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    mask = (positions <= first.unsqueeze(1)).float()
    mask = mask * (positions < ids.shape[1]).float()
    return mask, ~has_stop


@torch.no_grad()
def generate(
    model: Any,
    processor: Any,
    prompt_inputs: dict[str, Tensor],
    num_generations: int,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> Rollout:
    """Sample G completions per prompt with the KV cache (one `generate` call for the batch)."""
    tok = processor.tokenizer
    stop_ids = _stop_ids(tok, model)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=num_generations,
        pad_token_id=tok.pad_token_id,
        eos_token_id=stop_ids,
        use_cache=True,
    )
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    out = model.generate(**prompt_inputs, **kwargs)
    if was_training:
        model.train()
    completion_ids = out[:, prompt_inputs["input_ids"].shape[1] :]
    mask, truncated = completion_mask_from_ids(completion_ids, stop_ids, tok.pad_token_id)
    texts = decode_completions(tok, completion_ids, mask)
    return Rollout(prompt_inputs, completion_ids, mask, truncated, texts, num_generations)


def _stop_ids(tok: Any, model: Any) -> list[int]:
    ids = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(gen_eos)
    return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != tok.unk_token_id)


def decode_completions(tok: Any, ids: Tensor, mask: Tensor) -> list[str]:
    """Decode only the masked tokens, keeping tags like <think> even if they are special tokens."""
    drop = {t for t in (tok.pad_token, tok.eos_token, "<|im_end|>", "<|endoftext|>") if t}
    texts = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        toks = [t for t, keep in zip(row, m) if keep > 0]
        text = tok.decode(toks, skip_special_tokens=False)
        for d in drop:
            text = text.replace(d, "")
        texts.append(text.strip())
    return texts


def sequence_inputs(
    rollout: Rollout, image_token_id: int, pad_id: int, vision_ids: Sequence[int], merge: int = 2
) -> SequenceInputs:
    """Model inputs for prompt + completion, one row per completion.

    Vision special tokens inside a completion are replaced by padding in the *inputs* (the model
    would otherwise look for image features that do not exist); `vision_token_guard` masks them
    and everything after them out of the loss.
    """
    seq = expand_prompts(rollout.prompt_inputs, rollout.group_size, image_token_id, merge)
    prompt = seq.tensors
    comp = rollout.completion_ids.clone()
    for v in vision_ids:
        comp[comp == v] = pad_id
    prompt_mask = prompt["attention_mask"]
    prompt["input_ids"] = torch.cat([prompt["input_ids"], comp], dim=1)
    prompt["attention_mask"] = torch.cat([prompt_mask, rollout.completion_mask.to(prompt_mask.dtype)], dim=1)
    if "mm_token_type_ids" in prompt:
        zeros = torch.zeros_like(comp, dtype=prompt["mm_token_type_ids"].dtype)
        prompt["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], zeros], dim=1)
    return seq


def vision_token_guard(completion_ids: Tensor, vision_ids: Sequence[int]) -> Tensor:
    """(B, C) float: 0 at and after the first vision special token of a completion."""
    hit = torch.zeros_like(completion_ids, dtype=torch.bool)
    for v in vision_ids:
        hit |= completion_ids == v
    return (hit.long().cumsum(-1) == 0).float()


def completion_logprobs(
    model: Any,
    inputs: SequenceInputs,
    completion_ids: Tensor,
    temperature: float = 1.0,
    batch_size: int | None = None,
) -> Tensor:
    """Per-token log-probs (B, C) of the completions under `model`, `batch_size` rows at a time.

    Only the last C+1 positions go through the LM head (`logits_to_keep`), so the vocabulary
    projection never materialises logits for the prompt.
    """
    B, C = completion_ids.shape
    step = batch_size or B
    out = []
    for s in range(0, B, step):
        logits = model(**inputs.rows(s, s + step), use_cache=False, logits_to_keep=C + 1).logits[:, :-1]  # (b, C, V)
        if temperature != 1.0:
            logits = logits / temperature
        out.append(token_logprobs(logits, completion_ids[s : s + step]))
    return torch.cat(out)
