"""The fast path (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): every prompt's work done once per group.

A prompt (system text, question, options and, for a 448x448 image, 256 image tokens) is usually as
long as its completion or longer, and it is the same for all G completions of its group. So
(`PromptBatch`):
  - the vision tower runs once per image per step (under no grad when it is frozen, as with LoRA
    or QLoRA) and its features are reused by generation and by the policy, reference and
    old-policy forwards; the mrope positions are computed once per prompt as well;
  - generation prefills each prompt once and repeats its KV cache G times (`generate`);
  - the log-prob forwards run the prompt once per group and the G completions on top of its
    (repeated) KV cache (`shared_prompt_logprobs`). Causal attention keeps the completion out of
    the prompt's hidden states, so this is the same function as the full-sequence forward; the
    prompt's gradient is the sum over its G completions, which autograd gets from the repeat.
    Activation checkpointing drops KV caches inside the checkpointed layers, so with it the
    training forward runs whole sequences (`full_sequence_logprobs`), still with shared image
    features and positions.
Which families take this path is `models.families`' call; `grpo.rollout` dispatches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from anatomy_lightning.grpo.sequences import (
    Rollout,
    cat_rows,
    completion_mask_from_ids,
    decode_completions,
    eval_mode,
    per_prompt_images,
    tempered_logprobs,
)
from anatomy_lightning.grpo.packed_decode import make_decoder
from anatomy_lightning.models.families import ModelFamily, family_of


@dataclass
class PromptBatch:
    """The N prompts of a step, with what every forward over them shares.

    Built once per step by `prepare_prompts`. `image_features` hold the vision tower's output for
    the policy as it was at rollout time (no grad): valid for generation, for the old policy, for a
    reference that is the policy with its adapter off (when the vision tower carries no adapter), and
    for the training forward when the vision tower is frozen. Otherwise `image_inputs` recomputes
    them, still once per image rather than once per completion.
    """

    inputs: dict[str, Tensor]  # processor output: input_ids, attention_mask, mm_token_type_ids (N, P), pixel_values
    position_ids: Tensor  # (3, N, P) mrope positions (temporal, height, width); 0 on left padding
    images_per_prompt: list[int]  # images of each prompt, in order of `image_grid_thw`
    image_features: tuple[Tensor, ...] | None  # one (tokens_i, D) per image; None for text-only prompts
    deepstack: tuple[tuple[Tensor, ...], ...] | None = None  # Qwen3-VL: per deepstack layer, one per image

    @property
    def num_prompts(self) -> int:
        return self.inputs["input_ids"].shape[0]

    def completion_positions(self, length: int, group_size: int, rows: slice = slice(None)) -> Tensor:
        """(3, b, length) positions of completion tokens: they continue the prompt as plain text."""
        first = self.position_ids[0, rows, -1] + 1  # (n,) the last prompt token is text: all 3 axes agree
        first = first.repeat_interleave(group_size)  # (b,)
        pos = first[:, None] + torch.arange(length, device=first.device)  # (b, length)
        return pos.unsqueeze(0).expand(3, -1, -1)

    def image_inputs(self, model: Any, rows: slice, group_size: int, reuse: bool) -> dict[str, Any]:
        """Model kwargs carrying the image features of prompts `rows`, each repeated `group_size` times.

        `reuse`: take the features computed at rollout time; otherwise run `model`'s vision tower
        on these prompts' images once (with grad if enabled) and repeat the result, which keeps
        the autograd graph of a trainable vision tower.
        """
        if self.image_features is None:
            return {}
        start, stop, _ = rows.indices(self.num_prompts)
        i0, i1 = sum(self.images_per_prompt[:start]), sum(self.images_per_prompt[:stop])
        if reuse:
            feats = list(self.image_features[i0:i1])
            layers = [list(layer[i0:i1]) for layer in self.deepstack] if self.deepstack is not None else None
        else:
            grid = self.inputs["image_grid_thw"]
            patches = grid.prod(-1).tolist()
            p0, p1 = sum(patches[:i0]), sum(patches[:i1])
            pixels = self.inputs["pixel_values"][p0:p1]
            out = vl_backbone(model).get_image_features(pixels, grid[i0:i1])
            feats = list(out.pooler_output)
            deep = getattr(out, "deepstack_features", None)
            layers = [list(layer) for layer in deep] if deep is not None else None
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        expand = lambda per_image: tuple(self._repeat_per_group(per_image, start, stop, group_size))  # noqa: E731
        image = BaseModelOutputWithPooling(pooler_output=expand(feats))
        if layers is not None:  # Qwen3-VL: every forward holding image tokens needs its deepstack features
            image.deepstack_features = [expand(layer) for layer in layers]
        return {"mm_encoder_outputs": {"image": image}}

    def _repeat_per_group(self, per_image: list[Tensor], start: int, stop: int, group_size: int) -> list[Tensor]:
        """Images of prompts start:stop (in order), each prompt's images repeated for its G rows."""
        out, k = [], 0
        for n in self.images_per_prompt[start:stop]:
            out.extend(f for _ in range(group_size) for f in per_image[k : k + n])
            k += n
        return out


def vl_backbone(model: Any) -> Any | None:
    """The inner model that owns `get_rope_index`, `get_image_features` and `visual`, through a peft
    wrapper; None for anything else (a generic-path model, or not a VLM at all)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    return inner if hasattr(inner, "get_rope_index") and hasattr(inner, "get_image_features") else None


def vision_frozen(model: Any) -> bool:
    """True when the vision tower neither trains nor carries an adapter (LoRA/QLoRA default).

    Then its features are the same for the policy, its adapter-off reference and every iteration
    of a step, so they are computed once per image and reused everywhere.
    """
    bb = vl_backbone(model)
    if bb is None:
        return False
    return not any(p.requires_grad or "lora_" in n for n, p in bb.visual.named_parameters())


def checkpointing_on(model: Any) -> bool:
    bb = vl_backbone(model)
    return bb is not None and any(getattr(m, "gradient_checkpointing", False) for m in bb.language_model.modules())


@torch.no_grad()
def prepare_prompts(model: Any, inputs: dict[str, Tensor]) -> PromptBatch:
    """Positions and image features of the N prompts, computed once for every forward of the step."""
    bb = vl_backbone(model)
    if bb is None:
        raise ValueError(f"{type(model).__name__} has no mrope backbone: it takes the generic path")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if not bool(mask[:, -1].all()):
        raise ValueError("prompts must be left padded (processor.tokenizer.padding_side = 'left')")
    image_id = bb.config.image_token_id
    types = inputs.get("mm_token_type_ids")
    if types is None:
        types = (ids == image_id).int()
    grid = inputs.get("image_grid_thw")
    position_ids, _ = bb.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid, attention_mask=mask)
    if grid is None or "pixel_values" not in inputs:
        return PromptBatch(inputs, position_ids, [0] * ids.shape[0], None)
    _, per_prompt = per_prompt_images(inputs, image_id, bb.config.vision_config.spatial_merge_size)
    out = bb.get_image_features(inputs["pixel_values"], grid)
    feats = tuple(out.pooler_output)  # one (tokens_i, D) per image
    deep = getattr(out, "deepstack_features", None)  # Qwen3-VL: per layer, one (tokens_i, D) per image
    deepstack = tuple(tuple(layer) for layer in deep) if deep is not None else None
    return PromptBatch(inputs, position_ids, per_prompt, feats, deepstack)


def cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def prefill(
    model: Any, prompts: PromptBatch, rows: slice = slice(None), reuse_images: bool = True
) -> tuple[Any, Tensor]:
    """One forward over prompts `rows`: their KV cache and the logits (n, V) for the first new token."""
    ids = prompts.inputs["input_ids"][rows]
    out = model(
        input_ids=ids,
        attention_mask=prompts.inputs["attention_mask"][rows],
        position_ids=prompts.position_ids[:, rows],
        use_cache=True,
        logits_to_keep=1,
        **prompts.image_inputs(model, rows, 1, reuse_images),
    )
    return cache_of(out), out.logits[:, -1]


def pick_next_token(
    logits: Tensor, do_sample: bool, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B,) next tokens from (B, V) float logits: argmax, or temperature / top-k / top-p sampling.

    The same warpers in the same order as Hugging Face `generate` (temperature, top-k, top-p).
    """
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_completions(
    model: Any,
    prompts: PromptBatch,
    num_generations: int,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_new_tokens: int = 0,
    generator: torch.Generator | None = None,
    packed_decode: bool | None = None,
) -> Tensor:
    """(B, C) completion ids: prefill each prompt once, repeat its KV cache G times, then decode.

    A row that has emitted a stop token is dropped from the batch (and from the KV cache), so
    late tokens cost only the rows still writing; its remaining positions hold `pad_id`, as with
    `generate`. Decoding ends when every row has stopped or after `max_new_tokens`. Before
    `min_new_tokens` the stop tokens cannot be drawn (benchmarks force a fixed length with it).
    The per-token forwards run on packed weights when `packed_decode` allows (`grpo.packed_decode`).
    """
    G = num_generations
    cache, logits = prefill(model, prompts)  # (N, V)
    if G > 1:
        cache.batch_repeat_interleave(G)  # (N, ...) -> (B, ...), row b from prompt b // G
    logits = logits.float().repeat_interleave(G, dim=0)  # (b, V), b = rows still writing
    attention = prompts.inputs["attention_mask"].repeat_interleave(G, dim=0)  # (b, P + t)
    next_pos = prompts.completion_positions(1, G)  # (3, b, 1)
    B = logits.shape[0]
    stops = torch.tensor(list(stop_ids), device=logits.device)
    out = torch.full((B, max(max_new_tokens, 0)), pad_id, dtype=torch.long, device=logits.device)
    rows = torch.arange(B, device=logits.device)  # the output row of each live row
    decoder = make_decoder(model, cache, max_new_tokens, packed_decode)
    length = 0
    for t in range(max_new_tokens):
        if t < min_new_tokens:
            logits[:, stops] = float("-inf")
        tok = pick_next_token(logits, do_sample, temperature, top_p, top_k, generator)  # (b,)
        out[rows, t] = tok
        length = t + 1
        live = ~torch.isin(tok, stops)
        if t == max_new_tokens - 1 or not bool(live.any()):
            break
        if not bool(live.all()):  # drop the rows that just stopped
            keep = live.nonzero().squeeze(1)
            decoder.select(keep)
            rows, tok, attention, next_pos = rows[keep], tok[keep], attention[keep], next_pos[:, keep]
        attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
        logits = decoder.step(tok, next_pos + t, attention)
    return out[:, :length]


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
    min_new_tokens: int = 0,
    family: ModelFamily | None = None,
    packed_decode: bool | None = None,
) -> Rollout:
    """Sample G completions per prompt (greedy: `do_sample=False`), vision and prefill once per prompt.

    The returned `Rollout.prompts` carries the positions and image features for the log-prob
    forwards of the same step.
    """
    tok = processor.tokenizer
    with eval_mode(model):
        prompts = prepare_prompts(model, prompt_inputs)
        stop_ids = (family or family_of(model)).stop_token_ids(model, processor)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
        completion_ids = sample_completions(
            model, prompts, num_generations, max_new_tokens, stop_ids, pad_id, do_sample, temperature, top_p, top_k,
            min_new_tokens, packed_decode=packed_decode,
        )
    mask, truncated = completion_mask_from_ids(completion_ids, stop_ids, pad_id)
    texts = decode_completions(tok, completion_ids, mask, stop_ids)
    return Rollout(prompt_inputs, completion_ids, mask, truncated, texts, num_generations, prompts)


def shared_prompt_logprobs(
    model: Any, ro: Rollout, inputs: Tensor, rows: slice, reuse_images: bool, temperature: float,
    entropy: bool = False,
) -> Any:
    """(b, C) log-probs of completions `rows` with their prompts run once per group.

    The prompt forward gives the KV cache and the logits for the first completion token; the
    cache is repeated G times (a differentiable copy: each prompt's gradient is the sum over its
    completions) and the completions run on top of it, minus their last token (nothing to predict).
    """
    G, prompts = ro.group_size, ro.prompts
    targets = ro.completion_ids[rows]  # (b, C)
    p_rows = slice(rows.start // G, rows.stop // G)
    cache, first = prefill(model, prompts, p_rows, reuse_images)  # first: (n, V)
    first = first.repeat_interleave(G, dim=0).unsqueeze(1)  # (b, 1, V)
    first = tempered_logprobs(first, targets[:, :1], temperature, entropy)  # (b, 1)
    C = inputs.shape[1]
    if C == 1:
        return first
    cache.batch_repeat_interleave(G)
    prompt_mask = prompts.inputs["attention_mask"][p_rows].repeat_interleave(G, dim=0)  # (b, P)
    comp_mask = ro.completion_mask[rows, : C - 1].to(prompt_mask.dtype)
    out = model(
        input_ids=inputs[:, : C - 1],
        attention_mask=torch.cat([prompt_mask, comp_mask], dim=1),  # (b, P + C - 1)
        position_ids=prompts.completion_positions(C - 1, G, p_rows),
        cache=cache,
        use_cache=True,
    )  # logits (b, C - 1, V)
    return cat_rows([first, tempered_logprobs(out.logits, targets[:, 1:], temperature, entropy)], dim=1)


def full_sequence_logprobs(
    model: Any, ro: Rollout, inputs: Tensor, rows: slice, reuse_images: bool, temperature: float,
    entropy: bool = False,
) -> Any:
    """(b, C) log-probs from whole prompt + completion rows (what activation checkpointing needs).

    Image features and positions are still shared: computed once per prompt, repeated G times.
    """
    G, prompts = ro.group_size, ro.prompts
    p_rows = slice(rows.start // G, rows.stop // G)
    C = inputs.shape[1]
    prompt_ids = prompts.inputs["input_ids"][p_rows].repeat_interleave(G, dim=0)  # (b, P)
    prompt_mask = prompts.inputs["attention_mask"][p_rows].repeat_interleave(G, dim=0)  # (b, P)
    positions = torch.cat(
        [prompts.position_ids[:, p_rows].repeat_interleave(G, dim=1), prompts.completion_positions(C, G, p_rows)], dim=2
    )  # (3, b, P + C)
    out = model(
        input_ids=torch.cat([prompt_ids, inputs], dim=1),
        attention_mask=torch.cat([prompt_mask, ro.completion_mask[rows].to(prompt_mask.dtype)], dim=1),
        position_ids=positions,
        use_cache=False,
        logits_to_keep=C + 1,
        **prompts.image_inputs(model, p_rows, G, reuse_images),
    )
    return tempered_logprobs(out.logits[:, :-1], ro.completion_ids[rows], temperature, entropy)


def logprob_forward(model: Any) -> Callable[..., Any]:
    """The log-prob forward for this step: prompts shared per group, or whole sequences when
    activation checkpointing (which drops KV caches) needs gradients."""
    if torch.is_grad_enabled() and checkpointing_on(model):
        return full_sequence_logprobs
    return shared_prompt_logprobs
