"""What a training step logs: TRL's `train/*` tags with TRL's meanings, the method's own tags, and
batch metrics that combine exactly across row chunks and ranks (sums and counts, not means)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from anatomy_lightning.data.schema import Question
from anatomy_lightning.distributed import world_size
from anatomy_lightning.grpo.advantages import GroupAdvantages
from anatomy_lightning.grpo.dynamic_sampling import Selection
from anatomy_lightning.grpo.loss import LossOutput, finish_means
from anatomy_lightning.grpo.rewards import reward_metrics
from anatomy_lightning.grpo.sequences import Rollout


def combine_chunk_metrics(outputs: Iterable[LossOutput], across_ranks: bool = True) -> dict[str, float]:
    """Exact batch metrics from row chunks: sum of numerators over sum of denominators.

    Token means (`kl`, `entropy`, `clip_ratio/*_mean`) are weighted by token, not by row, and
    `clip_ratio/low_min` / `high_max` are the min / max over every sequence, as TRL 1.16 logs them.
    With `across_ranks` and torch.distributed initialised the reduction also spans the ranks (every
    rank must call this). `alpha` is not here: it belongs to the whole batch
    (`GroupAdvantages.has_signal`), not to a chunk.
    """
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    mins: dict[str, float] = {}
    maxs: dict[str, float] = {}
    for out in outputs:
        for k, v in out.sums.items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0.0) + out.counts.get(k, 0.0)
        for k, v in out.mins.items():
            mins[k] = min(mins.get(k, math.inf), v)
        for k, v in out.maxs.items():
            maxs[k] = max(maxs.get(k, -math.inf), v)
    if across_ranks and world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        keys = sorted(sums)
        packed = torch.tensor([sums[k] for k in keys] + [counts[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        sums = dict(zip(keys, packed[: len(keys)].tolist()))
        counts = dict(zip(keys, packed[len(keys) :].tolist()))
        for table, op in ((mins, dist.ReduceOp.MIN), (maxs, dist.ReduceOp.MAX)):
            names = sorted(table)
            if names:
                t = torch.tensor([table[k] for k in names], dtype=torch.float64, device=device)
                dist.all_reduce(t, op=op)
                table.update(zip(names, t.tolist()))
    return finish_means(sums, counts, mins, maxs)


def completion_length_metrics(lengths: Tensor, truncated: Tensor) -> dict[str, float]:
    """TRL's `completions/*` tags from completion lengths (B,) and truncation flags (B,).

    "terminated" completions are those that ended with the stop token, i.e. not truncated at the
    generation limit; with none terminated their statistics are 0, as in TRL. Gather lengths and
    flags from all ranks first for a multi-process figure.
    """
    lengths = lengths.detach().float().flatten()
    truncated = truncated.detach().bool().flatten()
    term = lengths[~truncated]
    out = {
        "completions/mean_length": float(lengths.mean()) if lengths.numel() else 0.0,
        "completions/min_length": float(lengths.min()) if lengths.numel() else 0.0,
        "completions/max_length": float(lengths.max()) if lengths.numel() else 0.0,
        "completions/clipped_ratio": float(truncated.float().mean()) if truncated.numel() else 0.0,
    }
    for stat, fn in (("mean", torch.mean), ("min", torch.min), ("max", torch.max)):
        out[f"completions/{stat}_terminated_length"] = float(fn(term)) if term.numel() else 0.0
    return out


def prompt_tokens(ro: Rollout) -> int:
    """Prompt tokens the policy read for this rollout's B completions (each prompt once per completion)."""
    mask = (ro.prompt_inputs or {}).get("attention_mask")
    if mask is None:
        return 0
    n = int(mask.sum())
    expanded = mask.shape[0] == ro.completion_ids.shape[0]  # the generic path encodes prompts per row
    return n if expanded else n * ro.group_size


def train_metrics(
    ro: Rollout, rewards: Tensor, per_fn: dict[str, Tensor], adv: GroupAdvantages, loss_metrics: dict[str, float],
    *, non_finite_steps: int, num_tokens: int, completions: int, lr: float,
) -> dict[str, Any]:
    """`train/*` with TRL's tags and meanings (reward, rewards/<fn>/mean|std, reward_std,
    frac_reward_zero_std, kl, entropy, clip_ratio/*, completions/*, num_tokens), plus ours."""
    lengths = completion_length_metrics(ro.lengths, ro.truncated)
    logs: dict[str, Any] = {
        **reward_metrics(rewards, per_fn),  # reward, rewards/<fn>/mean|std (NaN = unscored, left out)
        **adv.metrics(),  # reward_std, frac_reward_zero_std
        **lengths,
        # our earlier tags for the same quantities
        "invalid_gradient_ratio": 1.0 - adv.has_signal.float().mean(),
        "completion_length/mean": lengths["completions/mean_length"],
        "completion_length/min": lengths["completions/min_length"],
        "completion_length/max": lengths["completions/max_length"],
        "truncated_share": lengths["completions/clipped_ratio"],
        "non_finite_steps": float(non_finite_steps),
        "num_tokens": float(num_tokens),
        "completions": float(completions),
        "lr": lr,
        **loss_metrics,
    }
    return {f"train/{k}": v for k, v in logs.items()}


def dynamic_sample_metrics(sel: Selection) -> dict[str, float]:
    """`dynamic_sample/*`: rounds run, groups kept without signal, and what the data scheduled."""
    return {
        "dynamic_sample/rounds": float(sel.rounds),
        "dynamic_sample/filled_without_signal": float(sel.filled_without_signal),
        "dynamic_sample/first_invalid_ratio": 1.0 - float(sel.first.has_signal.float().mean()),
        # train/reward is over the kept groups (biased towards groups with spread); this is the
        # mean reward of what the data scheduled, comparable with a run without dynamic sampling
        "dynamic_sample/first_reward": float(sel.first.rewards.float().nanmean()),
    }


def same_step_augment_metrics(
    sel: Selection, adv: GroupAdvantages, batch: list[Question], draws: dict[str, int]
) -> dict[str, float]:
    """`augment/*` of same-step GDQA: the share of groups without signal before and after replacement."""
    return {
        "augment/invalid_before": 1.0 - float(sel.first.has_signal.float().mean()),
        "augment/invalid_after": 1.0 - float(adv.has_signal.float().mean()),
        "augment/replaced": float(sum(bool(q.metadata.get("augmented")) for q in batch)),
        "augment/rewrites_sampled": float(draws["rewrites"]),
    }
