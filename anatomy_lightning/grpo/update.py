"""The inputs of the policy update and its loss, one group-aligned row chunk at a time.

Forward and backward run chunk by chunk (`model.logprob_batch_size` rows: the activation memory
knob); `chunk_weight` makes the sum of the chunks' losses equal the full-batch loss of every
`loss_type`, so chunking changes memory, never the objective.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from anatomy_lightning.grpo.advantages import GroupAdvantages
from anatomy_lightning.grpo.loss import LossOutput, chunk_weight, grpo_loss, needs_global_token_count
from anatomy_lightning.grpo.policy_terms import LossKnobs
from anatomy_lightning.grpo.rollout import rollout_logprobs
from anatomy_lightning.grpo.sequences import Rollout
from anatomy_lightning.grpo.token_stats import global_token_count, high_entropy_threshold


@dataclass
class UpdateBatch:
    """What every optimiser iteration of one rollout shares."""

    rollout: Rollout
    completion_inputs: Tensor  # completion ids with vision tokens replaced by padding (B, C)
    advantages: GroupAdvantages
    mask: Tensor  # (B, C) tokens in the loss
    ref_logp: Tensor | None  # reference log-probs (None when beta = 0)
    old_logp: Tensor | None  # the policy before this step's update (None when mu = 1)
    num_items: Tensor | None  # dapo, cispo, vespo: tokens of the whole generation batch over every rank
    reuse_images: bool  # the rollout's image features are valid for the policy forward


@torch.no_grad()
def prepare_update(
    hp: Mapping[str, Any], policy: Any, reference: AbstractContextManager[Any], reference_is_copy: bool,
    ro: Rollout, completion_inputs: Tensor, adv: GroupAdvantages, mask: Tensor, vision_frozen: bool,
) -> UpdateBatch:
    """Reference and old log-probs (no grad) and the global token count (dapo, cispo, vespo), once per rollout.

    The rollout's image features were made by the policy before this step's update: valid for the
    old policy, and for the training forward and the adapter-off reference if the tower is frozen.
    """
    ref_logp = old_logp = None
    if hp["beta"] != 0:
        with reference as ref:
            ref_logp = rollout_logprobs(ref, ro, completion_inputs, temperature=hp["temperature"],
                                        batch_size=hp["logprob_batch_size"],
                                        reuse_images=vision_frozen and not reference_is_copy)
    if hp["num_iterations"] > 1:
        old_logp = rollout_logprobs(policy, ro, completion_inputs, temperature=hp["temperature"],
                                    batch_size=hp["logprob_batch_size"])
    num_items = global_token_count(mask) if needs_global_token_count(hp["loss_type"]) else None  # every rank calls it
    return UpdateBatch(ro, completion_inputs, adv, mask, ref_logp, old_logp, num_items, vision_frozen)


def chunk_losses(hp: Mapping[str, Any], policy: Any, batch: UpdateBatch) -> Iterator[tuple[LossOutput, float]]:
    """(loss output, weight) per group-aligned row chunk: sum(weight * loss) is the batch loss."""
    G = hp["num_generations"]
    ro, adv, mask, n_items = batch.rollout, batch.advantages, batch.mask, batch.num_items
    B = ro.completion_ids.shape[0]
    step = max(G, (hp["logprob_batch_size"] or B) // G * G)
    for s in range(0, B, step):
        rows, groups = slice(s, min(s + step, B)), slice(s // G, (s + step) // G)
        logp, ent = rollout_logprobs(policy, ro, batch.completion_inputs, rows, hp["temperature"],
                                     reuse_images=batch.reuse_images, with_entropy=True)
        quantile = hp["top_entropy_quantile"]
        thr = high_entropy_threshold(ent, mask[rows], quantile) if quantile < 1 else None
        out = grpo_loss(
            hp["loss_type"], logp, adv.advantages[rows], mask[rows],
            old_logp=None if batch.old_logp is None else batch.old_logp[rows],
            ref_logp=None if batch.ref_logp is None else batch.ref_logp[rows],
            beta=hp["beta"], max_completion_length=hp["max_new_tokens"], has_signal=adv.has_signal[groups],
            group_size=G, importance_sampling_level=hp["importance_sampling_level"],
            use_bias_correction_kl=hp["use_bias_correction_kl"], entropy=ent,
            top_entropy_quantile=quantile, entropy_threshold=thr, num_items_in_batch=n_items,
            **{f.name: hp[f.name] for f in fields(LossKnobs)},  # clip range, delta, sapo / vespo knobs
        )
        yield out, chunk_weight(hp["loss_type"], mask[rows], mask, adv.has_signal[groups], adv.has_signal,
                                num_items_in_batch=n_items)


def backward_chunks(
    hp: Mapping[str, Any], policy: Any, batch: UpdateBatch, backward: Callable[[Tensor, float], None],
    all_finite: Callable[[bool], bool],
) -> tuple[float, list[LossOutput]] | None:
    """Forward and `backward(loss, weight)` chunk by chunk: (batch loss, chunk outputs), or None as
    soon as a chunk's loss is not finite on some rank (`all_finite` is the ranks' joint decision:
    a rank that skipped its backward would leave the others waiting in the gradient all-reduce)."""
    total, outs = 0.0, []
    for out, w in chunk_losses(hp, policy, batch):
        if not all_finite(bool(torch.isfinite(out.loss))):
            return None
        backward(out.loss, w)
        total += out.loss.item() * w
        outs.append(out)
    return total, outs


@torch.no_grad()
def sync_reference(policy: torch.nn.Module, reference: torch.nn.Module, alpha: float) -> int:
    """TR-DPO's reference update, as TRL's `SyncRefModelCallback` does it (`sync_ref_model`):
    ref = alpha * policy + (1 - alpha) * ref, parameter by parameter, in place. Returns how many
    tensors were mixed.

    Only the policy's trainable parameters are mixed: a frozen one (e.g. the vision tower) is the same
    in both models, where the mixup would change nothing but float rounding. So the reference differs
    from its initial weights only where the policy trains, and a checkpoint needs only those.
    """
    mixed = 0
    for (rn, r), (pn, p) in zip(reference.named_parameters(), policy.named_parameters(), strict=True):
        if rn != pn:
            raise ValueError(f"reference and policy parameters do not line up ({rn} vs {pn})")
        if p.requires_grad:
            r.mul_(1.0 - alpha).add_(p.detach().to(r.dtype), alpha=alpha)
            mixed += 1
    return mixed


def sync_due(step: int, every: int) -> bool:
    """TRL's schedule: after the optimiser step that makes `step` (1-based) a multiple of `every`."""
    return step > 0 and step % every == 0
