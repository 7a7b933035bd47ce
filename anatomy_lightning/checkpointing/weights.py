"""Which weights a GRPO checkpoint keeps, and the ones a resume reads back.

Trainable weights only: a 7B LoRA checkpoint is tens of MB, not GB. With `sync_ref_model` the
reference has moved away from the initial weights wherever the policy trains, so those reference
weights (`reference.*`) are kept too, and dropped again when a run resumes without a reference
(`beta: 0`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from anatomy_lightning.checkpointing.safe_load import load_checkpoint_data

__all__ = ["checkpoint_keys", "only_keys", "saved_weights", "without_reference"]


def checkpoint_keys(policy: torch.nn.Module, with_reference: bool) -> set[str]:
    """The module's state_dict keys a checkpoint keeps: the policy's trainable weights, and the
    reference's copies of them when the reference is synced."""
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    keys = {f"policy.{n}" for n in names}
    if with_reference:
        keys |= {f"reference.{n}" for n in names}
    return keys


def only_keys(state: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    keep = set(keys)
    return type(state)((k, v) for k, v in state.items() if k in keep)  # type: ignore[call-arg]


def without_reference(state: Mapping[str, Any]) -> dict[str, Any]:
    """`state` without a synced reference's weights (a run resumed with `beta: 0` has no reference)."""
    return {k: v for k, v in state.items() if not k.startswith("reference.")}


def saved_weights(path: str | Path | None) -> dict[str, Any]:
    """The weights of checkpoint `path`, memory-mapped and read as data (names and shapes are what is read)."""
    if path is None:
        return {}
    return load_checkpoint_data(path, map_location="cpu", mmap=True).get("state_dict") or {}
