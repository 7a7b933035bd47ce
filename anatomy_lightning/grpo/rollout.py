"""Rollouts: G sampled completions per prompt and their per-token log-probs, on the family's path.

The one place that reads `ModelFamily.fast_path`. Families that declare it (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL) go through `grpo.fast_path`, which runs the vision tower and the prompt once per group;
every other image-text-to-text model goes through `grpo.generic_path`, which lets its own processor
and `generate` handle whatever image layout it has. Both return the same `Rollout`, and the
log-probs of a rollout follow the path that made it (`Rollout.prompts` is set on the fast path).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from anatomy_lightning.data.schema import Question
from anatomy_lightning.grpo import fast_path, generic_path
from anatomy_lightning.grpo.sequences import Rollout, cat_rows, eval_mode
from anatomy_lightning.models.families import ModelFamily, family_of

Encode = Callable[[list[Question]], dict[str, Tensor]]


def _family_or_none(model: Any) -> ModelFamily | None:
    try:
        return family_of(model)
    except (ValueError, AttributeError):  # not a registered image-text-to-text model
        return None


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
) -> Rollout:
    """G completions per prompt (greedy: `do_sample=False`) for N encoded prompts, on the family's path."""
    family = family or _family_or_none(model)
    settings = dict(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, min_new_tokens=min_new_tokens)
    if family is not None and family.fast_path:
        return fast_path.generate(model, processor, prompt_inputs, num_generations, max_new_tokens, family=family, **settings)
    return generic_path.generate_hf(model, processor, prompt_inputs, num_generations, max_new_tokens, **settings)


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
        with eval_mode(model):
            prompts = fast_path.prepare_prompts(model, prompt_inputs)
    return Rollout(prompt_inputs, completion_ids, completion_mask, truncated, texts, group_size, prompts, row_inputs)


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
    `model` (see `fast_path.PromptBatch`). `batch_size`: rows per forward, rounded to whole groups.
    `with_entropy`: return (log-probs, entropies), both (b, C); the entropies carry no gradient.
    """
    G = ro.group_size
    B = ro.completion_ids.shape[0]
    rows = rows or slice(0, B)
    start, stop, _ = rows.indices(B)
    if start % G or (stop % G and stop != B):
        raise ValueError(f"rows {start}:{stop} must cover whole groups of {G} completions")
    step = max(G, (batch_size or (stop - start)) // G * G)
    forward = generic_path.plain_logprobs if ro.prompts is None else fast_path.logprob_forward(model)
    out = []
    for s in range(start, stop, step):
        r = slice(s, min(s + step, stop))
        out.append(forward(model, ro, completion_inputs[r], r, reuse_images, temperature, with_entropy))
    return cat_rows(out)


def vision_frozen(model: Any, family: ModelFamily | None = None) -> bool:
    """True when the rollout's image features serve every forward of the step: the fast path, and no
    weight of the vision side gets a gradient or carries an adapter -- neither the tower
    (`model.freeze_vit`) nor the projector (`model.freeze_aligner`: the features are the merger's
    output). So with LoRA's defaults, and in full fine-tuning with both frozen; a trained merger
    alone makes it false. The generic path re-encodes images in every forward."""
    family = family or _family_or_none(model)
    return family is not None and family.fast_path and fast_path.vision_frozen(model)


class Rollouts:
    """The policy's rollouts for a training or evaluation step: questions in, a `Rollout` out.

    `encode` turns questions into processor inputs on the right device. On the generic path the
    processor encodes each prompt once per completion, so any image layout (tiles, several images,
    image masks) stays aligned with its row, and row chunks are re-encoded for the log-probs.
    """

    def __init__(
        self, policy: Any, processor: Any, family: ModelFamily, encode: Encode, packed_decode: bool | None = None
    ) -> None:
        self.policy, self.processor, self.family, self.encode = policy, processor, family, encode
        self.packed_decode = packed_decode  # fast path: decode on packed weights (None: auto)

    def sample(self, questions: list[Question], num_generations: int, max_new_tokens: int, **settings: Any) -> Rollout:
        """G completions per question (`do_sample`, `temperature`, `top_p`, `top_k`, `min_new_tokens`)."""
        G = num_generations
        if self.family.fast_path:
            return fast_path.generate(
                self.policy, self.processor, self.encode(questions), G, max_new_tokens, family=self.family,
                packed_decode=self.packed_decode, **settings,
            )
        inputs, row_inputs = self._expanded(questions, G)
        return generic_path.generate_hf(
            self.policy, self.processor, inputs, G, max_new_tokens, expanded=True, row_inputs=row_inputs, **settings
        )

    def from_completions(
        self, questions: list[Question], ids: Tensor, mask: Tensor, truncated: Tensor, texts: list[str], group_size: int
    ) -> Rollout:
        """A Rollout of `questions` (prompts re-encoded) for completions already sampled."""
        if self.family.fast_path:
            inputs, row_inputs = self.encode(questions), None
        else:
            inputs, row_inputs = self._expanded(questions, group_size)
        return rollout_with_completions(self.policy, inputs, ids, mask, truncated, texts, group_size, row_inputs)

    @property
    def path(self) -> str:
        return "fast" if self.family.fast_path else "generic"

    def vision_frozen(self) -> bool:
        return vision_frozen(self.policy, self.family)

    def _expanded(self, questions: list[Question], G: int) -> tuple[dict[str, Tensor], Callable[[int, int], Any]]:
        rows = [q for q in questions for _ in range(G)]
        inputs = self.encode(rows)
        return inputs, lambda s, e: inputs if s == 0 and e >= len(rows) else self.encode(rows[s:e])
