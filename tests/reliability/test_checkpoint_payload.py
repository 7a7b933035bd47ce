"""Checkpoints are data, not programs: a `last.ckpt` crafted to run code when unpickled is refused in
one line naming the type, by every reader (the CLI's `fit` and `test`, `--ckpt_path last`, the
checkpoint IO plugin, the damaged-file probe), and its code never runs."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from anatomy_lightning.checkpointing import (
    AtomicCheckpointIO,
    ResumableCheckpoint,
    UnsafeCheckpointError,
    check_checkpoint_file,
    checkpoint_problem,
    load_checkpoint_data,
    newest_readable_step_checkpoint,
)
from tests.reliability.test_checkpoint import Scripted
from tests.support.cli_runs import CONFIGS, REPO, cpu_override

REFUSAL = ("holds a <builtins.exec> object, which is not data; refusing to load it "
           "(a checkpoint can run code when unpickled)")


class Payload:
    """Unpickled by a full unpickler, this creates `marker`: what a hostile checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


def plant(path: Path, marker: Path) -> Path:
    """A checkpoint that is a Lightning checkpoint in every other way, with the payload in its hyperparameters."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": 2, "hyper_parameters": {"x": Payload(marker)}},
               path)
    return path


def test_the_payload_would_run_under_a_full_unpickler(tmp_path: Path) -> None:
    """The planted file is a real threat: without weights_only it creates the marker."""
    marker = tmp_path / "ran"
    torch.load(plant(tmp_path / "last.ckpt", marker), weights_only=False)
    assert marker.exists()


def test_every_reader_refuses_a_planted_checkpoint_in_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    last = plant(tmp_path / "ckpts" / "last.ckpt", marker)
    for read in (load_checkpoint_data, check_checkpoint_file, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(UnsafeCheckpointError) as info:
            read(last)
        assert str(info.value) == f"checkpoint {last} {REFUSAL}", read
    assert checkpoint_problem(last) == REFUSAL
    # a planted step file is not a readable alternative to offer
    plant(tmp_path / "ckpts" / "step=4.ckpt", marker)
    torch.save({"state_dict": {}}, tmp_path / "ckpts" / "step=2.ckpt")
    assert newest_readable_step_checkpoint(tmp_path / "ckpts") == (str(tmp_path / "ckpts" / "step=2.ckpt"), 2)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, plugins=[AtomicCheckpointIO()], default_root_dir=str(tmp_path),
                        callbacks=[ResumableCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)])
    with pytest.raises(UnsafeCheckpointError, match=r"last.ckpt holds a <builtins.exec> object"):
        trainer.fit(Scripted(), ckpt_path="last")  # ResumableCheckpoint's `last`, without the CLI
    assert not marker.exists()


def _cli(subcommand: str, config: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "anatomy_lightning", subcommand, "--config", str(CONFIGS / "demo.yaml"),
           "--config", str(config), *extra]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("subcommand", "ckpt"), [("fit", "file"), ("test", "file"), ("fit", "last")])
def test_the_cli_refuses_a_planted_checkpoint_and_never_runs_it(tmp_path: Path, subcommand: str, ckpt: str) -> None:
    marker = tmp_path / "ran"
    config = cpu_override(tmp_path, model=None)
    last = plant(tmp_path / "checkpoints" / "demo" / "last.ckpt", marker)  # where demo.yaml's run keeps it
    proc = _cli(subcommand, config, tmp_path, "--ckpt_path", str(last) if ckpt == "file" else "last")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    said = proc.stderr.strip().splitlines()[-1]
    assert said.startswith("error: checkpoint ") and said.endswith(f"checkpoints/demo/last.ckpt {REFUSAL}"), said
    assert not marker.exists()
