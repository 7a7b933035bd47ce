"""LoRA dropout that keeps a one-byte mask for backward instead of two float copies of the input.

peft computes `lora_B(lora_A(dropout(x)))`. Autograd then keeps, for every adapted layer, the
dropout's float noise (to scale the input gradient) and the dropped input (for lora_A's weight
gradient): two tensors the size of the layer's input, although q, k and v (and gate and up) share
that input: up to 8 bytes per input element and adapted layer.

`DroppedLinear` (installed in place of `lora_A`, with peft's dropout set to identity) draws its
Bernoulli mask with the same generator call as `nn.Dropout` on the CPU (a bool tensor's `bernoulli_`
consumes the stream exactly as a float one's; on a GPU, where torch fuses its dropout, the draws
differ but not their distribution) and computes the same `x * (mask / keep)` and the same linear. Only what autograd stores changes: a saved-tensor hook packs the noise as the bool mask
and the dropped input as (input, mask), and rebuilds both, bit for bit, when backward asks. So
losses and gradients are bitwise those of peft's path, and a step's peak memory drops.

Inside activation checkpointing or any other saved-tensor hooks it computes exactly peft's way (those
hooks decide what is kept there). Not installed on LoRA variants (DoRA and others apply dropout
themselves). `load_policy` installs it whenever LoRA dropout is on.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anatomy_lightning.models.attention import outer_hooks_active

log = logging.getLogger(__name__)


class DroppedLinear(nn.Linear):
    """peft's `lora_A` with its dropout folded in; the dropout's mask is saved as bool."""

    dropout_p: float = 0.0

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.dropout_p > 0 and torch.is_grad_enabled()) or outer_hooks_active():
            return F.linear(F.dropout(x, self.dropout_p, self.training), self.weight, self.bias)
        keep = 1.0 - self.dropout_p
        mask = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(keep)
        # what torch.dropout multiplies by, to the bit; held here only, so the hooks keep no float copy
        made = {"noise": mask.to(x.dtype).div_(keep)}

        def pack(t: Tensor) -> Any:  # the tensor or a view of it (linear saves a 2-D view of a 3-D input)
            for kind, made_t in made.items():
                if t.untyped_storage().data_ptr() == made_t.untyped_storage().data_ptr():
                    return (kind, x, mask, t.size(), t.stride(), t.storage_offset())
            return t

        def unpack(packed: Any) -> Tensor:
            if isinstance(packed, Tensor):
                return packed
            kind, src, m, size, stride, offset = packed
            rebuilt = m.to(src.dtype).div_(keep)
            if kind == "dropped":
                rebuilt = src * rebuilt
            return rebuilt.as_strided(size, stride, offset)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            made["dropped"] = x * made["noise"]
            out = F.linear(made["dropped"], self.weight, self.bias)
        made.clear()
        return out


def fold_lora_dropout(model: nn.Module) -> int:
    """Swap every vanilla LoRA layer's (dropout, lora_A) for `DroppedLinear`; returns how many."""
    n = 0
    for module in model.modules():
        drops, lora_a = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(drops, nn.ModuleDict) or not isinstance(lora_a, nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {}) or {}
        for name, drop in list(drops.items()):
            a = lora_a[name] if name in lora_a else None
            if not isinstance(drop, nn.Dropout) or drop.p <= 0 or name in variants or type(a) is not nn.Linear:
                continue
            a.__class__ = DroppedLinear
            a.dropout_p = float(drop.p)
            drops[name] = nn.Identity()
            n += 1
    if n:
        log.debug("LoRA dropout folded into lora_A in %d layers (bool masks saved for backward)", n)
    return n
