"""The training sampler resumes exactly: prefetched (in-flight) batches, curriculum promotions between
drawing and consuming them, every rank from the one checkpoint rank 0 writes; and the evaluation
split never leaves a DDP rank without questions."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from anatomy_lightning.data.batches import RankSlice
from anatomy_lightning.data.sampler import Cursor, StageSampler
from anatomy_lightning.data.schema import DataError

STAGES = [0, 1, 2] * 8  # 24 questions, 8 per stage


class Loader:
    """A DataLoader with workers in miniature: `ahead` batches are drawn before the first is consumed."""

    def __init__(self, sampler: StageSampler, batch: int = 2, ahead: int = 2) -> None:
        self.sampler, self.batch, self.ahead = sampler, batch, ahead
        self.it: Iterator[Cursor] = iter(sampler)
        self.queue: list[list[Cursor]] = []

    def next_batch(self) -> list[int]:
        while len(self.queue) <= self.ahead:
            drawn = [c for _, c in zip(range(self.batch), self.it)]
            if not drawn:
                break
            self.queue.append(drawn)
        if not self.queue:
            raise StopIteration
        batch = self.queue.pop(0)
        for c in batch:
            self.sampler.consumed(c)
        return [c.index for c in batch]


def _sampler(rank: int = 0, world: int = 1) -> StageSampler:
    s = StageSampler(STAGES, seed=3, epoch_length=24, rank=rank, world_size=world)
    s.set_active([0])
    return s


def _rest(loader: Loader) -> list[list[int]]:
    out = []
    while True:
        try:
            out.append(loader.next_batch())
        except StopIteration:
            return out


def test_in_flight_batches_are_served_again_after_a_resume_even_across_a_promotion() -> None:
    uninterrupted = Loader(_sampler())
    head = [uninterrupted.next_batch() for _ in range(3)]
    uninterrupted.sampler.set_active([0, 1])  # promotion while 2 batches of stage 0 are in flight
    state = uninterrupted.sampler.state_dict()
    assert len(state["in_flight"]) == 4
    tail = _rest(uninterrupted)

    resumed_sampler = _sampler()
    resumed_sampler.load_state_dict(state)
    resumed = _rest(Loader(resumed_sampler))
    assert resumed == tail
    assert {STAGES[i] for i in resumed[0] + resumed[1]} == {0}  # the prefetched stage-0 batches
    assert 1 in {STAGES[i] for b in resumed for i in b}
    assert sum(map(len, head + tail)) == 24  # the epoch keeps its length


def test_every_rank_resumes_from_rank_zeros_state() -> None:
    world = 2
    loaders = [Loader(_sampler(r, world)) for r in range(world)]
    for _ in range(2):
        for loader in loaders:
            loader.next_batch()
    states = [loader.sampler.state_dict() for loader in loaders]
    assert states[0] == states[1]  # nothing rank-specific: rank 0's checkpoint serves every rank
    tails = [_rest(loader) for loader in loaders]
    for rank in range(world):
        s = _sampler(rank, world)
        s.load_state_dict(states[0])
        assert _rest(Loader(s)) == tails[rank]


def test_a_checkpoint_from_before_in_flight_tracking_still_loads() -> None:
    s = _sampler()
    s.load_state_dict({"epoch": 0, "segment": 1, "resume_pos": 3, "epoch_consumed": 3, "active": [0], "replay": [],
                       "replay_fraction": 0.0})
    drawn = [c.pos for c in s]
    assert drawn[0] == 3 and len(drawn) == 21


@pytest.mark.parametrize(("n", "world"), [(9, 4), (6, 4), (8, 2), (3, 3), (0, 2)])
def test_evaluation_slices_are_balanced_ordered_and_never_empty(n: int, world: int) -> None:
    slices = [RankSlice(n, rank, world).indices for rank in range(world)]
    assert [i for s in slices for i in s] == list(range(n))  # each question once, in file order
    if n:
        assert min(map(len, slices)) >= 1 and max(map(len, slices)) - min(map(len, slices)) <= 1


def test_fewer_evaluation_questions_than_processes_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="1 validation questions cannot be split over 2 processes"):
        RankSlice(1, 0, 2, "validation")
