"""A training sampler over the curriculum's active stages, resumable mid-epoch and rank-aware.

Why not `RandomSampler` + `DistributedSampler`: the curriculum changes the pool mid-epoch, and a
global reshuffle must never mix a stage's questions back in before it is active. The sampler yields
`Cursor`s (index plus position) so the DataModule can record exactly what was consumed and a
resumed run continues with the next unseen question of the same permutation.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch.utils.data import Sampler


@dataclass(frozen=True)
class Cursor:
    """Where a sampled index sits: pool `segment` (bumps on every pool change or wrap) and `pos` in it."""

    index: int
    segment: int
    pos: int


class StageSampler(Sampler[Cursor]):
    """Shuffles only within the active stages, with an optional replay share of earlier stages.

    An epoch is `epoch_length` draws (default: the size of the whole training set, so epochs keep
    one meaning while the pool grows). Under DDP every rank computes the same permutation and keeps
    its own slice, so no `DistributedSampler` is needed (set `use_distributed_sampler: false`).
    """

    def __init__(
        self,
        stages: Sequence[int],
        seed: int = 0,
        epoch_length: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.stages = list(stages)
        self.seed = seed
        self.epoch_length = epoch_length or len(self.stages)
        self.rank, self.world_size = rank, world_size
        self.active: set[int] = set(self.stages)
        self.replay: set[int] = set()
        self.replay_fraction = 0.0
        self.epoch = 0
        self.segment = 0
        self.resume_pos = 0  # first position of `segment` not yet consumed
        self.epoch_consumed = 0  # draws of this epoch (this rank) that reached the model

    # -- configuration -------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.segment, self.resume_pos, self.epoch_consumed = epoch, 0, 0, 0

    def set_active(self, active: Sequence[int], replay: Sequence[int] = (), replay_fraction: float = 0.0) -> None:
        new = (set(active), set(replay) - set(active), float(replay_fraction))
        if new != (self.active, self.replay, self.replay_fraction):
            self.active, self.replay, self.replay_fraction = new
            self.segment, self.resume_pos = self.segment + 1, 0

    def pool_size(self) -> int:
        return sum(1 for s in self.stages if s in self.active)

    # -- iteration -----------------------------------------------------------------------------
    def _permutation(self, segment: int) -> list[int]:
        rng = random.Random(f"{self.seed}/{self.epoch}/{segment}")
        active = [i for i, s in enumerate(self.stages) if s in self.active]
        replay = [i for i, s in enumerate(self.stages) if s in self.replay]
        rng.shuffle(active)
        if replay and self.replay_fraction > 0:
            # replay_fraction of the drawn pool comes from earlier stages
            n_replay = max(1, round(len(active) * self.replay_fraction / (1.0 - min(self.replay_fraction, 0.9))))
            active += rng.choices(replay, k=n_replay)
            rng.shuffle(active)
        # pad to a multiple of world_size so every rank sees the same number of draws
        if active and len(active) % self.world_size:
            active += active[: self.world_size - len(active) % self.world_size]
        return active

    def __len__(self) -> int:
        return math.ceil(self.epoch_length / self.world_size)

    def __iter__(self) -> Iterator[Cursor]:
        budget = len(self) - self.epoch_consumed  # a resumed epoch only yields what is left of it
        emitted, start = 0, self.resume_pos
        while emitted < budget:
            segment = self.segment
            perm = self._permutation(segment)
            if not perm:
                raise RuntimeError("the curriculum's active stages contain no training questions")
            pos, changed = start, False
            while pos < len(perm) and emitted < budget:
                if self.segment != segment:  # pool changed mid-epoch: continue on the new pool
                    changed = True
                    break
                if pos % self.world_size == self.rank:
                    yield Cursor(perm[pos], segment, pos)
                    emitted += 1
                pos += 1
            if emitted >= budget:
                return
            if not changed:  # wrapped around a pool smaller than an epoch: a fresh permutation
                self.segment, self.resume_pos = segment + 1, 0
            start = self.resume_pos

    # -- state ---------------------------------------------------------------------------------
    def consumed(self, cursor: Cursor) -> None:
        """Record that `cursor` reached the model (so a resume starts after it)."""
        self.epoch_consumed += 1
        if cursor.segment == self.segment:
            self.resume_pos = max(self.resume_pos, cursor.pos + 1)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "segment": self.segment,
            "resume_pos": self.resume_pos,
            "epoch_consumed": self.epoch_consumed,
            "active": sorted(self.active),
            "replay": sorted(self.replay),
            "replay_fraction": self.replay_fraction,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.segment, self.resume_pos = state["epoch"], state["segment"], state["resume_pos"]
        self.epoch_consumed = state["epoch_consumed"]
        self.active, self.replay = set(state["active"]), set(state["replay"])
        self.replay_fraction = state["replay_fraction"]
