"""FSDP2 sharding of the policy under Lightning's `ModelParallelStrategy` (data parallel only).

`GRPOModule.configure_model` calls `shard_model` when the strategy gives the module a device mesh.
Each rank then keeps 1/N of every weight, gradient and optimiser state (DTensors over the mesh's
"data_parallel" dimension); a unit's full weights exist only while it runs (forward, backward).

Units (each gets its own `fully_shard`, inner ones before the modules holding them):
  - every decoder layer of the language model (`ModelFamily.language_layers`);
  - every block of the vision side (the elements of each `nn.ModuleList` under `vision_tower`),
    then each vision tower module as a whole, and each projector outside it. The fast path, and
    Hugging Face `generate`, call them on their own, outside the model's forward
    (`get_image_features`: image features once per prompt), so they must gather their own weights
    (patch embedding, merger) rather than count on the root's forward;
  - the root: the transformers model (inside a peft wrapper: the wrapped model, which both the
    wrapper's forward and `generate` call), holding what is left: embeddings, final norm, lm_head
    (tied or not, they stay in one unit).
Every call our rollouts make goes through a unit's `__call__`, so its hooks gather the weights:
the model's forward (prefill, every decoding step, the log-prob forwards) and the vision tower
(`get_image_features`); `get_rope_index` reads no weights. Hugging Face `generate` (the generic
path) is registered as a forward of the root (`register_fsdp_forward_method`): it reads the
embeddings outside forward as well.
Generation therefore all-gathers each layer once per decoding step: correct, and what keeps
the memory at one layer's full weights; it costs bandwidth. The root keeps its weights gathered
after a forward (FSDP2's default for roots: decoding steps reuse them, the backward frees them).

The root is initialised at once (`_lazy_init`), not by its first forward: the fast path's first
call of a step is the vision tower's, and FSDP2 would otherwise take that tower for the root.

A full fine-tuning reference (`frozen_copy`, beta > 0) is sharded the same way, as a second root:
replicated, it would hold the whole model on every rank, the very memory sharding removes (for a
7B model in bf16, 15 GB per GPU besides the policy's 1/N); sharded, its forward costs the same
all-gathers as the policy's (its root frees its weights after every forward: no backward follows),
and `sync_reference` mixes the two shard by shard.

Tensor parallelism (`tensor_parallel_size` > 1) is refused: nothing here splits a layer's matmuls.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

from anatomy_lightning.models.families import ModelFamily

__all__ = [
    "check_shardable", "data_parallel_mesh", "full_tensor", "full_trainable_state", "is_sharded", "quant_storage",
    "reshard", "shard_model", "sharding_units", "unshardable_settings",
]

TENSOR_PARALLEL_REFUSED = (
    "GRPOModule shards with FSDP2 over the data-parallel dimension only (no tensor parallelism); pass "
    "--trainer.strategy.tensor_parallel_size=1 --trainer.strategy.data_parallel_size=<devices x nodes>"
)


def data_parallel_mesh(mesh: Any) -> Any | None:
    """The mesh's "data_parallel" dimension (None without a mesh: one process, DDP); a mesh that also
    splits tensors (tensor_parallel > 1) is refused in one line."""
    if mesh is None:
        return None
    names = tuple(mesh.mesh_dim_names or ())
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(f"tensor_parallel_size={mesh['tensor_parallel'].size()}: {TENSOR_PARALLEL_REFUSED}")
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def _base(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def sharding_units(model: nn.Module, family: ModelFamily) -> list[tuple[str, nn.Module]]:
    """(name, module) of every unit below the root, innermost first: vision blocks, vision towers,
    decoder layers (names as in the model without its peft wrapper)."""
    modules = dict(_base(model).named_modules())
    layers = [(n, m) for n, m in modules.items() if re.fullmatch(rf"{family.language_layers}\.\d+", n)]
    if not layers:
        raise ValueError(f"{family.name}: no decoder layer matches {family.language_layers!r}\\.N; cannot shard")
    towers = [(p, modules[p]) for p in family.vision_tower if p in modules and _has_params(modules[p])]
    blocks = [
        (f"{n}.{i}", child)
        for n, m in modules.items() if isinstance(m, nn.ModuleList) and _under(n, tuple(p for p, _ in towers))
        for i, child in enumerate(m) if _has_params(child)
    ]
    # projectors outside the tower (Gemma 3, LLaVA): `generate` runs them with the tower, outside forward
    projectors = [(p, modules[p]) for p in family.projector
                  if p in modules and _has_params(modules[p]) and not _under(p, tuple(t for t, _ in towers))]
    return blocks + towers + projectors + layers


def shard_model(model: nn.Module, family: ModelFamily, mesh: Any, frozen: bool = False) -> int:
    """`fully_shard` every unit of `model` (see the module docstring) and its root over `mesh` (1-D);
    returns the number of units, root included. Call it before the optimiser is built.

    The root keeps its weights gathered after a forward (FSDP2's default: a backward follows, and
    each decoding step of a rollout is a forward); `frozen` (the reference, never trained) frees them
    after every forward instead."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # FSDP2 warns on every output that is a view (an in-place op on it would skip its backward hook);
    # our forwards never modify model outputs in place (`grpo.sequences`, `grpo.fast_path`)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    units = sharding_units(model, family)
    for _, module in units:
        fully_shard(module, mesh=mesh)
    root = _base(model)
    fully_shard(root, mesh=mesh, **({"reshard_after_forward": True} if frozen else {}))
    # Hugging Face `generate` reads weights outside forward too (image features, embeddings): the root's
    # weights are gathered for the whole call (the units inside still gather their own, layer by layer)
    register_fsdp_forward_method(root, "generate")
    # FSDP2 takes the first unit to run forward for the root; the fast path runs the vision tower first
    root._get_fsdp_state()._lazy_init()
    return len(units) + 1


def is_sharded(module: nn.Module) -> bool:
    """True when any parameter of `module` is a DTensor (FSDP2 has sharded it)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor shard (a collective: every rank calls it), else `t`."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: whole tensor on the CPU} of every trainable parameter (a collective on a sharded model:
    every rank calls it, in the same order), e.g. for peft's `save_pretrained(state_dict=...)`."""
    return {n: full_tensor(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}


def quant_storage(dtype: str) -> torch.dtype:
    """The storage dtype of packed 4-bit weights for sharded QLoRA (FSDP-QLoRA's `bnb_4bit_quant_storage`):
    the weights' own dtype, so that a cast of the layer (trainer.precision "bf16-true") leaves the packed
    bits alone; bfloat16, the compute dtype, when model.dtype is "auto"."""
    return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}.get(
        dtype, torch.bfloat16)


def reshard(model: nn.Module) -> None:
    """Free every gathered weight of `model` and register its shards again (FSDP2's root keeps its weights
    gathered after a forward): before weights are written in place (`sync_reference`), the shards must be
    what is written, not a gathered copy that the next gather would overwrite."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def unshardable_settings(quantization: str | None, optimizer: str | None) -> list[str]:
    """Settings that do not work on FSDP2-sharded weights, each with the reason and the fix (checked on CPU,
    bitsandbytes 0.50): 8-bit weights and bitsandbytes' 8-bit optimisers. `optimizer` None: the CLI's
    --optimizer replaces model.optimizer (torch's optimisers take sharded weights)."""
    problems = []
    if quantization == "8bit":
        problems.append("model.quantization=8bit (bitsandbytes' 8-bit weights lose their quantisation state when "
                        "FSDP2 shards them): use 4bit (FSDP-QLoRA) or null")
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        problems.append(f"model.optimizer={optimizer} (bitsandbytes' 8-bit optimisers do not take sharded weights): "
                        "use adamw, whose state is sharded already (1/N per rank)")
    return problems


def check_shardable(quantization: str | None, optimizer: str | None) -> None:
    """Raise a one-line ValueError naming every `unshardable_settings` problem (the CLI, before anything is
    built; the module, before the policy loads)."""
    problems = unshardable_settings(quantization, optimizer)
    if problems:
        raise ValueError("under ModelParallelStrategy (FSDP2): " + "; ".join(problems))
