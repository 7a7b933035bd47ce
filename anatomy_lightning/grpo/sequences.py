"""Completions as tensors: masks, decoding, prompt + completion inputs and per-token log-probs.

Shapes: N prompts, G completions each, B = N * G sequences, P prompt tokens (left padded),
C completion tokens (right padded), V vocabulary. Groups are consecutive rows: sequence b
belongs to prompt b // G. Nothing here depends on the model family: both paths use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Rollout:
    """G completions per prompt, as sampled: ids, masks, texts, and what the log-prob forwards reuse."""

    prompt_inputs: dict[str, Tensor]  # the N prompts, as the processor returned them
    completion_ids: Tensor  # (B, C)
    completion_mask: Tensor  # (B, C) float: 1 up to and including the end-of-turn token
    truncated: Tensor  # (B,) bool: hit max_new_tokens without an end-of-turn token
    texts: list[str]  # decoded completions, B of them
    group_size: int
    prompts: Any = None  # fast path: its `PromptBatch` (shared positions, image features); None: generic
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


def per_prompt_images(inputs: dict[str, Tensor], image_token_id: int, merge: int) -> tuple[list[int], list[int]]:
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
    pixel_rows, grid_rows = per_prompt_images(inputs, image_token_id, merge)
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


def slice_rows(inputs: dict[str, Tensor], start: int, stop: int) -> dict[str, Tensor]:
    """Rows start:stop of processor inputs whose every tensor has one row per sequence."""
    n = inputs["input_ids"].shape[0]
    if start == 0 and stop >= n:
        return inputs
    bad = [k for k, v in inputs.items() if isinstance(v, Tensor) and (v.ndim == 0 or v.shape[0] != n)]
    if bad:
        raise ValueError(f"cannot slice processor outputs {bad} by row; pass row_inputs to re-encode the rows")
    return {k: v[start:stop] if isinstance(v, Tensor) else v for k, v in inputs.items()}


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
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


def mask_vision_tokens(completion_ids: Tensor, vision_ids: Sequence[int], pad_id: int) -> Tensor:
    """Completion ids to *feed* the model: vision special tokens become padding.

    A sampled <|image_pad|> fed back would make the model look for image features that do not
    exist; `vision_token_guard` keeps those positions (and what follows) out of the loss.
    """
    out = completion_ids.clone()
    for v in vision_ids:
        out[out == v] = pad_id
    return out


def _check_logits(logits: Tensor, targets: Tensor) -> None:
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and targets (B, T), got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )


def token_logprobs(logits: Tensor, targets: Tensor, chunk_size: int = 0) -> Tensor:
    """log p(target) per position: gather(logits) - logsumexp(logits), in float32.

    Avoids materialising the (B, T, V) log-softmax; with `chunk_size` > 0 only that many rows of
    B are upcast at a time, which bounds the float32 copy for a 150k vocabulary. Temperature is
    the caller's business (divide the logits before calling).
    """
    return token_logprobs_and_entropy(logits, targets, chunk_size, entropy=False)[0]


def token_logprobs_and_entropy(
    logits: Tensor, targets: Tensor, chunk_size: int = 0, entropy: bool = True
) -> tuple[Tensor, Tensor | None]:
    """(log p(target), entropy of the next-token distribution) per position, both float32.

    The entropy H = logsumexp(z) - sum softmax(z) * z is computed without gradient, as TRL does:
    it is a diagnostic and a mask criterion (`top_entropy_quantile`), never a loss term here.
    Same chunking as `token_logprobs`; the entropy is None when `entropy` is False.
    """
    _check_logits(logits, targets)
    step = chunk_size if chunk_size > 0 else max(1, logits.shape[0])
    logps, ents = [], []
    for lg, tg in zip(logits.split(step), targets.split(step)):
        lg = lg.float()  # (b, T, V)
        lse = torch.logsumexp(lg, dim=-1)  # (b, T)
        logps.append(lg.gather(-1, tg.long().unsqueeze(-1)).squeeze(-1) - lse)
        if entropy:
            with torch.no_grad():
                ents.append(lse - (torch.softmax(lg, dim=-1) * lg).sum(-1))
    if not logps:
        empty = logits.new_zeros(targets.shape, dtype=torch.float32)
        return empty, (empty.clone() if entropy else None)
    return torch.cat(logps), (torch.cat(ents) if entropy else None)


def tempered_logprobs(logits: Tensor, targets: Tensor, temperature: float, entropy: bool = False) -> Any:
    """(b, C) log-probs, or (log-probs, entropies) with `entropy` (both of the tempered logits)."""
    if temperature != 1.0:
        logits = logits / temperature
    if entropy:
        return token_logprobs_and_entropy(logits, targets)
    return token_logprobs(logits, targets)


def cat_rows(parts: list[Any], dim: int = 0) -> Any:
    """torch.cat of tensors, or of (logp, entropy) pairs element-wise."""
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p, dim=dim) for p in zip(*parts))
    return torch.cat(parts, dim=dim)
