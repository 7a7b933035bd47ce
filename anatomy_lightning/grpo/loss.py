"""The GRPO maths as plain tensor functions: group advantages, per-token log-probs, k3 KL, and the
loss variants, each picked by name from `LOSS_AGGREGATIONS`.

Nothing here knows about models, trainers or devices, so every formula is testable with hand-made
tensors. Shapes: B = N * G completions (N prompts, G completions each, consecutive in the batch),
T completion tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "LOSS_AGGREGATIONS",
    "GroupAdvantages",
    "LossOutput",
    "group_advantages",
    "grpo_loss",
    "is_finite_loss",
    "kl_k3",
    "token_logprobs",
]


@dataclass
class GroupAdvantages:
    """Per-completion advantages plus the group statistics the trainer logs.

    `has_signal[n]` is False for a group whose rewards are (numerically) all equal: it gives no
    gradient, and the share of such groups is the paper's invalid gradient ratio.
    """

    advantages: Tensor  # (B,)
    group_mean: Tensor  # (N,)
    group_std: Tensor  # (N,) sample std (Bessel-corrected); 0 for single-member groups
    has_signal: Tensor  # (N,) bool


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale_rewards: bool = True,
    std_tol: float = 1e-6,
    eps: float = 1e-4,
) -> GroupAdvantages:
    """A_i = r_i - mean(group), divided by (std(group) + eps) when `scale_rewards`.

    The std is the sample (unbiased, N-1) std, as `torch.std` and TRL use. A group whose std is
    below `std_tol`, or that has a single member, has no signal and gets advantages of exactly 0:
    rewards like 0.3, 0.3, 0.3 leave ~1e-8 of float noise that division by (std + eps) would
    otherwise turn into a spurious, sign-random gradient.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (B,), got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the {rewards.numel()} rewards; the batch "
            "must hold whole groups of consecutive completions (B = num_prompts * group_size)"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError(f"rewards contain NaN/inf: {rewards.tolist()}; check the reward functions")
    if not rewards.is_floating_point():
        rewards = rewards.float()

    grouped = rewards.view(-1, group_size)  # (N, G)
    mean = grouped.mean(dim=1)
    if group_size > 1:
        std = grouped.std(dim=1, unbiased=True)
    else:  # unbiased std of one value is NaN; one completion cannot be compared with anything
        std = torch.zeros_like(mean)
    has_signal = (std >= std_tol) if group_size > 1 else torch.zeros_like(mean, dtype=torch.bool)

    centred = grouped - mean[:, None]
    if scale_rewards:
        centred = centred / (std[:, None] + eps)
    advantages = torch.where(has_signal[:, None], centred, torch.zeros_like(centred))
    return GroupAdvantages(advantages.reshape(-1), mean, std, has_signal)


def token_logprobs(logits: Tensor, targets: Tensor, chunk_size: int = 0) -> Tensor:
    """log p(target) per position: gather(logits) - logsumexp(logits), in float32.

    Avoids materialising the (B, T, V) log-softmax; with `chunk_size` > 0 only that many rows of
    B are upcast at a time, which bounds the float32 copy for a 150k vocabulary. Temperature is
    the caller's business (divide the logits before calling).
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and targets (B, T), got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    step = chunk_size if chunk_size > 0 else max(1, logits.shape[0])
    out = []
    for lg, tg in zip(logits.split(step), targets.split(step)):
        lg = lg.float()  # (b, T, V)
        picked = lg.gather(-1, tg.long().unsqueeze(-1)).squeeze(-1)  # (b, T)
        out.append(picked - torch.logsumexp(lg, dim=-1))
    return torch.cat(out) if out else logits.new_zeros(targets.shape, dtype=torch.float32)


def kl_k3(logp: Tensor, ref_logp: Tensor, clamp: float = 20.0) -> Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1, d = ref_logp - logp.

    Always >= 0 and exactly 0 where the two agree; d is clamped so exp cannot overflow.
    """
    d = (ref_logp - logp).clamp(-clamp, clamp)
    return torch.exp(d) - d - 1


@dataclass
class LossOutput:
    loss: Tensor  # scalar, differentiable w.r.t. logp
    metrics: dict[str, float] = field(default_factory=dict)


# --- aggregations: (per_token (B, T), mask (B, T) float, max_completion_length) -> scalar ---------


def _sequence_mean(per_token: Tensor, mask: Tensor, max_completion_length: int | None) -> Tensor:
    """Original GRPO: mean over each sequence's tokens, then over sequences with any token."""
    lengths = mask.sum(dim=1)  # (B,)
    per_seq = (per_token * mask).sum(dim=1) / lengths.clamp(min=1)
    valid = (lengths > 0).to(per_seq.dtype)
    return (per_seq * valid).sum() / valid.sum().clamp(min=1)


def _token_mean(per_token: Tensor, mask: Tensor, max_completion_length: int | None) -> Tensor:
    """BNPO/DAPO: every token in the batch weighs the same, so long answers are not diluted."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _constant_normaliser(
    per_token: Tensor, mask: Tensor, max_completion_length: int | None
) -> Tensor:
    """Dr. GRPO: a length-independent constant B * max_completion_length removes length bias."""
    if max_completion_length is None or max_completion_length < 1:
        raise ValueError(
            f"loss_type 'dr_grpo' needs max_completion_length >= 1, got {max_completion_length}; "
            "pass the generation limit used for the rollout"
        )
    return (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)


LOSS_AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, int | None], Tensor]] = {
    "grpo": _sequence_mean,
    "bnpo": _token_mean,
    "dapo": _token_mean,
    "dr_grpo": _constant_normaliser,
    "gpg": _sequence_mean,  # plus the alpha rescaling in grpo_loss
}


def _gpg_alpha(has_signal: Tensor | None, group_size: int | None, batch: int) -> float:
    """alpha = groups / max(1, groups with signal): rescales the gradient lost to dead groups."""
    if has_signal is None or group_size is None:
        raise ValueError(
            "loss_type 'gpg' needs has_signal (GroupAdvantages.has_signal) and group_size"
        )
    if has_signal.numel() * group_size != batch:
        raise ValueError(
            f"gpg: has_signal has {has_signal.numel()} groups of {group_size} but the batch has "
            f"{batch} completions"
        )
    return has_signal.numel() / max(1, int(has_signal.sum().item()))


def _check_shapes(logp: Tensor, advantages: Tensor, mask: Tensor, **others: Tensor | None) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, T), got {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be (B,)={logp.shape[0]}, got {tuple(advantages.shape)}")
    for name, t in {"mask": mask, **others}.items():
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} must match logp {tuple(logp.shape)}, got {tuple(t.shape)}")


def grpo_loss(
    loss_type: str,
    logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    max_completion_length: int | None = None,
    has_signal: Tensor | None = None,
    group_size: int | None = None,
) -> LossOutput:
    """The GRPO objective for one batch of completions, to minimise.

    Per token: -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A) + beta*k3, with rho = 1 (but the
    gradient of logp) when `old_logp` is None, i.e. one update per generation. "gpg" uses
    -logp*A instead (no ratio, no clip) and multiplies the result by alpha. All tensors (B, T)
    over completion tokens except `advantages` (B,); `mask` is 1 on real completion tokens.
    """
    if loss_type not in LOSS_AGGREGATIONS:
        raise ValueError(
            f"unknown loss_type {loss_type!r}; choose one of {sorted(LOSS_AGGREGATIONS)}"
        )
    _check_shapes(logp, advantages, mask, old_logp=old_logp, ref_logp=ref_logp)
    live = mask.bool()
    m = live.to(logp.dtype)
    adv = advantages.to(logp.dtype)[:, None]  # (B, 1)

    # Padding positions may hold anything (even -inf); zero them once so that neither the value
    # nor the gradient can pick up a NaN there. torch.where routes exactly 0 gradient to them.
    zero = torch.zeros_like(logp)
    lp = torch.where(live, logp, zero)
    old = lp.detach() if old_logp is None else torch.where(live, old_logp.to(logp.dtype), zero)
    ratio = torch.exp(lp - old)  # (B, T); exactly 1 on padding
    if loss_type == "gpg":
        per_token = -lp * adv
    else:
        clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
        per_token = -torch.minimum(ratio * adv, clipped * adv)

    use_kl = beta != 0 and ref_logp is not None
    if use_kl:
        kl = kl_k3(lp, torch.where(live, ref_logp.to(logp.dtype), zero))  # 0 on padding
        per_token = per_token + beta * kl

    if not live.any():  # nothing to learn from; keep the graph connected for DDP/Lightning
        loss = (lp * 0).sum()
    else:
        loss = LOSS_AGGREGATIONS[loss_type](per_token, m, max_completion_length)

    metrics: dict[str, float] = {}
    with torch.no_grad():
        n_tok = m.sum().clamp(min=1)
        metrics["kl"] = float((kl * m).sum() / n_tok) if use_kl else 0.0
        if loss_type == "gpg":
            alpha = _gpg_alpha(has_signal, group_size, logp.shape[0])
            metrics["alpha"] = alpha
            low = high = torch.zeros_like(live)
        else:
            low = (ratio < 1 - epsilon_low) & (adv < 0) & live
            high = (ratio > 1 + epsilon_high) & (adv > 0) & live
        metrics["clip_ratio/low_mean"] = float(low.sum() / n_tok)
        metrics["clip_ratio/high_mean"] = float(high.sum() / n_tok)
        metrics["clip_ratio/region_mean"] = float((low | high).sum() / n_tok)
    if loss_type == "gpg":
        loss = loss * metrics["alpha"]
    return LossOutput(loss=loss, metrics=metrics)


def is_finite_loss(loss: Tensor) -> bool:
    """True when every element is finite; the trainer skips the step otherwise."""
    return bool(torch.isfinite(loss).all().item())


def chunk_weight(
    loss_type: str,
    mask_chunk: Tensor,
    mask_full: Tensor,
    has_signal_chunk: Tensor | None = None,
    has_signal_full: Tensor | None = None,
) -> float:
    """Factor that turns `grpo_loss` on a row chunk into that chunk's share of the full-batch loss.

    Summing `chunk_weight * grpo_loss(chunk)` over group-aligned chunks equals `grpo_loss(batch)`,
    so the training pass can run forward + backward chunk by chunk (activation memory of one
    chunk) and still optimise exactly the full-batch objective of every `loss_type`.
    """
    if loss_type in ("grpo", "gpg"):
        n_chunk = int((mask_chunk.sum(1) > 0).sum())
        n_full = int((mask_full.sum(1) > 0).sum())
        w = n_chunk / max(1, n_full)
        if loss_type == "gpg" and has_signal_chunk is not None and has_signal_full is not None:
            alpha_full = has_signal_full.numel() / max(1, int(has_signal_full.sum()))
            alpha_chunk = has_signal_chunk.numel() / max(1, int(has_signal_chunk.sum()))
            w *= alpha_full / alpha_chunk
        return w
    if loss_type in ("bnpo", "dapo"):
        return float(mask_chunk.sum()) / max(1.0, float(mask_full.sum()))
    if loss_type == "dr_grpo":
        return mask_chunk.shape[0] / mask_full.shape[0]
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {sorted(LOSS_AGGREGATIONS)}")
