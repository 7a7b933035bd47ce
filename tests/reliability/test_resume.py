"""SIGKILL a real `fit` mid-epoch, resume it with `--ckpt_path last`, compare with an uninterrupted run.

Steps 1-8 of the shrunken demo; validation at steps 4 and 8 always promotes the curriculum, the
epoch (24 questions, batches of 4) ends at step 6, GDQA rewrites are injected from step 2 on, and
checkpoints are written every 2 steps. The killed run is stopped as soon as a checkpoint of step
>= 4 exists. With model weights, optimizer, scheduler, sampler position, curriculum, augmentation
queue and random streams all restored, the resumed run must replay the uninterrupted one exactly:
same batches, same rewards, same weights after every step.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.support.reliability_runs import check, fit_command, read_dump, run_env, without_run_dir, write_override

MAX_STEPS, VAL_EVERY, CKPT_EVERY = 8, 4, 2
STEP_FILE = re.compile(r"^step=(\d+)\.ckpt$")


def _checkpoint_steps(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(m[1]) for f in os.listdir(folder) if (m := STEP_FILE.match(f)))


def _kill_once_a_checkpoint_exists(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, at_least: int) -> int:
    """Start `cmd`, SIGKILL it as soon as a checkpoint of step >= at_least is on disk; that step."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            steps = _checkpoint_steps(cwd / "checkpoints" / "demo")
            if steps and steps[-1] >= at_least:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return steps[-1]
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (exit {proc.returncode}) before it was killed:\n{log.read_text()[-4000:]}")
            time.sleep(0.05)
        raise AssertionError("no checkpoint of step >= %d within 10 minutes" % at_least)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("time", "rank")}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_ckpt_path_last_continues_like_an_uninterrupted_run(tmp_path: Path) -> None:
    cache = tmp_path / "embedding-cache"
    full, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    for run in (full, killed):
        run.mkdir()
    cmd_full = fit_command(write_override(full, max_steps=MAX_STEPS, val_every=VAL_EVERY, ckpt_every=CKPT_EVERY))
    cmd_killed = fit_command(write_override(killed, max_steps=MAX_STEPS, val_every=VAL_EVERY, ckpt_every=CKPT_EVERY))

    # the uninterrupted reference runs alongside the killed and resumed runs (two cores)
    with (full / "log.txt").open("w") as out:
        reference = subprocess.Popen(
            cmd_full, cwd=full, env=run_env(full / "dump", cache), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        ckpt_step = _kill_once_a_checkpoint_exists(
            cmd_killed, killed, run_env(killed / "dump-1", cache), killed / "log-1.txt", at_least=4
        )
        ckpt_dir = killed / "checkpoints" / "demo"
        last = torch.load(ckpt_dir / "last.ckpt", weights_only=True, map_location="cpu")  # intact after the kill
        # step files are written before last.ckpt, so the kill may have come between the two
        assert ckpt_step - CKPT_EVERY <= last["global_step"] <= ckpt_step
        before_kill = read_dump(killed / "dump-1", run_dir=killed)
        # nothing lost beyond the checkpoint interval
        assert before_kill[-1]["step"] - last["global_step"] <= CKPT_EVERY

        resumed = subprocess.run(
            [*cmd_killed, "--ckpt_path", "last"],
            cwd=killed,
            env=run_env(killed / "dump-2", cache),
            stdout=(killed / "log-2.txt").open("w"),
            stderr=subprocess.STDOUT,
        )
        check(resumed, killed / "log-2.txt")
    finally:
        reference.wait(timeout=600)
    check(subprocess.CompletedProcess(cmd_full, reference.returncode), full / "log.txt")

    after = read_dump(killed / "dump-2", run_dir=killed)
    uninterrupted = {row["step"]: row for row in read_dump(full / "dump", run_dir=full)}
    assert sorted(uninterrupted) == list(range(1, MAX_STEPS + 1))
    # resumed at the checkpoint's global step, not at 0, and ran to the end
    assert [row["step"] for row in after] == list(range(last["global_step"] + 1, MAX_STEPS + 1))
    assert "Restored all states from the checkpoint" in (killed / "log-2.txt").read_text()
    # the killed run had replayed the reference up to the kill; the resumed run replays the rest:
    # the same questions (sampler position and GDQA injections), rewards (random streams and
    # weights), curriculum state and augmentation queue after every step
    for row in before_kill + after:
        assert _comparable(row) == _comparable(uninterrupted[row["step"]]), f"step {row['step']} differs"
    # the story the comparison covers actually happened
    final = uninterrupted[MAX_STEPS]
    assert [h["step"] for h in final["curriculum"]["history"]] == [4]  # written before step 8's validation
    assert any("#aug" in qid for row in after for qid in row["ids"])
    assert final["sampler"]["epoch"] == 1

    # the final checkpoints agree too (curriculum, augmentation, sampler, optimizer step count)
    end_resumed = torch.load(ckpt_dir / "last.ckpt", weights_only=True, map_location="cpu")
    end_full = torch.load(full / "checkpoints" / "demo" / "last.ckpt", weights_only=True, map_location="cpu")
    assert end_resumed["global_step"] == end_full["global_step"] == MAX_STEPS
    for key in ("CurriculumCallback", "GroupDiversityCallback"):
        assert without_run_dir(end_resumed["callbacks"][key], killed) == without_run_dir(end_full["callbacks"][key], full)
    assert end_resumed["AnatomyVQADataModule"] == end_full["AnatomyVQADataModule"]
    assert [h["step"] for h in end_full["callbacks"]["CurriculumCallback"]["state"]["history"]] == [4, 8]
    for name, tensor in end_full["state_dict"].items():
        assert torch.equal(end_resumed["state_dict"][name], tensor), name
