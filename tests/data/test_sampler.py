"""StageSampler: only active stages are drawn, resume continues the same permutation, ranks split it."""

from __future__ import annotations

from anatomy_lightning.data.sampler import StageSampler

STAGES = [0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 1, 2]


def _draw(sampler: StageSampler, n: int | None = None) -> list[int]:
    out = []
    for c in sampler:
        sampler.consumed(c)
        out.append(c.index)
        if n is not None and len(out) == n:
            break
    return out


def test_only_active_stages_are_drawn_and_each_once_per_pass() -> None:
    s = StageSampler(STAGES, seed=3, epoch_length=4)
    s.set_active([0])
    drawn = _draw(s)
    assert len(drawn) == 4
    assert {STAGES[i] for i in drawn} == {0}
    assert len(set(drawn)) == 4  # a pass over the 4 stage-0 questions, no repeats


def test_promotion_mid_epoch_switches_pool_immediately() -> None:
    s = StageSampler(STAGES, seed=0, epoch_length=12)
    s.set_active([0])
    it = iter(s)
    first = [next(it).index for _ in range(2)]
    s.set_active([0, 1])
    rest = [c.index for c in it]
    assert {STAGES[i] for i in first} == {0}
    assert {STAGES[i] for i in rest} <= {0, 1} and 1 in {STAGES[i] for i in rest}
    assert len(first) + len(rest) == 12


def test_replay_draws_a_share_of_earlier_stages() -> None:
    stages = [0] * 50 + [1] * 50
    s = StageSampler(stages, seed=1, epoch_length=200)
    s.set_active([1], replay=[0], replay_fraction=0.2)
    drawn = _draw(s)
    share = sum(stages[i] == 0 for i in drawn) / len(drawn)
    assert 0.1 < share < 0.3


def test_resume_continues_with_the_next_unseen_question() -> None:
    a = StageSampler(STAGES, seed=7, epoch_length=10)
    a.set_active([0, 1])
    head = _draw(a, 3)
    state = a.state_dict()
    tail_uninterrupted = _draw(a)
    b = StageSampler(STAGES, seed=7, epoch_length=10)
    b.load_state_dict(state)
    tail_resumed = _draw(b)
    assert tail_resumed == tail_uninterrupted
    assert len(head) + len(tail_resumed) == 10


def test_ranks_partition_each_permutation() -> None:
    ranks = [StageSampler(STAGES, seed=5, epoch_length=12, rank=r, world_size=2) for r in range(2)]
    draws = [_draw(s) for s in ranks]
    assert len(draws[0]) == len(draws[1]) == 6
    assert not set(draws[0]) & set(draws[1])
    assert sorted(draws[0] + draws[1]) == list(range(12))


def test_new_epoch_reshuffles() -> None:
    s = StageSampler(STAGES, seed=0)
    e0 = _draw(s)
    s.set_epoch(1)
    e1 = _draw(s)
    assert sorted(e0) == sorted(e1) and e0 != e1
