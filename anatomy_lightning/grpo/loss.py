"""The GRPO maths as plain tensor functions: group advantages, per-token log-probs and entropies,
k3 KL, the loss variants (each picked by name from `LOSS_AGGREGATIONS`), and the metrics a TRL user
reads, returned as sums and counts so that row chunks and ranks combine exactly.

Nothing here knows about models or trainers, so every formula is testable with hand-made tensors.
The only collective calls are in `global_token_count`, `high_entropy_threshold` and
`combine_chunk_metrics`, and only when `torch.distributed` is initialised. Shapes: B = N * G
completions (N prompts, G completions each, consecutive in the batch), T completion tokens,
V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "IMPORTANCE_SAMPLING_LEVELS",
    "LOSS_AGGREGATIONS",
    "SCALE_REWARDS",
    "GroupAdvantages",
    "LossOutput",
    "chunk_weight",
    "combine_chunk_metrics",
    "completion_length_metrics",
    "global_token_count",
    "group_advantages",
    "grpo_loss",
    "high_entropy_threshold",
    "is_finite_loss",
    "kl_k3",
    "token_logprobs",
    "token_logprobs_and_entropy",
]

SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def _world() -> int:
    """Number of processes when torch.distributed is initialised, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# --- advantages --------------------------------------------------------------------------------


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


# --- per-token quantities ----------------------------------------------------------------------


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


def global_token_count(mask: Tensor) -> Tensor:
    """Live tokens of the whole generation batch, summed over ranks (TRL's `num_items_in_batch`).

    Pass it to `grpo_loss(..., num_items_in_batch=...)` and `chunk_weight` for `loss_type="dapo"`.
    Every rank must call it (all_reduce) when torch.distributed is initialised.
    """
    count = mask.detach().float().sum()
    if _world() > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return count


def high_entropy_threshold(
    entropy: Tensor, mask: Tensor, top_entropy_quantile: float, across_ranks: bool = True
) -> Tensor:
    """The (1 - rho) quantile of the live tokens' entropies, over all ranks (TRL semantics).

    Tokens with entropy >= the threshold keep their policy loss. rho = 1 keeps everything
    (threshold -inf), rho = 0 only the highest-entropy token(s). With no live token the threshold
    is +inf (nothing kept). Every rank must call it when torch.distributed is initialised, unless
    `across_ranks` is False (these rows only, no collective call).
    """
    if not 0.0 <= top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {top_entropy_quantile}")
    if top_entropy_quantile >= 1.0:
        return torch.tensor(-math.inf, device=entropy.device)
    local = entropy.detach()[mask.bool()].float()
    if across_ranks and _world() > 1:  # ranks hold different token counts: gather padded, then drop the padding
        n = torch.tensor([local.numel()], device=local.device)
        sizes = [torch.zeros_like(n) for _ in range(_world())]
        dist.all_gather(sizes, n)
        width = int(max(s.item() for s in sizes))
        padded = torch.full((width,), math.nan, device=local.device)
        padded[: local.numel()] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        local = torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])
    if local.numel() == 0:
        return torch.tensor(math.inf, device=entropy.device)
    return torch.quantile(local, 1.0 - top_entropy_quantile)


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
    """Original GRPO: mean over each sequence's tokens, then over sequences with any token."""
    lengths = mask.sum(dim=1)  # (B,)
    per_seq = (per_token * mask).sum(dim=1) / lengths.clamp(min=1)
    valid = (lengths > 0).to(per_seq.dtype)
    return (per_seq * valid).sum() / valid.sum().clamp(min=1)


def _token_mean(per_token: Tensor, mask: Tensor, norm: _Norm) -> Tensor:
    """BNPO (and the authors' GPG): every token of this batch weighs the same."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _global_token_mean(per_token: Tensor, mask: Tensor, norm: _Norm) -> Tensor:
    """DAPO: sum / (tokens of the whole generation batch on all ranks / ranks), as TRL does.

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


LOSS_AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, _Norm], Tensor]] = {
    "grpo": _sequence_mean,
    "bnpo": _token_mean,
    "dapo": _global_token_mean,
    "dr_grpo": _constant_normaliser,
    "gpg": _token_mean,  # then times alpha, in grpo_loss (the Anatomy-R1 authors' aggregation)
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
) -> LossOutput:
    """The GRPO objective for one batch (or row chunk) of completions, to minimise.

    Per token: -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A) + beta*k3, with rho = 1 (but the
    gradient of logp) when `old_logp` is None, i.e. one update per generation. "gpg" uses
    -logp*A instead (no ratio, no clip), takes the token mean over the batch and multiplies it by
    alpha, as the Anatomy-R1 authors' trainer does. All tensors (B, T) over completion tokens
    except `advantages` (B,); `mask` is 1 on real completion tokens. The options follow TRL's
    `GRPOConfig` names and semantics:

    - `importance_sampling_level="sequence"` (GSPO): one ratio per sequence, exp of the mean token
      log-ratio, clipped as a whole.
    - `use_bias_correction_kl`: the k3 term multiplied by the importance ratio (DeepSeek-V3.2).
    - `top_entropy_quantile` rho < 1: only tokens whose `entropy` is in the top rho quantile keep
      their policy loss (the KL term stays on every token). The threshold is taken over these rows
      unless `entropy_threshold` gives one (`high_entropy_threshold` over a micro-batch and ranks).
    - `num_items_in_batch`: for "dapo", the live-token count of the whole generation batch over all
      ranks (`global_token_count`); `num_processes` defaults to the torch.distributed world size.
    """
    _check_options(loss_type, importance_sampling_level, top_entropy_quantile, entropy, entropy_threshold)
    _check_shapes(logp, advantages, mask, old_logp=old_logp, ref_logp=ref_logp, entropy=entropy)
    world = _world() if num_processes is None else num_processes
    if loss_type == "dapo" and num_items_in_batch is None and world > 1:
        raise ValueError(
            f"loss_type 'dapo' on {world} processes needs num_items_in_batch, the token count of "
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
    log_ratio = lp - old  # (B, T); 0 on padding
    if sequence_level:
        log_ratio = (log_ratio * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
    ratio = torch.exp(log_ratio)  # (B, T) or (B, 1)
    if loss_type == "gpg":
        per_token = -lp * adv
    else:
        clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
        per_token = -torch.minimum(ratio * adv, clipped * adv)
    per_token = per_token.expand_as(lp)

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
            low = high = torch.zeros_like(live)
            out.metrics["alpha"] = alpha
        else:
            low = (ratio < 1 - epsilon_low) & (adv < 0)
            high = (ratio > 1 + epsilon_high) & (adv > 0)
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
    out.metrics.update(_finish(out.sums, out.counts, out.mins, out.maxs))
    return out


def _finish(
    sums: dict[str, float], counts: dict[str, float], mins: dict[str, float], maxs: dict[str, float]
) -> dict[str, float]:
    """Means from sums and counts, extremes as they are; 0.0 where nothing was counted."""
    out = {k: (sums[k] / counts[k] if counts.get(k) else 0.0) for k in sums}
    out.update({k: (v if math.isfinite(v) else 0.0) for k, v in {**mins, **maxs}.items()})
    return out


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
    if across_ranks and _world() > 1:
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
    return _finish(sums, counts, mins, maxs)


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
    chunk) and still optimise exactly the full-batch objective of every `loss_type`. For "dapo"
    pass the same `num_items_in_batch` as to `grpo_loss`: the normaliser is then already global
    and the weight is 1.
    """
    if loss_type == "grpo":
        n_chunk = int((mask_chunk.sum(1) > 0).sum())
        n_full = int((mask_full.sum(1) > 0).sum())
        return n_chunk / max(1, n_full)
    if loss_type == "dapo" and num_items_in_batch is not None:
        return 1.0
    if loss_type in ("bnpo", "dapo", "gpg"):
        w = float(mask_chunk.sum()) / max(1.0, float(mask_full.sum()))
        if loss_type == "gpg" and has_signal_chunk is not None and has_signal_full is not None:
            alpha_full = has_signal_full.numel() / max(1, int(has_signal_full.sum()))
            alpha_chunk = has_signal_chunk.numel() / max(1, int(has_signal_chunk.sum()))
            w *= alpha_full / alpha_chunk
        return w
    if loss_type == "dr_grpo":
        return mask_chunk.shape[0] / mask_full.shape[0]
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {sorted(LOSS_AGGREGATIONS)}")
