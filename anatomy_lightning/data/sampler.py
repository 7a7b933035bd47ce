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


Pool = tuple[list[int], list[int], float]  # (active stages, replay stages, replay fraction)


class StageSampler(Sampler[Cursor]):
    """Shuffles only within the active stages, with an optional replay share of earlier stages.

    An epoch is `epoch_length` draws (default: the size of the whole training set, so epochs keep
    one meaning while the pool grows). Under DDP every rank computes the same permutation and keeps
    its own slice, so no `DistributedSampler` is needed (set `use_distributed_sampler: false`).

    Positions of a permutation are drawn in rounds of `world_size` (rank r takes position
    `round * world_size + r`), so the state (segment, round, what is in flight) is the same on
    every rank and a checkpoint written by rank 0 resumes every rank. Cursors that were drawn but
    not yet consumed when a checkpoint was written (batches the DataLoader had prefetched) are
    served again first after a resume, from the pool they were drawn from: a resumed run sees
    exactly the batches an uninterrupted run sees, even across a curriculum promotion.
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
        self.next_round = 0  # first round of `segment` not drawn yet
        self.epoch_consumed = 0  # draws of this epoch (per rank) that reached the model
        self._in_flight: list[tuple[Cursor, Pool]] = []  # drawn, not consumed yet (prefetched batches)
        self._replay: list[tuple[int, int, Pool]] = []  # (segment, round, pool) to serve first after a resume

    # -- configuration -------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.segment, self.next_round, self.epoch_consumed = epoch, 0, 0, 0
            self._in_flight, self._replay = [], []

    def set_active(self, active: Sequence[int], replay: Sequence[int] = (), replay_fraction: float = 0.0) -> None:
        new = (set(active), set(replay) - set(active), float(replay_fraction))
        if new != (self.active, self.replay, self.replay_fraction):
            self.active, self.replay, self.replay_fraction = new
            self.segment, self.next_round = self.segment + 1, 0

    def pool_size(self) -> int:
        return sum(1 for s in self.stages if s in self.active)

    def _pool(self) -> Pool:
        return (sorted(self.active), sorted(self.replay), self.replay_fraction)

    # -- iteration -----------------------------------------------------------------------------
    def _permutation(self, segment: int, pool: Pool) -> list[int]:
        active_stages, replay_stages, replay_fraction = set(pool[0]), set(pool[1]), pool[2]
        rng = random.Random(f"{self.seed}/{self.epoch}/{segment}")
        active = [i for i, s in enumerate(self.stages) if s in active_stages]
        replay = [i for i, s in enumerate(self.stages) if s in replay_stages]
        rng.shuffle(active)
        if replay and replay_fraction > 0:
            # replay_fraction of the drawn pool comes from earlier stages
            n_replay = max(1, round(len(active) * replay_fraction / (1.0 - min(replay_fraction, 0.9))))
            active += rng.choices(replay, k=n_replay)
            rng.shuffle(active)
        # pad to a multiple of world_size so every rank sees the same number of draws
        if active and len(active) % self.world_size:
            active += active[: self.world_size - len(active) % self.world_size]
        return active

    def __len__(self) -> int:
        return math.ceil(self.epoch_length / self.world_size)

    def _draw(self, cursor: Cursor, pool: Pool) -> Cursor:
        self._in_flight.append((cursor, pool))
        return cursor

    def __iter__(self) -> Iterator[Cursor]:
        budget = len(self) - self.epoch_consumed  # a resumed epoch only yields what is left of it
        emitted = 0
        replay, self._replay = self._replay, []
        for segment, rnd, pool in replay:  # what was in flight when the checkpoint was written
            pos = rnd * self.world_size + self.rank
            perm = self._permutation(segment, pool)
            if emitted >= budget or pos >= len(perm):
                continue
            yield self._draw(Cursor(perm[pos], segment, pos), pool)
            emitted += 1
        while emitted < budget:
            segment, pool = self.segment, self._pool()
            perm = self._permutation(segment, pool)
            if not perm:
                raise RuntimeError("the curriculum's active stages contain no training questions")
            while self.next_round * self.world_size < len(perm) and emitted < budget:
                if self.segment != segment:  # pool changed mid-epoch: continue on the new pool
                    break
                pos = self.next_round * self.world_size + self.rank
                self.next_round += 1
                yield self._draw(Cursor(perm[pos], segment, pos), pool)
                emitted += 1
            else:
                if emitted < budget:  # wrapped around a pool smaller than an epoch: a fresh permutation
                    self.segment, self.next_round = segment + 1, 0

    # -- state ---------------------------------------------------------------------------------
    def consumed(self, cursor: Cursor) -> None:
        """Record that `cursor` reached the model (so a resume does not serve it again)."""
        self.epoch_consumed += 1
        for i, (c, _) in enumerate(self._in_flight):
            if c == cursor:
                del self._in_flight[i]
                break

    def state_dict(self) -> dict:
        """Plain lists and numbers, identical on every rank (rounds, not rank-specific positions)."""
        return {
            "epoch": self.epoch,
            "segment": self.segment,
            "next_round": self.next_round,
            "epoch_consumed": self.epoch_consumed,
            "active": sorted(self.active),
            "replay": sorted(self.replay),
            "replay_fraction": self.replay_fraction,
            "in_flight": [
                [c.segment, c.pos // self.world_size, list(pool[0]), list(pool[1]), pool[2]] for c, pool in self._in_flight
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.segment = state["epoch"], state["segment"]
        if "next_round" in state:
            self.next_round = state["next_round"]
        else:  # older checkpoints: rank 0's first unconsumed position
            self.next_round = math.ceil(state["resume_pos"] / self.world_size)
        self.epoch_consumed = state["epoch_consumed"]
        self.active, self.replay = set(state["active"]), set(state["replay"])
        self.replay_fraction = state["replay_fraction"]
        self._in_flight = []
        self._replay = [(seg, rnd, (list(act), list(rep), frac)) for seg, rnd, act, rep, frac in state.get("in_flight", [])]
