"""What `ResumableCheckpoint` refuses or reports instead of resuming wrongly: damaged files, a missing
`last`, another run's checkpoint, a moved run folder, a full disk, an exception inside validation."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from anatomy_lightning.checkpointing import (
    FINGERPRINT_ENV,
    AtomicCheckpointIO,
    CheckpointSaveError,
    ResumableCheckpoint,
    check_checkpoint_file,
    run_fingerprint,
)
from anatomy_lightning.cli import main
from tests.reliability.test_checkpoint import Scripted

REPO = Path(__file__).resolve().parents[2]


class Settings(Scripted):
    """`Scripted` with the hyperparameters a fingerprint reads."""

    def __init__(
        self, num_generations: int = 8, model: str = "tiny-qwen2.5-vl", fail_in_validation_at: int | None = None
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.fail_in_validation_at = fail_in_validation_at

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if self.global_step == self.fail_in_validation_at:
            raise ValueError("corrupt validation image (simulated)")


class Files(L.LightningDataModule):
    def __init__(self, train_file: str, num_stages: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.ones(40, 2), batch_size=2)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.ones(4, 2), batch_size=2)


def _fit(
    root: Path, max_steps: int, ckpt_path: str | None = None, module: L.LightningModule | None = None,
    data: L.LightningDataModule | None = None, **checkpoint_kwargs: Any,
) -> ResumableCheckpoint:
    L.seed_everything(0)
    checkpoints = ResumableCheckpoint(dirpath=root / "ckpts", filename="{step}", every_n_train_steps=2, save_top_k=-1,
                                      save_last=True, save_on_exception=True, **checkpoint_kwargs)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, val_check_interval=4, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[checkpoints], default_root_dir=str(root), plugins=[AtomicCheckpointIO()],
    )
    module = module or Settings()
    if data is None:
        trainer.fit(module, ckpt_path=ckpt_path)
    else:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return checkpoints


def _step(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("six-steps")
    _fit(root, max_steps=6)
    assert sorted(os.listdir(root / "ckpts")) == ["last.ckpt", "step=2.ckpt", "step=4.ckpt", "step=6.ckpt"]
    return root


def _damage(last: Path, how: str) -> None:
    data = last.read_bytes()
    if how == "folder":
        last.unlink()
        last.mkdir()
        (last / "inside").write_text("x")
    elif how == "empty":
        last.write_bytes(b"")
    elif how == "truncated":
        last.write_bytes(data[: len(data) // 2])
    else:
        last.write_bytes(os.urandom(len(data)))


# -- damaged checkpoints -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("how", "said"),
    [("empty", "is empty (0 bytes)"), ("truncated", "is truncated"), ("garbage", "is truncated or not a checkpoint"),
     ("folder", "is a folder")],
)
def test_a_damaged_last_ckpt_names_the_newest_readable_step_file(
    six_steps: Path, tmp_path: Path, how: str, said: str
) -> None:
    root = tmp_path / "run"
    shutil.copytree(six_steps, root)
    _damage(root / "ckpts" / "last.ckpt", how)
    (root / "ckpts" / "step=6.ckpt").write_bytes(b"PK\x03\x04 cut short")  # the newest step file is damaged too
    newest = str(root / "ckpts" / "step=4.ckpt")
    with pytest.raises(ValueError) as info:
        _fit(root, max_steps=8, ckpt_path="last")
    message = str(info.value)
    assert "\n" not in message and said in message
    assert f"the newest readable one is {newest} (step 4): resume with --ckpt_path {newest}" in message
    with pytest.raises(ValueError, match=re.escape(said)):  # an explicit path says the same
        check_checkpoint_file(root / "ckpts" / "last.ckpt")
    if how == "folder":
        with pytest.raises(CheckpointSaveError, match="a folder of that name is in the way"):
            _fit(root, max_steps=8, ckpt_path=newest)
        shutil.rmtree(root / "ckpts" / "last.ckpt")
    assert _fit(root, max_steps=8, ckpt_path=newest).last_model_path.endswith("last.ckpt")  # the advice works
    assert _step(root / "ckpts" / "last.ckpt") == 8


def test_a_damaged_checkpoint_given_to_the_cli_is_one_line(
    six_steps: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "ckpts"
    shutil.copytree(six_steps / "ckpts", folder)
    _damage(folder / "last.ckpt", "truncated")
    with pytest.raises(SystemExit) as info:
        main(["test", "--config", str(REPO / "configs" / "demo.yaml"), "--ckpt_path", str(folder / "last.ckpt")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: checkpoint {folder / 'last.ckpt'} is truncated") and "step=6.ckpt" in err


def test_the_io_plugin_reports_an_unreadable_checkpoint_in_one_line(six_steps: Path, tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    target.write_bytes((six_steps / "ckpts" / "step=2.ckpt").read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"last.ckpt is truncated .* and no readable step=N.ckpt is beside it"):
        AtomicCheckpointIO().load_checkpoint(target)


def test_ckpt_path_last_without_a_checkpoint_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"--ckpt_path last: no last.ckpt in .*ckpts; check --run_name"):
        _fit(tmp_path, max_steps=4, ckpt_path="last")
    assert not (tmp_path / "ckpts").exists()  # nothing trained, nothing saved on the way out


# -- a checkpoint knows its run ------------------------------------------------------------------
def test_resuming_another_runs_checkpoint_lists_the_differences(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_file = tmp_path / "train.jsonl"
    data_file.write_text('{"id": "a"}\n')
    _fit(tmp_path, max_steps=4, data=Files(str(data_file)))
    last = tmp_path / "ckpts" / "last.ckpt"
    before = last.read_bytes()
    data_file.write_text('{"id": "b"}\n')  # same size, other content
    with pytest.raises(ValueError) as info:
        _fit(tmp_path, max_steps=8, ckpt_path="last", module=Settings(num_generations=4), data=Files(str(data_file), 2))
    message = str(info.value)
    assert "was written by a different run" in message and "\n" not in message
    assert "model.num_generations: 8 -> 4" in message and "data.num_stages: 3 -> 2" in message
    assert "data.train_file: train.jsonl (12 bytes, sha1 " in message and "allow_fingerprint_change" in message
    assert last.read_bytes() == before  # the refused resume left last.ckpt alone

    monkeypatch.setenv(FINGERPRINT_ENV, "1")  # the explicit override continues
    _fit(tmp_path, max_steps=6, ckpt_path="last", module=Settings(num_generations=4), data=Files(str(data_file), 2))
    assert _step(last) == 6
    monkeypatch.delenv(FINGERPRINT_ENV)
    _fit(tmp_path, max_steps=8, ckpt_path="last", module=Settings(num_generations=2), data=Files(str(data_file), 2),
         allow_fingerprint_change=True)
    assert _step(last) == 8


def test_the_fingerprint_ignores_where_the_data_lives(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.jsonl").write_text("same\n")
    prints = [run_fingerprint(Files(str(tmp_path / n / "train.jsonl")), Settings()) for n in ("a", "b")]
    assert prints[0] == prints[1] and prints[0]["data.train_file"]["size"] == 5


def test_a_moved_run_folder_resumes_into_last_ckpt_not_last_v1(tmp_path: Path) -> None:
    _fit(tmp_path / "old", max_steps=4)
    shutil.move(tmp_path / "old", tmp_path / "new")
    _fit(tmp_path / "new", max_steps=8, ckpt_path="last")
    files = sorted(os.listdir(tmp_path / "new" / "ckpts"))
    assert files == ["last.ckpt", "step=2.ckpt", "step=4.ckpt", "step=6.ckpt", "step=8.ckpt"]
    assert _step(tmp_path / "new" / "ckpts" / "last.ckpt") == 8


def test_an_exception_inside_validation_keeps_the_last_consistent_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="corrupt validation image"):
        _fit(tmp_path, max_steps=8, module=Settings(fail_in_validation_at=4))
    # step 4's checkpoint waits for its validation, which never finished: last.ckpt stays at step 2
    assert _step(tmp_path / "ckpts" / "last.ckpt") == 2
    assert sorted(os.listdir(tmp_path / "ckpts")) == ["last.ckpt", "step=2.ckpt"]


# -- a full disk ---------------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    command = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_save_on_a_full_disk_says_so_and_keeps_the_previous_checkpoint(small_tmpfs: Path) -> None:
    io, target = AtomicCheckpointIO(), small_tmpfs / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.zeros(10_000)}, target)
    said = f"no space left on {small_tmpfs} while saving checkpoint {target}; the previous last.ckpt is kept"
    with pytest.raises(CheckpointSaveError, match=re.escape(said)):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1_000_000)}, target)  # 4 MB on a 1 MB disk
    assert torch.load(target, weights_only=True)["step"] == 1
    assert sorted(os.listdir(small_tmpfs)) == ["last.ckpt"]  # no temporary left behind


def test_training_onto_a_full_disk_stops_cleanly(small_tmpfs: Path) -> None:
    _fit(small_tmpfs, max_steps=2)
    free = shutil.disk_usage(small_tmpfs).free
    (small_tmpfs / "filler").write_bytes(b"\0" * max(0, free - 512))
    with pytest.raises(CheckpointSaveError, match="no space left on"):
        _fit(small_tmpfs, max_steps=4, ckpt_path="last")
    assert _step(small_tmpfs / "ckpts" / "last.ckpt") == 2
    assert not [f for f in os.listdir(small_tmpfs / "ckpts") if f.endswith(".tmp")]


# -- a checkpoint of another model -----------------------------------------------------------------
def test_a_checkpoint_of_another_model_names_the_model_it_was_trained_for() -> None:
    from anatomy_lightning.module import GRPOModule

    module = GRPOModule(model="tiny-qwen2.5-vl", dtype="float32", beta=0.0)
    module.configure_model()
    own = {k: v for k, v in module.state_dict().items() if k.startswith("policy.")}
    name = next(k for k, v in own.items() if v.ndim == 2)
    bigger = {**own, name: torch.zeros(own[name].shape[0] * 4, own[name].shape[1])}
    trained_for = {"model": "small-qwen2.5-vl", "lora": None, "quantization": None}
    other = {"state_dict": bigger, "hyper_parameters": trained_for}
    with pytest.raises(ValueError) as info:
        module.on_load_checkpoint(other)
    message = str(info.value)
    assert message.startswith("this checkpoint was trained for model 'small-qwen2.5-vl' (no LoRA")
    assert "this run builds 'tiny-qwen2.5-vl'" in message and f"e.g. {name} is " in message and "\n" not in message

    lora = {"state_dict": {"policy.base_model.model.lm_head.lora_A.weight": torch.zeros(16, 128)},
            "hyper_parameters": {"model": "tiny-qwen2.5-vl", "lora": {"r": 16}, "quantization": None}}
    with pytest.raises(ValueError, match=r"\(LoRA r=16, .*0 weights differ in shape and 1 are unknown here"):
        module.on_load_checkpoint(lora)  # non-strict loading would have ignored it and tested untrained weights
    module.on_load_checkpoint({"state_dict": own})  # its own weights pass
