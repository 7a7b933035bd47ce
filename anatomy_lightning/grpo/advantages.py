"""Group-relative advantages: each completion's reward against its group's, and which groups teach.

A group whose rewards are all equal gives no gradient; `GroupAdvantages.has_signal` marks them, and
their share is the paper's invalid gradient ratio that GDQA and dynamic sampling act on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


SCALE_REWARDS = ("group", "batch", "none")


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


def _scale_mode(scale_rewards: bool | str) -> str:
    """True -> "group", False -> "none" (the old boolean spelling), else one of SCALE_REWARDS."""
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


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale_rewards: bool | str = True,
    std_tol: float = 1e-6,
    eps: float = 1e-4,
) -> GroupAdvantages:
    """A_i = r_i - mean(group), divided by (std + eps) unless `scale_rewards` is "none".

    `scale_rewards`: "group" (True) divides by the group's std, "batch" by the std of all scored
    rewards of the batch (PPO-Lite, TRL's "batch"), "none" (False) not at all (Dr. GRPO). The std is
    the sample (N-1) std, as `torch.std` and TRL use. A group whose std is below `std_tol`, or with
    fewer than two scored members, has no signal and gets advantages of exactly 0: rewards like
    0.3, 0.3, 0.3 leave ~1e-8 of float noise that division by (std + eps) would otherwise turn into
    a spurious, sign-random gradient. A NaN reward means "could not be scored" (a reward function
    returned None for it): that completion is left out of the mean and std and gets advantage 0.
    """
    mode = _scale_mode(scale_rewards)
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
    has_signal = (keep.sum(1) >= 2) & (std >= std_tol)

    centred = torch.where(keep, grouped - mean[:, None], torch.zeros_like(grouped))
    if mode == "group":
        centred = centred / (std[:, None] + eps)
    elif mode == "batch":
        _, batch_std = _masked_std(rewards, scored)
        centred = centred / (batch_std + eps)
    live = has_signal[:, None] & keep
    advantages = torch.where(live, centred, torch.zeros_like(centred))
    return GroupAdvantages(advantages.reshape(-1), mean, std, has_signal, scored)
