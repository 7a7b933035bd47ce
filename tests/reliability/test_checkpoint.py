"""`AtomicCheckpointIO` never leaves a torn file; `ResumableCheckpoint` saves after validation on
validation steps and puts the random streams back, so a resumed fit continues like an uninterrupted one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

import anatomy_lightning.checkpointing.io as checkpoint_py
from anatomy_lightning.checkpointing import (
    AtomicCheckpointIO,
    CheckpointSaveError,
    ResumableCheckpoint,
    get_rng_state,
    set_rng_state,
)

REPO = Path(__file__).resolve().parents[2]


def _tmp_files(folder: Path) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(".tmp"))


# -- atomic writes -------------------------------------------------------------------------------
def test_save_writes_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path / "ckpts" / "last.ckpt")
    io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, tmp_path / "ckpts" / "last.ckpt")
    assert torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=True)["step"] == 2
    assert _tmp_files(tmp_path / "ckpts") == []


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io, target = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)

    def half_written(obj: Any, f: Any) -> None:
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_py.torch, "save", half_written)
    with pytest.raises(CheckpointSaveError, match="no space left on /.*the previous last.ckpt is kept"):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert _tmp_files(tmp_path) == []


_SAVER = textwrap.dedent(
    """
    import sys, torch
    from anatomy_lightning.checkpointing import AtomicCheckpointIO
    io, payload = AtomicCheckpointIO(), torch.randn(4_000_000)  # 16 MB: a save takes a while
    step = 0
    while True:
        step += 1
        io.save_checkpoint({"step": step, "w": payload}, sys.argv[1])
        print(step, flush=True)
    """
)


def test_sigkill_during_saves_never_tears_last_ckpt(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(target)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # one complete save, then kill at some point of a later one
        assert first.strip() == "1", first
        time.sleep(random.uniform(0.3, 0.8))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = torch.load(target, weights_only=True)
    assert saved["step"] >= 1 and saved["w"].numel() == 4_000_000
    # a temporary file of the killed save may remain; the next save of the same checkpoint removes it
    AtomicCheckpointIO().save_checkpoint({"step": 0}, target)
    assert _tmp_files(tmp_path) == []


# -- random streams ------------------------------------------------------------------------------
def _draws() -> tuple[list[float], list[float], list[float]]:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    state = get_rng_state()
    expected = _draws()
    torch.save({"rng": [state]}, tmp_path / "rng.ckpt")
    loaded = torch.load(tmp_path / "rng.ckpt", weights_only=True)["rng"][0]
    _draws()  # move every stream on
    set_rng_state(loaded)
    assert _draws() == expected


# -- the callback with a scripted module ---------------------------------------------------------
class Scripted(L.LightningModule):
    """Manual optimisation like GRPOModule; records the torch random draw of every training step."""

    def __init__(self, fail_at_step: int | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.automatic_optimization = False
        self.draws: dict[int, float] = {}
        self.fail_at_step = fail_at_step

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.draws[self.global_step + 1] = torch.rand(()).item()  # stands in for sampling completions
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self.layer(batch.float()).sum())
        opt.step()
        if self.global_step == self.fail_at_step:  # after the optimizer step, before the callbacks
            raise RuntimeError("CUDA out of memory (simulated)")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.ones(40, 2), batch_size=2)  # every batch alike: this loader restarts on resume

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.ones(4, 2), batch_size=2)


class CountValidations(Callback):
    """State changed by validation, like the curriculum's stage."""

    def __init__(self) -> None:
        self.validations = 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validations += 1

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.validations = state["validations"]


def _fit(
    root: Path, max_steps: int, ckpt_path: str | None = None, fail_at_step: int | None = None
) -> tuple[Scripted, CountValidations]:
    L.seed_everything(0)
    module, counter = Scripted(fail_at_step), CountValidations()
    checkpoints = ResumableCheckpoint(dirpath=root / "ckpts", filename="{step}", every_n_train_steps=2,
                                      save_top_k=-1, save_last=True, save_on_exception=True)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, val_check_interval=4, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[counter, checkpoints], default_root_dir=str(root), plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, counter


def test_checkpoints_on_validation_steps_are_written_after_validation(tmp_path: Path) -> None:
    _fit(tmp_path, max_steps=6)
    counts = {
        step: torch.load(tmp_path / "ckpts" / f"step={step}.ckpt", weights_only=True)["callbacks"]["CountValidations"]
        for step in (2, 4, 6)
    }
    # step 4 validates: its checkpoint holds that validation (ModelCheckpoint would write 0 here)
    assert counts == {2: {"validations": 0}, 4: {"validations": 1}, 6: {"validations": 1}}


def test_resuming_replays_validation_state_and_random_draws(tmp_path: Path) -> None:
    full, counter_full = _fit(tmp_path / "full", max_steps=8)
    _fit(tmp_path / "cut", max_steps=4)
    resumed, counter_resumed = _fit(tmp_path / "cut", max_steps=8, ckpt_path="last")
    assert sorted(resumed.draws) == [5, 6, 7, 8]  # resumed at step 4, not 0
    assert {s: full.draws[s] for s in resumed.draws} == resumed.draws  # same random stream after the resume
    assert counter_resumed.validations == counter_full.validations == 2  # steps 4 and 8, neither lost nor repeated
    for name, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value)


def test_an_exception_inside_a_training_step_does_not_overwrite_last(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="out of memory"):
        _fit(tmp_path, max_steps=8, fail_at_step=3)
    assert torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert sorted(os.listdir(tmp_path / "ckpts")) == ["last.ckpt", "step=2.ckpt"]
