"""The two collective questions every layer asks: how many ranks, and everyone's copy of an object.

Outside `torch.distributed` (one process, tests) both answer as a world of one, so callers never
branch on whether a process group exists.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def world_size() -> int:
    """Ranks in the default process group (1 when none is initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_objects(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (a one-element list outside distributed runs).

    Every rank must call it. Picklable objects of any size: ranks may hold different amounts.
    """
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
