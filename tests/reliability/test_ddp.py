"""Two CPU processes (DDP over gloo) running the shrunken demo: every rank must hold the same
curriculum, augmentation queue, sampler state and weights after every step, and every group of G
completions must live on one rank (advantages are computed per rank, so a split group would mix
prompts)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.reliability_runs import G, check, fit_command, read_dump, run_env, write_override

MAX_STEPS = 4
DDP = ("--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu")


def _run_ddp(tmp_path: Path, override: Path, *flags: str) -> list[list[dict]]:
    """`fit` on two gloo ranks in `tmp_path`; the StateDump rows of rank 0 and rank 1."""
    log = tmp_path / "log.txt"
    with log.open("w") as out:
        result = subprocess.run(
            fit_command(override, *DDP, *flags), cwd=tmp_path, env=run_env(tmp_path / "dump", tmp_path / "cache"),
            stdout=out, stderr=subprocess.STDOUT, timeout=600,
        )
    check(result, log)
    return [read_dump(tmp_path / "dump", rank) for rank in (0, 1)]


@pytest.mark.slow
def test_two_processes_hold_identical_state_after_every_step(tmp_path: Path) -> None:
    ranks = _run_ddp(tmp_path, write_override(tmp_path, max_steps=MAX_STEPS, val_every=2, n_train=32))
    assert [r["step"] for r in ranks[0]] == [r["step"] for r in ranks[1]] == list(range(1, MAX_STEPS + 1))
    for r0, r1 in zip(*ranks):
        assert r0["world_size"] == r1["world_size"] == 2
        for key in ("curriculum", "augmenter", "sampler", "weights", "lr"):
            assert r0[key] == r1[key], f"step {r0['step']}: ranks disagree on {key}"
        for row in (r0, r1):
            # one row of G rewards per question of this rank's batch: whole groups, never split
            assert row["group_shape"] == [len(row["ids"]), G]
        assert r0["ids"] != r1["ids"]  # each rank trains on its own slice of the permutation

    final = ranks[0][-1]
    # the validation at step 2 promoted on both ranks (rows are written before step 4's validation)
    assert [h["step"] for h in final["curriculum"]["history"]] == [2]
    injected = [q for rows in ranks for row in rows for q in row["ids"] if "#aug" in q]
    assert injected and len(injected) == len(set(injected))  # each queued rewrite went to exactly one rank


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_is_skipped_on_every_rank(tmp_path: Path) -> None:
    fault = {"class_path": "tests.support.state_dump.NonFiniteLossOnRank", "init_args": {"rank": 1}}
    override = write_override(tmp_path, max_steps=2, val_every=100, n_train=32, extra_callbacks=(fault,))
    cmd = fit_command(override, *DDP)
    log, dump = tmp_path / "log.txt", tmp_path / "dump"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=run_env(dump, tmp_path / "cache"), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # once rank 1 has skipped its step, both ranks should finish that step within seconds
        deadline, skipped_at = time.monotonic() + 400, None
        while proc.poll() is None and time.monotonic() < deadline:
            if skipped_at is None and "optimizer step skipped" in log.read_text():
                skipped_at = time.monotonic()
            rows = [dump / f"rank{r}.jsonl" for r in (0, 1)]
            if skipped_at is not None and not all(f.exists() and f.read_text() for f in rows):
                if time.monotonic() - skipped_at > 30:
                    raise AssertionError(f"the ranks hung after rank 1 skipped its step:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
            proc.wait()
    check(subprocess.CompletedProcess(cmd, proc.returncode), log)
    ranks = [read_dump(dump, rank) for rank in (0, 1)]
    # the skipped batch (global step 0) is skipped on both ranks, then two real steps
    assert [r["step"] for r in ranks[0]] == [r["step"] for r in ranks[1]] == [0, 1, 2]
    for r0, r1 in zip(*ranks):
        assert r0["weights"] == r1["weights"]


@pytest.mark.slow
def test_dynamic_sampling_under_ddp_keeps_the_ranks_in_step(tmp_path: Path) -> None:
    """Each rank resamples its own no-signal groups (its own draws, its own number of rounds), yet
    every rank runs the same backward passes, so the weights stay identical; the completion counter
    is summed over ranks."""
    override = write_override(tmp_path, max_steps=3, val_every=3, n_train=32)
    ranks = _run_ddp(tmp_path, override, "--model.dynamic_sample=true", "--model.max_resample_times=2")
    assert [r["step"] for r in ranks[0]] == [r["step"] for r in ranks[1]] == [1, 2, 3]
    for r0, r1 in zip(*ranks):
        assert r0["weights"] == r1["weights"] and r0["completions"] == r1["completions"]
        assert r0["trained_ids"] != r1["trained_ids"]
        for row in (r0, r1):
            assert row["group_shape"] == [len(row["ids"]), G]  # always the scheduled N groups
    # 3 steps x 2 ranks x 4 prompts x G = 48 without resampling; the random policy rarely has signal
    assert ranks[0][-1]["completions"] > 3 * 2 * 4 * G
