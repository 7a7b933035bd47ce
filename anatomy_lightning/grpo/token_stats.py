"""Statistics of the live tokens of the whole generation batch, over every rank: the token count
that dapo-like losses divide by (TRL's `num_items_in_batch`) and the entropy threshold of
`top_entropy_quantile`. They are the loss's only collective calls, and make them only when
`torch.distributed` is initialised, so every rank must call them at the same points.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from anatomy_lightning.distributed import world_size

__all__ = ["global_token_count", "high_entropy_threshold"]


def global_token_count(mask: Tensor) -> Tensor:
    """Live tokens of the whole generation batch, summed over ranks (TRL's `num_items_in_batch`).

    Pass it to `grpo_loss(..., num_items_in_batch=...)` and `chunk_weight` for `loss_type="dapo"`.
    Every rank must call it (all_reduce) when torch.distributed is initialised.
    """
    count = mask.detach().float().sum()
    if world_size() > 1:
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
    if across_ranks and world_size() > 1:  # ranks hold different token counts: gather padded, then drop the padding
        n = torch.tensor([local.numel()], device=local.device)
        sizes = [torch.zeros_like(n) for _ in range(world_size())]
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
