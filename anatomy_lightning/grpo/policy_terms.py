"""The per-token policy term of each `loss_type`, picked by name from `POLICY_TERMS`: the clipped
surrogate (grpo, bnpo, dapo, dr_grpo, luspo; `delta` caps its unclipped ratio), gpg's plain policy
gradient, and TRL 1.16's cispo, sapo and vespo. How the per-token values are reduced to one loss is
`grpo.loss`'s business (`LOSS_AGGREGATIONS`), so each term here is a few lines of tensor maths.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["POLICY_TERMS", "TWO_SIDED_CLIP_LOSS_TYPES", "LossKnobs", "PolicyTerm", "TermInputs"]


@dataclass(frozen=True)
class LossKnobs:
    """The loss-type settings, with TRL's names and defaults (`GRPOConfig`)."""

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2  # cispo: eps_max, the cap on the ratio itself (ScaleRL: 5.0)
    delta: float | None = None  # two-sided clipping: cap of the unclipped ratio (None = off)
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0


@dataclass
class PolicyTerm:
    """A policy term per token (broadcastable to (B, T)) and what it reports.

    `low` / `high`: hard-clip flags shaped like the ratio (TRL's clip_ratio/*); `extra`: further
    metrics as (values, one value per row?) to average like TRL's `global_masked_mean`.
    """

    per_token: Tensor
    low: Tensor | None = None
    high: Tensor | None = None
    extra: dict[str, tuple[Tensor, bool]] = field(default_factory=dict)


@dataclass(frozen=True)
class TermInputs:
    """What a policy term may read. lp, log_ratio, mask: (B, T), 0 on padding; adv: (B, 1);
    ratio: the importance ratio at the chosen level, (B, T) or (B, 1) for "sequence"."""

    lp: Tensor
    log_ratio: Tensor  # token-level log(pi / pi_old), whatever the importance sampling level
    ratio: Tensor
    adv: Tensor
    mask: Tensor
    sequence_level: bool


def _clipped_surrogate(x: TermInputs, k: LossKnobs) -> PolicyTerm:
    """-min(r*A, clip(r, 1-eps_low, 1+eps_high)*A), r capped at `delta` in the first term when set
    (INTELLECT-2's two-sided clipping, verl's clip_ratio_c)."""
    clipped = x.ratio.clamp(1 - k.epsilon_low, 1 + k.epsilon_high)
    ratio = x.ratio if k.delta is None else x.ratio.clamp(max=k.delta)
    return PolicyTerm(
        -torch.minimum(ratio * x.adv, clipped * x.adv),
        low=(ratio < 1 - k.epsilon_low) & (x.adv < 0),
        high=(ratio > 1 + k.epsilon_high) & (x.adv > 0),
    )


def _policy_gradient(x: TermInputs, k: LossKnobs) -> PolicyTerm:
    """gpg: -logp*A, no ratio, no clip (the Anatomy-R1 authors' trainer)."""
    return PolicyTerm(-x.lp * x.adv)


def _cispo(x: TermInputs, k: LossKnobs) -> PolicyTerm:
    """CISPO (MiniMax-M1): -sg(min(r, eps_max))*A*logp, eps_max = epsilon_high; the weight is
    clipped, never the gradient. A capped ratio with A > 0 counts as clip_ratio/high (and
    TRL's cispo_clip_ratio)."""
    high = (x.ratio > k.epsilon_high) & (x.adv > 0)
    per_token = -x.ratio.clamp(max=k.epsilon_high).detach() * x.adv * x.lp
    return PolicyTerm(per_token, high=high, extra={"cispo_clip_ratio": (high, x.sequence_level)})


def _sapo(x: TermInputs, k: LossKnobs) -> PolicyTerm:
    """SAPO: -sigmoid(tau*(r-1))*4/tau*A, tau = sapo_temperature_pos where A > 0, else _neg: a
    soft gate whose gradient is r*A at r = 1 and fades off-policy (nothing is hard-clipped)."""
    tau = _by_sign(x.adv > 0, k.sapo_temperature_pos, k.sapo_temperature_neg, x.ratio)
    return PolicyTerm(-torch.sigmoid(tau * (x.ratio - 1)) * 4 / tau * x.adv)


def _by_sign(condition: Tensor, if_true: float, if_false: float, like: Tensor) -> Tensor:
    """Per row: `if_true` where `condition`, else `if_false`, in `like`'s dtype (TRL's torch.where on
    two floats rounds them to float32: 1.05 becomes 1.0499999523, 5e-8 off in float64)."""
    return torch.where(condition, like.new_tensor(if_true), like.new_tensor(if_false))


_LOG_W_MIN = math.log(1e-8)


def _vespo(x: TermInputs, k: LossKnobs) -> PolicyTerm:
    """VESPO: -sg(phi(w))*A*logp, w = exp(sum_t log r_t) per sequence (token log-ratios clamped to
    [-20, 20], log w to [ln 1e-8, 20]), phi(w) = exp(lam + kk*ln w - lam*w) (phi(1) = 1; kk, lam =
    vespo_k_pos / vespo_lambda_pos where A >= 0, else _neg; lam >= 1e-4)."""
    with torch.no_grad():
        log_w = (x.log_ratio.clamp(-20.0, 20.0) * x.mask).sum(1, keepdim=True).clamp(_LOG_W_MIN, 20.0)
        nonneg = x.adv >= 0
        kk = _by_sign(nonneg, k.vespo_k_pos, k.vespo_k_neg, log_w)
        lam = _by_sign(nonneg, k.vespo_lambda_pos, k.vespo_lambda_neg, log_w).clamp(min=1e-4)
        phi = torch.exp(lam + kk * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return PolicyTerm(-phi * x.adv * x.lp, extra={"vespo/phi_seq_mean": (phi, True)})


POLICY_TERMS: dict[str, Callable[[TermInputs, LossKnobs], PolicyTerm]] = {
    "grpo": _clipped_surrogate,
    "bnpo": _clipped_surrogate,
    "dapo": _clipped_surrogate,
    "dr_grpo": _clipped_surrogate,
    "luspo": _clipped_surrogate,
    "gpg": _policy_gradient,
    "cispo": _cispo,
    "sapo": _sapo,
    "vespo": _vespo,
}
# the loss types `delta` acts on (TRL ignores it for the others)
TWO_SIDED_CLIP_LOSS_TYPES = tuple(t for t, f in POLICY_TERMS.items() if f is _clipped_surrogate)
