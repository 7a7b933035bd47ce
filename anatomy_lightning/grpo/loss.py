"""The GRPO losses as plain tensor functions: k3 KL, the per-token policy term of every `loss_type`
(`grpo.policy_terms`: the clipped surrogate, CISPO, SAPO, VESPO, plain -logp*A) and
its aggregation (from `LOSS_AGGREGATIONS`), with the metrics a TRL user reads returned as sums and
counts so that row chunks and ranks combine exactly (`grpo.metrics`). Formulas and defaults follow
TRL 1.16's `GRPOTrainer._compute_loss` and `GRPOConfig` (checked in tests/grpo/test_loss_trl.py).

Nothing here knows about models or trainers, so every formula is testable with hand-made tensors.
The only collective calls are in `grpo.token_stats` (`global_token_count`, `high_entropy_threshold`,
re-exported here), and only when `torch.distributed` is initialised. Shapes: B = N * G completions (N prompts, G completions each,
consecutive in the batch), T completion tokens. Advantages are `grpo.advantages`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from anatomy_lightning.distributed import world_size
from anatomy_lightning.grpo.policy_terms import (
    POLICY_TERMS,
    TWO_SIDED_CLIP_LOSS_TYPES,
    LossKnobs,
    TermInputs,
)
from anatomy_lightning.grpo.token_stats import global_token_count, high_entropy_threshold

__all__ = [
    "IMPORTANCE_SAMPLING_LEVELS",
    "LOSS_AGGREGATIONS",
    "POLICY_TERMS",
    "TWO_SIDED_CLIP_LOSS_TYPES",
    "LossOutput",
    "chunk_weight",
    "global_token_count",
    "grpo_loss",
    "high_entropy_threshold",
    "is_finite_loss",
    "kl_k3",
    "needs_global_token_count",
]

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


# --- per-token quantities ----------------------------------------------------------------------


def kl_k3(logp: Tensor, ref_logp: Tensor, linear_beyond: float = 50.0) -> Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1, d = ref_logp - logp.

    Always >= 0 and exactly 0 where the two agree. Its gradient w.r.t. logp is 1 - exp(d), so a
    policy far more confident than the reference (d << 0) is pulled back with a gradient near 1
    however large the gap. No clamp zeroes that: above d = `linear_beyond` (where exp would
    overflow float32 near 88) exp is continued along its tangent, which keeps the value and the
    gradient finite and of the right sign. Computed in at least float32.
    """
    dtype = torch.promote_types(torch.promote_types(logp.dtype, ref_logp.dtype), torch.float32)
    d = ref_logp.to(dtype) - logp.to(dtype)
    cap = torch.full_like(d, linear_beyond)
    e = torch.where(d > linear_beyond, torch.exp(cap) * (1 + d - cap), torch.exp(torch.minimum(d, cap)))
    return e - d - 1


# --- the loss ----------------------------------------------------------------------------------


@dataclass
class LossOutput:
    """The loss to minimise plus its metrics.

    `metrics` are this call's values (token means, `alpha`). `sums` and `counts` hold the same token
    (or, at sequence level, row) means as numerator and denominator, and `mins` / `maxs` the
    per-sequence extremes (TRL's `clip_ratio/low_min`, `high_max`), so a caller that runs row
    chunks, or several ranks, recovers the exact batch values with `combine_chunk_metrics`.
    """

    loss: Tensor  # scalar, differentiable w.r.t. logp
    metrics: dict[str, float] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    mins: dict[str, float] = field(default_factory=dict)  # combined by min (inf: none seen)
    maxs: dict[str, float] = field(default_factory=dict)  # combined by max (-inf: none seen)


@dataclass(frozen=True)
class _Norm:
    """What an aggregation may need besides the per-token loss and the mask."""

    max_completion_length: int | None = None
    num_items_in_batch: float | None = None
    num_processes: int = 1


def _sequence_mean(per_token: Tensor, mask: Tensor, norm: _Norm) -> Tensor:
    """Original GRPO (and SAPO): mean over each sequence's tokens, then over sequences with any token."""
    lengths = mask.sum(dim=1)  # (B,)
    per_seq = (per_token * mask).sum(dim=1) / lengths.clamp(min=1)
    valid = (lengths > 0).to(per_seq.dtype)
    return (per_seq * valid).sum() / valid.sum().clamp(min=1)


def _token_mean(per_token: Tensor, mask: Tensor, norm: _Norm) -> Tensor:
    """BNPO (and the authors' GPG): every token of this batch weighs the same."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _global_token_mean(per_token: Tensor, mask: Tensor, norm: _Norm) -> Tensor:
    """DAPO, CISPO, VESPO: sum / (tokens of the whole generation batch on all ranks / ranks), as TRL does.

    DDP averages the gradients over ranks, so the optimised objective is the sum over every
    rank's tokens divided by their global count: each token weighs the same across the world.
    """
    count = mask.sum() if norm.num_items_in_batch is None else norm.num_items_in_batch
    return (per_token * mask).sum() * norm.num_processes / max(float(count), 1.0)


def _constant_normaliser(per_token: Tensor, mask: Tensor, norm: _Norm) -> Tensor:
    """Dr. GRPO: a length-independent constant B * max_completion_length removes length bias."""
    if norm.max_completion_length is None or norm.max_completion_length < 1:
        raise ValueError(
            "loss_type 'dr_grpo' needs max_completion_length >= 1, got "
            f"{norm.max_completion_length}; pass the generation limit used for the rollout"
        )
    return (per_token * mask).sum() / (per_token.shape[0] * norm.max_completion_length)


def _row_sum_mean(per_token: Tensor, mask: Tensor, norm: _Norm) -> Tensor:
    """LUSPO: each sequence's token sum (its loss scaled by its length), mean over every row."""
    return (per_token * mask).sum(dim=1).mean()


LOSS_AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, _Norm], Tensor]] = {
    "grpo": _sequence_mean,
    "bnpo": _token_mean,
    "dapo": _global_token_mean,
    "dr_grpo": _constant_normaliser,
    "gpg": _token_mean,  # then times alpha, in grpo_loss (the Anatomy-R1 authors' aggregation)
    "cispo": _global_token_mean,
    "sapo": _sequence_mean,
    "luspo": _row_sum_mean,
    "vespo": _global_token_mean,
}


def needs_global_token_count(loss_type: str) -> bool:
    """Whether `loss_type` normalises by the whole generation batch's tokens (dapo, cispo, vespo):
    then pass `global_token_count(mask)` as `num_items_in_batch` to `grpo_loss` and `chunk_weight`."""
    return LOSS_AGGREGATIONS.get(loss_type) is _global_token_mean


assert POLICY_TERMS.keys() == LOSS_AGGREGATIONS.keys()  # every loss type has its term and its reduction


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


def _check_options(
    loss_type: str, importance_sampling_level: str, top_entropy_quantile: float,
    entropy: Tensor | None, entropy_threshold: float | Tensor | None,
) -> None:
    if loss_type not in LOSS_AGGREGATIONS:
        raise ValueError(
            f"unknown loss_type {loss_type!r}; choose one of {sorted(LOSS_AGGREGATIONS)}"
        )
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level={importance_sampling_level!r}; choose 'token' or "
            "'sequence' (GSPO)"
        )
    if not 0.0 <= top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {top_entropy_quantile}")
    if (top_entropy_quantile < 1.0 or entropy_threshold is not None) and entropy is None:
        raise ValueError(
            "top_entropy_quantile < 1 needs the per-token entropy: pass entropy= (from "
            "token_logprobs_and_entropy)"
        )


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
    *,
    importance_sampling_level: str = "token",
    use_bias_correction_kl: bool = False,
    entropy: Tensor | None = None,
    top_entropy_quantile: float = 1.0,
    entropy_threshold: float | Tensor | None = None,
    num_items_in_batch: float | Tensor | None = None,
    num_processes: int | None = None,
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
) -> LossOutput:
    """The GRPO objective for one batch (or row chunk) of completions, to minimise.

    Per token: policy term + beta*k3, then aggregated as `LOSS_AGGREGATIONS[loss_type]` says. The
    policy term (`POLICY_TERMS[loss_type]`, rho = 1 but the gradient of logp when `old_logp` is
    None, i.e. one update per generation):

    - grpo, bnpo, dapo, dr_grpo, luspo: -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A), with rho
      capped at `delta` in the first term when `delta` is set (two-sided clipping);
    - cispo: -sg(min(rho, epsilon_high))*A*logp (epsilon_high is CISPO's eps_max);
    - sapo: -sigmoid(tau*(rho-1))*4/tau*A, tau = `sapo_temperature_pos` if A > 0 else `_neg`;
    - vespo: -sg(phi(w))*A*logp, w the sequence's product of token ratios, phi the gamma weight
      exp(lam + k*ln w - lam*w) with `vespo_k_*` / `vespo_lambda_*` by the sign of A;
    - gpg: -logp*A (no ratio, no clip), token mean over the batch times alpha, as the Anatomy-R1
      authors' trainer does.

    All tensors (B, T) over completion tokens except `advantages` (B,); `mask` is 1 on real
    completion tokens. The options follow TRL's `GRPOConfig` names, defaults and semantics:

    - `importance_sampling_level="sequence"` (GSPO): one ratio per sequence, exp of the mean token
      log-ratio, clipped as a whole.
    - `use_bias_correction_kl`: the k3 term multiplied by the importance ratio (DeepSeek-V3.2).
    - `top_entropy_quantile` rho < 1: only tokens whose `entropy` is in the top rho quantile keep
      their policy loss (the KL term stays on every token). The threshold is taken over these rows
      unless `entropy_threshold` gives one (`high_entropy_threshold` over a micro-batch and ranks).
    - `num_items_in_batch`: for "dapo", "cispo" and "vespo", the live-token count of the whole
      generation batch over all ranks (`global_token_count`); `num_processes` defaults to the
      torch.distributed world size.
    """
    _check_options(loss_type, importance_sampling_level, top_entropy_quantile, entropy, entropy_threshold)
    _check_shapes(logp, advantages, mask, old_logp=old_logp, ref_logp=ref_logp, entropy=entropy)
    world = world_size() if num_processes is None else num_processes
    if needs_global_token_count(loss_type) and num_items_in_batch is None and world > 1:
        raise ValueError(
            f"loss_type {loss_type!r} on {world} processes needs num_items_in_batch, the token count of "
            "the whole generation batch: pass global_token_count(mask) computed on every rank"
        )
    live = mask.bool()
    m = live.to(logp.dtype)
    adv = advantages.to(logp.dtype)[:, None]  # (B, 1)
    sequence_level = importance_sampling_level == "sequence"

    # Padding positions may hold anything (even -inf); zero them once so that neither the value
    # nor the gradient can pick up a NaN there. torch.where routes exactly 0 gradient to them.
    zero = torch.zeros_like(logp)
    lp = torch.where(live, logp, zero)
    old = lp.detach() if old_logp is None else torch.where(live, old_logp.to(logp.dtype), zero)
    token_log_ratio = lp - old  # (B, T); 0 on padding
    log_ratio = token_log_ratio
    if sequence_level:
        log_ratio = (log_ratio * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
    ratio = torch.exp(log_ratio)  # (B, T) or (B, 1)
    knobs = LossKnobs(epsilon_low, epsilon_high, delta, sapo_temperature_pos, sapo_temperature_neg,
                   vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
    term = POLICY_TERMS[loss_type](TermInputs(lp, token_log_ratio, ratio, adv, m, sequence_level), knobs)
    per_token = term.per_token.expand_as(lp)

    ent = None if entropy is None else torch.where(live, entropy.detach().to(logp.dtype), zero)
    if ent is not None and (top_entropy_quantile < 1.0 or entropy_threshold is not None):
        thr = entropy_threshold
        if thr is None:
            thr = high_entropy_threshold(ent, live, top_entropy_quantile, across_ranks=False)
        per_token = per_token * ((ent >= torch.as_tensor(thr, dtype=ent.dtype, device=ent.device)) & live).to(lp.dtype)

    use_kl = beta != 0 and ref_logp is not None
    if use_kl:
        kl = kl_k3(lp, torch.where(live, ref_logp.to(logp.dtype), zero))  # 0 on padding
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl

    if not live.any():  # nothing to learn from; keep the graph connected for DDP/Lightning
        loss = (lp * 0).sum()
    else:
        norm = _Norm(
            max_completion_length,
            None if num_items_in_batch is None else float(num_items_in_batch),
            world if num_items_in_batch is not None else 1,
        )
        loss = LOSS_AGGREGATIONS[loss_type](per_token, m, norm)

    if loss_type == "gpg":
        alpha = _gpg_alpha(has_signal, group_size, logp.shape[0])
        loss = loss * alpha
    out = LossOutput(loss=loss)
    with torch.no_grad():
        n_tok = float(m.sum())
        out.sums["kl"] = float((kl * m).sum()) if use_kl else 0.0
        out.counts["kl"] = n_tok
        if ent is not None:
            out.sums["entropy"], out.counts["entropy"] = float((ent * m).sum()), n_tok
        if loss_type == "gpg":
            out.metrics["alpha"] = alpha
        unflagged = torch.zeros_like(ratio, dtype=torch.bool)  # soft or no clipping: none clipped
        low = unflagged if term.low is None else term.low
        high = unflagged if term.high is None else term.high
        for tag, (values, per_row) in term.extra.items():  # TRL's global_masked_mean
            v = values.to(m.dtype)
            out.sums[tag] = float(v.sum() if per_row else (v * m).sum())
            out.counts[tag] = float(v.shape[0]) if per_row else n_tok
        if sequence_level:  # TRL: a sequence-level flag counts once per row
            weight, denom = torch.ones_like(adv), float(adv.shape[0])
            low, high = low.expand_as(adv), high.expand_as(adv)
        else:
            weight, denom = m, n_tok
        rows = weight.sum(1) > 0  # sequences with a token (all rows at sequence level)
        for name, flag in (("low", low), ("high", high), ("region", low | high)):
            f = flag.to(weight.dtype) * weight
            out.sums[f"clip_ratio/{name}_mean"] = float(f.sum())
            out.counts[f"clip_ratio/{name}_mean"] = denom
            per_seq = f.sum(1)[rows] / weight.sum(1)[rows]
            if name == "low":
                out.mins["clip_ratio/low_min"] = float(per_seq.min()) if per_seq.numel() else math.inf
            elif name == "high":
                out.maxs["clip_ratio/high_max"] = float(per_seq.max()) if per_seq.numel() else -math.inf
    out.metrics.update(finish_means(out.sums, out.counts, out.mins, out.maxs))
    return out


def finish_means(
    sums: dict[str, float], counts: dict[str, float], mins: dict[str, float], maxs: dict[str, float]
) -> dict[str, float]:
    """Means from sums and counts, extremes as they are; 0.0 where nothing was counted."""
    out = {k: (sums[k] / counts[k] if counts.get(k) else 0.0) for k in sums}
    out.update({k: (v if math.isfinite(v) else 0.0) for k, v in {**mins, **maxs}.items()})
    return out


def is_finite_loss(loss: Tensor) -> bool:
    """True when every element is finite; the trainer skips the step otherwise."""
    return bool(torch.isfinite(loss).all().item())


def chunk_weight(
    loss_type: str,
    mask_chunk: Tensor,
    mask_full: Tensor,
    has_signal_chunk: Tensor | None = None,
    has_signal_full: Tensor | None = None,
    num_items_in_batch: float | Tensor | None = None,
) -> float:
    """Factor that turns `grpo_loss` on a row chunk into that chunk's share of the full-batch loss.

    Summing `chunk_weight * grpo_loss(chunk)` over group-aligned chunks equals `grpo_loss(batch)`,
    so the training pass can run forward + backward chunk by chunk (activation memory of one
    chunk) and still optimise exactly the full-batch objective of every `loss_type`. For "dapo",
    "cispo" and "vespo" pass the same `num_items_in_batch` as to `grpo_loss`: the normaliser is
    then already global and the weight is 1.
    """
    aggregation = LOSS_AGGREGATIONS.get(loss_type)
    if aggregation is None:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {sorted(LOSS_AGGREGATIONS)}")
    if aggregation is _global_token_mean and num_items_in_batch is not None:
        return 1.0
    w = _CHUNK_SHARES[aggregation](mask_chunk, mask_full)
    if loss_type == "gpg" and has_signal_chunk is not None and has_signal_full is not None:
        alpha_full = has_signal_full.numel() / max(1, int(has_signal_full.sum()))
        alpha_chunk = has_signal_chunk.numel() / max(1, int(has_signal_chunk.sum()))
        w *= alpha_full / alpha_chunk
    return w


def _share_of_rows_with_tokens(chunk: Tensor, full: Tensor) -> float:
    return int((chunk.sum(1) > 0).sum()) / max(1, int((full.sum(1) > 0).sum()))


def _share_of_tokens(chunk: Tensor, full: Tensor) -> float:
    return float(chunk.sum()) / max(1.0, float(full.sum()))


def _share_of_rows(chunk: Tensor, full: Tensor) -> float:
    return chunk.shape[0] / full.shape[0]


# aggregation -> the chunk's share of the batch's normaliser (what its own normaliser lacks)
_CHUNK_SHARES: dict[Callable[[Tensor, Tensor, _Norm], Tensor], Callable[[Tensor, Tensor], float]] = {
    _sequence_mean: _share_of_rows_with_tokens,
    _token_mean: _share_of_tokens,
    _global_token_mean: _share_of_tokens,  # without num_items_in_batch: the local token mean
    _constant_normaliser: _share_of_rows,
    _row_sum_mean: _share_of_rows,
}
