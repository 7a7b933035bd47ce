"""Keeping the best checkpoints by a logged metric (issue 23): `ResumableCheckpoint` with `monitor`,
`mode` and `save_top_k`, as a user sets it in `trainer.callbacks`, saves after each validation and
keeps the k best; a run stopped by SIGTERM and resumed keeps the same files, scores and weights as
an uninterrupted one.

The shipped configs' comment shows `monitor: val/acc`; here the tiny random policy's validation
accuracy is constant, so the test watches `train/loss` (min), which moves every step: the same code path.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml

from anatomy_lightning.cli import main

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"
STEPS, TOP_K = 5, 2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _override(folder: Path, *extra_callbacks: dict) -> Path:
    cfg = {
        "trainer": {
            "max_steps": STEPS, "val_check_interval": 1, "enable_progress_bar": False, "logger": False,
            "callbacks": [
                {"class_path": "anatomy_lightning.checkpointing.ResumableCheckpoint",
                 "init_args": {"dirpath": str(folder / "ckpts"), "filename": "{step}", "save_last": True,
                               "every_n_train_steps": 1, "monitor": "train/loss", "mode": "min",
                               "save_top_k": TOP_K}},
                *extra_callbacks,
            ],
        },
        "curriculum": {"enabled": False},
        "augmentation": {"enabled": False, "encoder": "jaccard"},
        "model": {"num_generations": 2, "max_new_tokens": 6, "rewards": {"tests.support.cli_runs:length_reward": 1.0}},
        "evaluation": {"sample_every_n_steps": 0},
        "data": {"batch_size": 2, "eval_batch_size": 2, "max_val_questions": 2,
                 "synthetic": {"n_train": 12, "n_val": 2, "n_test": 2, "out_dir": str(folder / "synthetic")}},
    }
    path = folder / "override.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(override: Path, *flags: str) -> dict[str, torch.Tensor]:
    cli = main(["fit", "--config", str(DEMO), "--config", str(override), *flags])
    assert cli.trainer.global_step == STEPS
    return {n: p.detach().clone() for n, p in cli.model.policy.named_parameters()}


def _kept(folder: Path) -> tuple[list[str], dict[str, float]]:
    """The checkpoint files on disk, and last.ckpt's top-k table (file name -> score)."""
    state = torch.load(folder / "ckpts" / "last.ckpt", weights_only=True, map_location="cpu")
    table = next(v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint"))
    return sorted(os.listdir(folder / "ckpts")), {Path(p).name: float(s) for p, s in table["best_k_models"].items()}


def test_top_k_by_a_metric_survives_a_preemption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    full, run = tmp_path / "full", tmp_path / "run"
    for folder in (full, run):
        folder.mkdir()
    monkeypatch.chdir(full)
    reference = _fit(_override(full))
    files, table = _kept(full)
    assert len(table) == TOP_K and set(files) == {*table, "last.ckpt"}

    monkeypatch.chdir(run)
    with pytest.raises(SystemExit) as stopped:
        _fit(_override(run, {"class_path": "tests.support.state_dump.SignalAt", "init_args": {"batch": 2}}))
    assert stopped.value.code == 128 + signal.SIGTERM
    resumed = _fit(_override(run), "--ckpt_path=last")

    assert _kept(run) == (files, table)
    assert all(torch.equal(reference[n], resumed[n]) for n in reference)

