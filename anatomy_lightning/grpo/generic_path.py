"""The generic path: any Hugging Face image-text-to-text model, through its own processor and `generate`.

The processor encodes each prompt once per completion, so tiles, image masks and token types stay
aligned with their row whatever the processor's layout; Hugging Face `generate` samples, and the
log-prob forwards run whole sequences with the positions `generate` used. `completion_logprobs`
over `sequences.sequence_inputs` is also the plain reference the fast path is tested against.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from anatomy_lightning.grpo.sequences import (
    Rollout,
    SequenceInputs,
    append_tokens,
    completion_mask_from_ids,
    decode_completions,
    eval_mode,
    expand_prompts,
    slice_rows,
    tempered_logprobs,
    token_logprobs,
)
from anatomy_lightning.models.families import family_of


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
    with eval_mode(model):
        out = model.generate(**prompt_inputs, **kwargs)
    completion_ids = out[:, prompt_inputs["input_ids"].shape[1] :]
    mask, truncated = completion_mask_from_ids(completion_ids, stop_ids, tok.pad_token_id)
    texts = decode_completions(tok, completion_ids, mask, stop_ids)
    if expanded and row_inputs is None:
        row_inputs = functools.partial(slice_rows, prompt_inputs)
    return Rollout(prompt_inputs, completion_ids, mask, truncated, texts, num_generations, row_inputs=row_inputs)


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


def plain_logprobs(
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
    return tempered_logprobs(logits, ro.completion_ids[rows], temperature, entropy)
