"""Group-relative advantages: each completion's reward against its group's, and which groups teach.

A group whose rewards are all equal gives no gradient; `GroupAdvantages.has_signal` marks them, and
their share is the paper's invalid gradient ratio that GDQA and dynamic sampling act on. That holds
for every estimator (`advantage_estimator`: grpo, rloo, reinforce_plus_plus, ms-swift's names) and
both ways of combining several reward functions (`multi_objective_aggregation`, TRL's names).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


SCALE_REWARDS = ("group", "batch", "none")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
# scale_rewards when it is not set (None), per estimator: ms-swift's defaults
DEFAULT_SCALE_REWARDS = {"grpo": "group", "rloo": "none", "reinforce_plus_plus": "batch"}


@dataclass
class GroupAdvantages:
    """Per-completion advantages plus the group statistics the trainer logs.

    `has_signal[n]` is False for a group whose scored rewards are (numerically) all equal, or that
    has fewer than two scored members: it gives no gradient, and the share of such groups is the
    paper's invalid gradient ratio. `scored[i]` is False where no reward function could score
    completion i (its reward is NaN): it is left out of every statistic and has advantage 0.
    """

    advantages: Tensor  # (B,)
    group_mean: Tensor  # (N,) mean of the scored rewards; 0 for a group with none scored
    group_std: Tensor  # (N,) sample std (Bessel-corrected) of the scored rewards; 0 below 2
    has_signal: Tensor  # (N,) bool
    scored: Tensor | None = None  # (B,) bool

    def metrics(self) -> dict[str, float]:
        """TRL's `reward_std` (mean group std) and `frac_reward_zero_std`, as plain floats."""
        return {
            "reward_std": float(self.group_std.float().mean()),
            "frac_reward_zero_std": float((~self.has_signal).float().mean()),
        }


def _scale_mode(scale_rewards: bool | str | None, estimator: str = "grpo") -> str:
    """True -> "group", False -> "none" (the old boolean spelling), None -> the estimator's default
    (`DEFAULT_SCALE_REWARDS`), else one of SCALE_REWARDS."""
    if scale_rewards is None:
        return DEFAULT_SCALE_REWARDS[_choice("advantage_estimator", estimator, ADVANTAGE_ESTIMATORS)]
    if scale_rewards is True:
        return "group"
    if scale_rewards is False:
        return "none"
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(
            f"scale_rewards={scale_rewards!r}; choose one of {', '.join(SCALE_REWARDS)} "
            "(True means 'group', False means 'none')"
        )
    return str(scale_rewards)


def resolve_scale_rewards(scale_rewards: bool | str | None, estimator: str = "grpo") -> bool | str:
    """`scale_rewards` as given, or the estimator's default when it is None (ms-swift's rule: group for
    grpo, none for rloo, batch for reinforce_plus_plus)."""
    return _scale_mode(None, estimator) if scale_rewards is None else scale_rewards


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; choose one of {', '.join(choices)}")
    return value


def _masked_std(values: Tensor, keep: Tensor, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """(mean, sample std) of `values` where `keep`, along `dim` (all when None); std 0 below 2."""
    k = keep.to(values.dtype)
    n = k.sum() if dim is None else k.sum(dim)
    x = torch.where(keep, values, torch.zeros_like(values))
    mean = (x.sum() if dim is None else x.sum(dim)) / n.clamp(min=1)
    centred = torch.where(keep, values - (mean if dim is None else mean.unsqueeze(dim)), 0.0)
    sq = centred.square()
    var = (sq.sum() if dim is None else sq.sum(dim)) / (n - 1).clamp(min=1)
    std = torch.where(n >= 2, var.sqrt(), torch.zeros_like(var))
    return mean, std


def normalize_then_sum(per_function: Tensor, weights: Sequence[float] | Tensor, group_size: int,
                       eps: float = 1e-4) -> Tensor:
    """GDPO's aggregate (TRL's `multi_objective_aggregation="normalize_then_sum"`, first stage): each
    reward function's column is normalised within its group, (r - mean) / (std + eps) over the scored
    members (sample std), then the columns are summed with their weights.

    `per_function` is (B, K), NaN where a function could not score a completion: that value is left
    out of its column's group statistics and of the completion's sum (a column with a single scored
    member in a group contributes 0 there). The result is NaN only where no function scored (B,).
    """
    if per_function.dim() != 2:
        raise ValueError(f"per_function must have shape (B, K), got {tuple(per_function.shape)}")
    B, K = per_function.shape
    w = torch.as_tensor(weights, dtype=per_function.dtype, device=per_function.device)
    if w.shape != (K,):
        raise ValueError(f"{w.numel()} weights for {K} reward functions")
    values = per_function.view(-1, group_size, K)
    keep = ~torch.isnan(values)
    mean, std = _masked_std(values, keep, dim=1)  # (N, K) each
    normalised = torch.where(keep, (values - mean[:, None]) / (std[:, None] + eps), torch.zeros_like(values))
    total = (normalised * w).sum(-1).reshape(B)
    return torch.where(keep.any(-1).reshape(B), total, torch.full_like(total, math.nan))


def _centred(values: Tensor, keep: Tensor, estimator: str, batch_baseline: bool) -> Tensor:
    """r - baseline on the scored members (0 elsewhere): the group mean (grpo, reinforce_plus_plus),
    the mean of the *other* scored members (rloo), or the mean of the whole batch (grpo under
    normalize_then_sum, as TRL does)."""
    if batch_baseline:
        mean, _ = _masked_std(values, keep)
        return torch.where(keep, values - mean, torch.zeros_like(values))
    mean, _ = _masked_std(values, keep, dim=1)
    centred = torch.where(keep, values - mean[:, None], torch.zeros_like(values))
    if estimator == "rloo":  # r_i - (S - r_i) / (n - 1) = n / (n - 1) * (r_i - mean)
        n = keep.sum(1, keepdim=True).to(values.dtype)
        centred = centred * n / (n - 1).clamp(min=1)
    return centred


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale_rewards: bool | str | None = None,
    std_tol: float = 1e-6,
    eps: float = 1e-4,
    estimator: str = "grpo",
    aggregation: str = "sum_then_normalize",
    per_function: Tensor | None = None,
    weights: Sequence[float] | Tensor | None = None,
) -> GroupAdvantages:
    """A_i = r_i - baseline, divided by (std + eps) unless `scale_rewards` is "none".

    `estimator` (ms-swift's `advantage_estimator`; verl/EasyR1's `adv_estimator`) picks the baseline:

    - "grpo": the group mean.
    - "rloo": the mean of the group's *other* scored members (leave-one-out, TRL's RLOOTrainer and
      ms-swift): A_i = r_i - (S - r_i) / (n - 1) = n / (n - 1) * (r_i - mean).
    - "reinforce_plus_plus": the group mean, then (scale_rewards "batch") the advantages are divided by
      *their* std over the whole batch: ms-swift's reinforce_plus_plus, which is verl's
      `reinforce_plus_plus_baseline` (verl also subtracts the batch mean of the advantages, which is 0:
      every group's are centred already). Not verl's plain `reinforce_plus_plus`, which has no group
      baseline and whitens discounted per-token returns.

    `scale_rewards`: "group" (True) divides by the group's reward std, "batch" by the std of all scored
    rewards of the batch (PPO-Lite, TRL's "batch"; for reinforce_plus_plus the std of the advantages),
    "none" (False) not at all (Dr. GRPO). None takes the estimator's default as ms-swift does: group
    for grpo, none for rloo, batch for reinforce_plus_plus. The std is the sample (N-1) std, as
    `torch.std`, TRL and ms-swift use.

    `aggregation` "normalize_then_sum" (GDPO, TRL 1.16's `multi_objective_aggregation`) needs
    `per_function` (B, K) and `weights` (K,): the reward becomes `normalize_then_sum(...)` and, as in
    TRL, it is then divided by its std over the batch whatever `scale_rewards` says (grpo: minus the
    batch mean, TRL's exact formula; rloo / reinforce_plus_plus: their own baselines). `rewards` (the
    weighted sum) still gives `group_mean` / `group_std`, the logged reward statistics.

    A group whose std (of the reward that is used: the weighted sum, or the normalize_then_sum
    aggregate) is below `std_tol`, or with fewer than two scored members, has no signal and gets
    advantages of exactly 0, whatever the estimator: rewards like 0.3, 0.3, 0.3 leave ~1e-8 of float
    noise that division by (std + eps) would otherwise turn into a spurious, sign-random gradient. A
    NaN reward means "could not be scored" (a reward function returned None for it): that completion
    is left out of every baseline and std and gets advantage 0.
    """
    estimator = _choice("advantage_estimator", estimator, ADVANTAGE_ESTIMATORS)
    aggregation = _choice("multi_objective_aggregation", aggregation, MULTI_OBJECTIVE_AGGREGATIONS)
    mode = _scale_mode(scale_rewards, estimator)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (B,), got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the {rewards.numel()} rewards; the batch "
            "must hold whole groups of consecutive completions (B = num_prompts * group_size)"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if torch.isinf(rewards).any():
        raise ValueError(f"rewards contain inf: {rewards.tolist()}; check the reward functions")

    scored = ~torch.isnan(rewards)  # (B,)
    grouped = rewards.view(-1, group_size)  # (N, G)
    keep = scored.view(-1, group_size)
    mean, std = _masked_std(grouped, keep, dim=1)  # (N,), (N,)
    values, spread = grouped, std
    if aggregation == "normalize_then_sum":
        if per_function is None or weights is None:
            raise ValueError("multi_objective_aggregation='normalize_then_sum' needs per_function and weights")
        if per_function.shape[0] != rewards.numel():
            raise ValueError(f"per_function has {per_function.shape[0]} rows for {rewards.numel()} rewards")
        aggregate = normalize_then_sum(per_function.to(rewards.dtype), weights, group_size, eps)
        if not torch.equal(~torch.isnan(aggregate), scored):
            raise ValueError("rewards and per_function disagree on which completions were scored")
        values = aggregate.view(-1, group_size)
        _, spread = _masked_std(values, keep, dim=1)
        mode = "batch"  # TRL: the aggregate is normalised over the batch; scale_rewards is not used
    has_signal = (keep.sum(1) >= 2) & (spread >= std_tol)
    live = has_signal[:, None] & keep

    batch_baseline = aggregation == "normalize_then_sum" and estimator == "grpo"
    centred = _centred(values, keep, estimator, batch_baseline)
    if mode == "group":
        centred = centred / (spread[:, None] + eps)
    elif mode == "batch":
        if estimator == "reinforce_plus_plus":  # the std of the advantages themselves
            _, batch_std = _masked_std(torch.where(live, centred, torch.zeros_like(centred)), keep)
        else:
            _, batch_std = _masked_std(values, keep)
        centred = centred / (batch_std + eps)
    advantages = torch.where(live, centred, torch.zeros_like(centred))
    return GroupAdvantages(advantages.reshape(-1), mean, std, has_signal, scored)
