"""SIGTERM and SIGINT sent to a real `fit`: it stops at a consistent point, exits 143 / 130, says how
to resume, and `--ckpt_path last` (here also from a moved run folder) replays the uninterrupted run.

One chain shares the runs (the shrunken demo of runs.py, steps 1-8, validation after steps 4 and 8
that always promotes, checkpoints every 2 steps), next to an uninterrupted reference:
  A. SIGTERM while the validation after step 4 runs -> exit 143, `last.ckpt` at step 4 holding that
     validation's promotion (the old checkpoint-on-exception wrote it before the curriculum decided);
  B. `--ckpt_path last`, SIGINT while training step 6 runs -> the step finishes, exit 130, step 6 saved;
  C. the run folder is moved, `--ckpt_path last` runs to the end, writing `last.ckpt` (no `last-v1.ckpt`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.support.reliability_runs import check, fit_command, read_dump, run_env, without_run_dir, write_override

MAX_STEPS, VAL_EVERY = 8, 4
PAUSER = ({"class_path": "tests.support.state_dump.PauseAt"},)


def _env(run: Path, cache: Path, dump: str, pause_at: str = "") -> dict[str, str]:
    return {**run_env(run / dump, cache), "PAUSE_AT": pause_at, "PAUSE_DIR": str(run / f"pause-{dump}")}


def _signal_when_paused(cmd: list[str], run: Path, env: dict[str, str], log: Path, signum: int) -> tuple[int, str]:
    """Run `cmd` until PauseAt holds it, send `signum` from outside, wait; (exit code, output)."""
    marker = Path(env["PAUSE_DIR"]) / "paused"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=run, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"never paused (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
            time.sleep(0.05)
        os.kill(proc.pid, signum)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, log.read_text()


def _last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "demo" / "last.ckpt", weights_only=True, map_location="cpu")


def _history(ckpt: dict) -> list[int]:
    return [h["step"] for h in ckpt["callbacks"]["CurriculumCallback"]["state"]["history"]]


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("time", "rank")}


@pytest.mark.slow
def test_sigterm_in_validation_and_sigint_in_training_resume_like_an_uninterrupted_run(tmp_path: Path) -> None:
    cache, full, run = tmp_path / "embedding-cache", tmp_path / "uninterrupted", tmp_path / "run"
    for folder in (full, run):
        folder.mkdir()
    cmd_full = fit_command(write_override(full, max_steps=MAX_STEPS, val_every=VAL_EVERY, extra_callbacks=PAUSER))
    cmd = fit_command(write_override(run, max_steps=MAX_STEPS, val_every=VAL_EVERY, extra_callbacks=PAUSER))
    with (full / "log.txt").open("w") as out:  # the reference runs alongside the chain (two cores)
        reference = subprocess.Popen(
            cmd_full, cwd=full, env=_env(full, cache, "dump"), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        # A: SIGTERM during the validation after step 4
        env_a = _env(run, cache, "dump-a", "validation:4")
        code, log_a = _signal_when_paused(cmd, run, env_a, run / "log-a.txt", signal.SIGTERM)
        assert code == 143, log_a[-3000:]
        assert "SIGTERM: stopped after step 4" in log_a and "--ckpt_path last" in log_a
        assert "Traceback" not in log_a
        after_a = _last(run)
        assert after_a["global_step"] == 4 and _history(after_a) == [4]  # the validation finished and was saved

        # B: the resubmitted job resumes, SIGINT while training step 6 runs
        code, log_b = _signal_when_paused(
            [*cmd, "--ckpt_path", "last"], run, _env(run, cache, "dump-b", "train:6"), run / "log-b.txt", signal.SIGINT
        )
        assert code == 130, log_b[-3000:]
        assert "Restored all states from the checkpoint" in log_b and "SIGINT: stopped after step 6" in log_b
        assert _last(run)["global_step"] == 6

        # C: the run folder moves (a new scratch disk), the job resumes there and runs to the end
        moved = tmp_path / "moved"
        shutil.move(run, moved)
        resumed = subprocess.run(
            [*fit_command(moved / "override.yaml"), "--ckpt_path", "last"], cwd=moved, env=_env(moved, cache, "dump-c"),
            stdout=(moved / "log-c.txt").open("w"), stderr=subprocess.STDOUT,
        )
        check(resumed, moved / "log-c.txt")
    finally:
        reference.wait(timeout=600)
    check(subprocess.CompletedProcess(cmd_full, reference.returncode), full / "log.txt")

    uninterrupted = {row["step"]: row for row in read_dump(full / "dump", run_dir=full)}
    chain = [
        *read_dump(moved / "dump-a", run_dir=run),
        *read_dump(moved / "dump-b", run_dir=run),
        *read_dump(moved / "dump-c", run_dir=moved),
    ]
    assert [row["step"] for row in chain] == list(range(1, MAX_STEPS + 1))  # nothing lost, nothing repeated
    for row in chain:
        assert _comparable(row) == _comparable(uninterrupted[row["step"]]), f"step {row['step']} differs"
    assert any("#aug" in qid for row in chain[4:] for qid in row["ids"])  # the queue crossed both stops

    folder = moved / "checkpoints" / "demo"
    assert not [f for f in os.listdir(folder) if f.startswith("last-v")]
    end, end_full = _last(moved), _last(full)
    assert end["global_step"] == end_full["global_step"] == MAX_STEPS
    assert _history(end) == _history(end_full) == [4, 8]
    for key in ("CurriculumCallback", "GroupDiversityCallback"):
        assert without_run_dir(end["callbacks"][key], moved) == without_run_dir(end_full["callbacks"][key], full)
    for name, tensor in end_full["state_dict"].items():
        assert torch.equal(end["state_dict"][name], tensor), name
