"""SDPA attention that keeps grouped keys and values unrepeated for backward.

With grouped-query attention (Qwen2.5-VL: 2 K/V heads for 8 query heads in the benchmark model, 4
for 28 in the 7B), Hugging Face's `sdpa` path copies K and V to every query head (`repeat_kv`)
whenever a mask is passed, i.e. for every padded training forward, and SDPA keeps those copies for
backward: in the benchmark's training pass that is 126 MB of its ~810 MB of activations, against
31 MB for the heads themselves.

`sdpa_keeping_groups` runs the same function with the same repeated tensors, so every output and
gradient is bit for bit the same, but a saved-tensor hook stores each repeated tensor as (its K/V
heads, the repeat count) and repeats again when backward needs it. It steps aside when nothing is
saved (no grad), when there is nothing to repeat, and inside activation checkpointing or any other
saved-tensor hooks (they decide what is kept there).
Installed over transformers' "sdpa" entry by `install` (which `load_policy` calls); every other
call goes to transformers' own function unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_installed = False


def outer_hooks_active() -> bool:
    """True inside activation checkpointing (or any saved-tensor hooks someone else set)."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except AttributeError:  # an older or newer torch without it: assume hooks, step aside
        return True


class _OneGroup:
    """What transformers' sdpa function reads from the attention module, with K/V already repeated."""

    num_key_value_groups = 1

    def __init__(self, module: Any) -> None:
        self.is_causal = getattr(module, "is_causal", True)


def sdpa_keeping_groups(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                        **kwargs: Any) -> tuple[Tensor, Any]:
    from transformers.integrations import sdpa_attention as hf

    n_rep = getattr(module, "num_key_value_groups", 1)
    if (n_rep == 1 or query.shape[2] == 1 or not torch.is_grad_enabled()
            or not (key.requires_grad or value.requires_grad or query.requires_grad)
            or hf.use_gqa_in_sdpa(attention_mask, key, value) or outer_hooks_active()):
        return hf.sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    k, v = hf.repeat_kv(key, n_rep), hf.repeat_kv(value, n_rep)  # what transformers would pass to SDPA
    sources = [(k, key), (v, value)]  # emptied below: nothing here may keep the repeats alive

    def pack(t: Tensor) -> Any:
        for repeated, heads in sources:
            if t is repeated:
                return (heads, n_rep)
        return t

    def unpack(packed: Any) -> Tensor:
        return hf.repeat_kv(*packed) if isinstance(packed, tuple) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = hf.sdpa_attention_forward(_OneGroup(module), query, k, v, attention_mask, **kwargs)
    sources.clear()
    del k, v
    return out


def install() -> None:
    """Put `sdpa_keeping_groups` in transformers' attention registry under "sdpa" (once per process)."""
    global _installed
    if _installed:
        return
    from transformers import AttentionInterface

    AttentionInterface.register("sdpa", sdpa_keeping_groups)
    _installed = True
