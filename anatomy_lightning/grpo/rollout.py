"""Prompts, sampled completions and their per-token log-probabilities.

Shapes: N prompts, G completions each, B = N * G sequences, P prompt tokens (left padded),
C completion tokens (right padded). Groups are consecutive rows: sequence b belongs to prompt b // G.

Where the time goes, and why this module is shaped the way it is. A prompt (system text, question,
options and, for a 448x448 image, 256 image tokens) is usually as long as its completion or longer,
and it is the same for all G completions of its group. So (`PromptBatch`):
  - the vision tower runs once per image per step (under no grad when it is frozen, as with LoRA
    or QLoRA) and its features are reused by generation and by the policy, reference and
    old-policy forwards; the mrope positions are computed once per prompt as well;
  - generation prefills each prompt once and repeats its KV cache G times (`generate`);
  - the log-prob forwards run the prompt once per group and the G completions on top of its
    (repeated) KV cache (`rollout_logprobs`). The completion tokens never influence the prompt's
    hidden states (causal attention), so this is the same function as the full-sequence forward;
    the prompt's gradient is the sum over its G completions, which autograd gets from the repeat.
    Activation checkpointing drops KV caches inside the checkpointed layers, so with it the
    training forward runs whole sequences, still with shared image features and positions.
The fast path is for the families that declare it (`models.families`: Qwen2-VL, Qwen2.5-VL and
Qwen3-VL, whose deepstack features travel with the image features). Every other family takes the
generic path: the processor encodes each prompt once per completion (so tiles, image masks and token
types stay aligned with their row, whatever the processor's layout), Hugging Face `generate` samples,
and the log-prob forwards run whole sequences with the positions `generate` used. The plain
versions (`generate_hf`, `completion_logprobs` over `sequence_inputs`) also stay as the reference
the fast path is tested against.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from anatomy_lightning.data.prompts import dataset_prompt
from anatomy_lightning.data.schema import Question
from anatomy_lightning.grpo.loss import token_logprobs, token_logprobs_and_entropy
from anatomy_lightning.models.families import ModelFamily, family_of

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
    """The inner model of a fast-path family (`get_rope_index`, `get_image_features`, `visual`),
    through a peft wrapper; None for the generic path (and for anything that is not a VLM)."""
    try:
        if not family_of(model).fast_path:
            return None
    except (ValueError, AttributeError):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def vision_frozen(model: Any) -> bool:
    """True when the vision tower neither trains nor carries an adapter (LoRA/QLoRA default).

    Then its features are the same for the policy, its adapter-off reference and every iteration
    of a step, so they are computed once per image and reused everywhere.
    """
    bb = vl_backbone(model)
    if bb is None:
        return False
    return not any(p.requires_grad or "lora_" in n for n, p in bb.visual.named_parameters())


def _checkpointing(model: Any) -> bool:
    bb = vl_backbone(model)
    return bb is not None and any(getattr(m, "gradient_checkpointing", False) for m in bb.language_model.modules())


@torch.no_grad()
def prepare_prompts(model: Any, inputs: dict[str, Tensor]) -> PromptBatch | None:
    """Positions and image features of the N prompts, computed once (None: not a Qwen2(.5)-VL)."""
    bb = vl_backbone(model)
    if bb is None:
        return None
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
    _, per_prompt = _per_prompt_images(inputs, image_id, bb.config.vision_config.spatial_merge_size)
    out = bb.get_image_features(inputs["pixel_values"], grid)
    feats = tuple(out.pooler_output)  # one (tokens_i, D) per image
    deep = getattr(out, "deepstack_features", None)  # Qwen3-VL: per layer, one (tokens_i, D) per image
    deepstack = tuple(tuple(layer) for layer in deep) if deep is not None else None
    return PromptBatch(inputs, position_ids, per_prompt, feats, deepstack)


@dataclass
class Rollout:
    prompt_inputs: dict[str, Tensor]  # the N prompts, as the processor returned them
    completion_ids: Tensor  # (B, C)
    completion_mask: Tensor  # (B, C) float: 1 up to and including the end-of-turn token
    truncated: Tensor  # (B,) bool: hit max_new_tokens without an end-of-turn token
    texts: list[str]  # decoded completions, B of them
    group_size: int
    prompts: PromptBatch | None = None  # shared positions / image features (None: plain path)
    # generic path: the processor inputs of sequence rows [start, stop), prompts already expanded
    row_inputs: Callable[[int, int], dict[str, Tensor]] | None = None

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


def _cache_of(output: Any) -> Any:
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
    return _cache_of(out), out.logits[:, -1]


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
) -> Tensor:
    """(B, C) completion ids: prefill each prompt once, repeat its KV cache G times, then decode.

    A row that has emitted a stop token is dropped from the batch (and from the KV cache), so
    late tokens cost only the rows still writing; its remaining positions hold `pad_id`, as with
    `generate`. Decoding ends when every row has stopped or after `max_new_tokens`. Before
    `min_new_tokens` the stop tokens cannot be drawn (benchmarks force a fixed length with it).
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
            cache.batch_select_indices(keep)
            rows, tok, attention, next_pos = rows[keep], tok[keep], attention[keep], next_pos[:, keep]
        attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
        step = model(
            input_ids=tok[:, None], attention_mask=attention, position_ids=next_pos + t, cache=cache,
            use_cache=True, logits_to_keep=1,
        )
        logits = step.logits[:, -1].float()
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
) -> Rollout:
    """Sample G completions per prompt (greedy: `do_sample=False`), vision and prefill once per prompt.

    The returned `Rollout.prompts` carries the positions and image features for the log-prob
    forwards of the same step. Models other than Qwen2(.5)-VL go through `generate_hf`.
    """
    tok = processor.tokenizer
    with _eval_mode(model):
        prompts = prepare_prompts(model, prompt_inputs)
        if prompts is None:
            return generate_hf(model, processor, prompt_inputs, num_generations, max_new_tokens, do_sample,
                               temperature, top_p, top_k, min_new_tokens)
        stop_ids = family_of(model).stop_token_ids(model, processor)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
        completion_ids = sample_completions(
            model, prompts, num_generations, max_new_tokens, stop_ids, pad_id, do_sample, temperature, top_p, top_k,
            min_new_tokens,
        )
    mask, truncated = completion_mask_from_ids(completion_ids, stop_ids, pad_id)
    texts = decode_completions(tok, completion_ids, mask, stop_ids)
    return Rollout(prompt_inputs, completion_ids, mask, truncated, texts, num_generations, prompts)


@torch.no_grad()
def generate_hf(
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
    expanded: bool = False,
    row_inputs: Callable[[int, int], dict[str, Tensor]] | None = None,
) -> Rollout:
    """G completions per prompt with Hugging Face `generate`.

    The reference for `generate`, and the generic path. With `expanded`, `prompt_inputs` already
    hold every prompt G times (rows b // G are one prompt), encoded by the processor itself, which
    keeps any processor layout (several images per prompt, tiles) aligned with its row; otherwise
    `generate` repeats the N prompts (`num_return_sequences=G`). Either way the vision tower and
    the prompt prefill run once per *completion*, not once per prompt. `row_inputs(start, stop)`
    gives the processor inputs of sequence rows for the log-prob forwards (default: slices of
    `prompt_inputs` where they can be sliced by row).
    """
    tok = processor.tokenizer
    stop_ids = family_of(model).stop_token_ids(model, processor)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=1 if expanded else num_generations,
        pad_token_id=tok.pad_token_id,
        eos_token_id=stop_ids,
        use_cache=True,
        min_new_tokens=min_new_tokens or None,
    )
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with _eval_mode(model):
        out = model.generate(**prompt_inputs, **kwargs)
    completion_ids = out[:, prompt_inputs["input_ids"].shape[1] :]
    mask, truncated = completion_mask_from_ids(completion_ids, stop_ids, tok.pad_token_id)
    texts = decode_completions(tok, completion_ids, mask, stop_ids)
    if expanded and row_inputs is None:
        row_inputs = functools.partial(_slice_rows, prompt_inputs)
    return Rollout(prompt_inputs, completion_ids, mask, truncated, texts, num_generations, row_inputs=row_inputs)


@torch.no_grad()
def rollout_with_completions(
    model: Any,
    prompt_inputs: dict[str, Tensor],
    completion_ids: Tensor,
    completion_mask: Tensor,
    truncated: Tensor,
    texts: list[str],
    group_size: int,
    row_inputs: Callable[[int, int], dict[str, Tensor]] | None = None,
) -> Rollout:
    """A Rollout for completions sampled in other rollouts (dynamic sampling's merged batch).

    Fast path (`row_inputs` None): the N prompts' positions and image features are computed as
    `generate` computes them. Generic path: `prompt_inputs` hold every prompt G times, and
    `row_inputs` re-encodes row chunks, as in `generate_hf(expanded=True)`.
    """
    prompts = None
    if row_inputs is None:
        with _eval_mode(model):
            prompts = prepare_prompts(model, prompt_inputs)
    return Rollout(prompt_inputs, completion_ids, completion_mask, truncated, texts, group_size, prompts, row_inputs)


def _slice_rows(inputs: dict[str, Tensor], start: int, stop: int) -> dict[str, Tensor]:
    """Rows start:stop of processor inputs whose every tensor has one row per sequence."""
    n = inputs["input_ids"].shape[0]
    if start == 0 and stop >= n:
        return inputs
    bad = [k for k, v in inputs.items() if isinstance(v, Tensor) and (v.ndim == 0 or v.shape[0] != n)]
    if bad:
        raise ValueError(f"cannot slice processor outputs {bad} by row; pass row_inputs to re-encode the rows")
    return {k: v[start:stop] if isinstance(v, Tensor) else v for k, v in inputs.items()}


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """No dropout while sampling; the previous mode comes back even if sampling raises."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def decode_completions(tok: Any, ids: Tensor, mask: Tensor, stop_ids: Sequence[int] = ()) -> list[str]:
    """Decode only the masked tokens, keeping tags like <think> even if they are special tokens;
    the stop, eos and pad tokens are dropped from the text."""
    drop = {t for t in (tok.pad_token, tok.eos_token, *tok.convert_ids_to_tokens(list(stop_ids))) if t}
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
    comp = mask_vision_tokens(rollout.completion_ids, vision_ids, pad_id)
    seq.tensors.update(append_tokens(seq.tensors, comp, rollout.completion_mask))
    return seq


def append_tokens(inputs: dict[str, Tensor], ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Processor inputs with `ids` (attention `mask`) appended to every row, as plain text: the
    other per-token integer tensors (token types) continue with zeros; images are untouched."""
    prompt_ids = inputs["input_ids"]
    out = dict(inputs)
    for key, value in inputs.items():
        if (key not in ("input_ids", "attention_mask") and isinstance(value, Tensor)
                and not value.is_floating_point() and value.shape == prompt_ids.shape):
            out[key] = torch.cat([value, torch.zeros_like(ids, dtype=value.dtype)], dim=1)
    out["input_ids"] = torch.cat([prompt_ids, ids.to(prompt_ids.dtype)], dim=1)
    prompt_mask = inputs["attention_mask"]
    out["attention_mask"] = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1)
    return out


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


# -- log-probs of a rollout, prompt shared ---------------------------------------------------------


def mask_vision_tokens(completion_ids: Tensor, vision_ids: Sequence[int], pad_id: int) -> Tensor:
    """Completion ids to *feed* the model: vision special tokens become padding.

    A sampled <|image_pad|> fed back would make the model look for image features that do not
    exist; `vision_token_guard` keeps those positions (and what follows) out of the loss.
    """
    out = completion_ids.clone()
    for v in vision_ids:
        out[out == v] = pad_id
    return out


def _logprobs(logits: Tensor, targets: Tensor, temperature: float, entropy: bool = False) -> Any:
    """(b, C) log-probs, or (log-probs, entropies) with `entropy` (both of the tempered logits)."""
    if temperature != 1.0:
        logits = logits / temperature
    if entropy:
        return token_logprobs_and_entropy(logits, targets)
    return token_logprobs(logits, targets)


def _cat(parts: list[Any], dim: int = 0) -> Any:
    """torch.cat of tensors, or of (logp, entropy) pairs element-wise."""
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p, dim=dim) for p in zip(*parts))
    return torch.cat(parts, dim=dim)


def _shared_prompt_logprobs(
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
    first = _logprobs(first, targets[:, :1], temperature, entropy)  # (b, 1)
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
    return _cat([first, _logprobs(out.logits, targets[:, 1:], temperature, entropy)], dim=1)


def _full_sequence_logprobs(
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
    return _logprobs(out.logits[:, :-1], ro.completion_ids[rows], temperature, entropy)


def _plain_logprobs(
    model: Any, ro: Rollout, inputs: Tensor, rows: slice, reuse_images: bool, temperature: float,
    entropy: bool = False,
) -> Any:
    """(b, C) log-probs the plain way (every row re-runs prompt and images): the generic path.

    Per-token processor outputs (token types) are extended over the completion as text; models
    with 1D positions get them from the attention mask, as `generate` computes them on left padding.
    """
    family = family_of(model)
    if ro.row_inputs is not None:
        batch = dict(ro.row_inputs(rows.start, rows.stop))
    else:
        cfg = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        merge = getattr(getattr(cfg, "vision_config", None), "spatial_merge_size", 2)
        seq = expand_prompts(ro.prompt_inputs, ro.group_size, getattr(cfg, "image_token_id", -1), merge)
        batch = dict(seq.rows(rows.start, rows.stop))
    C = inputs.shape[1]
    batch = append_tokens(batch, inputs, ro.completion_mask[rows])
    if family.positions_from_mask:
        full = batch["attention_mask"].long()
        batch["position_ids"] = (full.cumsum(-1) - 1).masked_fill(full == 0, 0)
    logits = model(**batch, use_cache=False, logits_to_keep=C + 1).logits[:, :-1]  # (b, C, V)
    return _logprobs(logits, ro.completion_ids[rows], temperature, entropy)


def rollout_logprobs(
    model: Any,
    ro: Rollout,
    completion_inputs: Tensor,
    rows: slice | None = None,
    temperature: float = 1.0,
    reuse_images: bool = True,
    batch_size: int | None = None,
    with_entropy: bool = False,
) -> Any:
    """Per-token log-probs (b, C) of the completions in `rows` (whole groups) under `model`.

    `completion_inputs`: `ro.completion_ids` after `mask_vision_tokens`; the log-probs are of the
    sampled ids themselves. `reuse_images`: whether the rollout's image features are valid for
    `model` (see `PromptBatch`). `batch_size`: rows per forward, rounded to whole groups. Prompts
    are shared across their group unless activation checkpointing is on and gradients are needed.
    `with_entropy`: return (log-probs, entropies), both (b, C); the entropies carry no gradient.
    """
    G = ro.group_size
    B = ro.completion_ids.shape[0]
    rows = rows or slice(0, B)
    start, stop, _ = rows.indices(B)
    if start % G or (stop % G and stop != B):
        raise ValueError(f"rows {start}:{stop} must cover whole groups of {G} completions")
    step = max(G, (batch_size or (stop - start)) // G * G)
    if ro.prompts is None:
        forward = _plain_logprobs
    elif torch.is_grad_enabled() and _checkpointing(model):
        forward = _full_sequence_logprobs
    else:
        forward = _shared_prompt_logprobs
    out = []
    for s in range(start, stop, step):
        r = slice(s, min(s + step, stop))
        out.append(forward(model, ro, completion_inputs[r], r, reuse_images, temperature, with_entropy))
    return _cat(out)
