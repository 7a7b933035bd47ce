"""The vision-side knobs as a user sets them (issue 23, ms-swift's names): a full fine-tuning step with
the tower frozen and the projector on its own learning rate, and the one-line refusals (exit 2, before
any data or model work) of combinations where a set learning rate would train nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anatomy_lightning.cli import main
from tests.test_training_knobs import DEMO, _exit_message, _tiny_fit_setup

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_frozen_tower_with_a_projector_lr_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    start, override = _tiny_fit_setup(tmp_path, monkeypatch)
    cli = main(["fit", "--config", str(DEMO), "--config", str(override), "--model.freeze_vit=true",
                "--model.freeze_aligner=false", "--model.aligner_lr=0.002", "--model.warmup_steps=0",
                "--data.batch_size=2"])
    module = cli.model
    assert cli.trainer.global_step == 1
    moved: dict[str, list[bool]] = {"language_model": [], "vision_tower": [], "projector": []}
    for name, param in module.policy.named_parameters():
        moved[module.family.part_of(name)].append(not torch.equal(param.detach(), start[name]))
    assert moved["vision_tower"] and not any(moved["vision_tower"])  # the tower kept every weight
    assert any(moved["projector"]) and any(moved["language_model"])
    groups = cli.trainer.optimizers[0].param_groups
    assert [(g["name"], g["lr"]) for g in groups] == [("language_model", 5e-4), ("projector", 0.002)]
    assert not module.rollouts.vision_frozen()  # the merger trains: image features are recomputed with grad


@pytest.mark.parametrize("flags", [
    ["--model.freeze_vit=true", "--model.vit_lr=1e-6"],
    ["--model.lora=true", "--model.aligner_lr=1e-6"],  # LoRA keeps adapters off the projector by default
    ["--model.vit_lr=-1"],
    ["--model.freeze_llm=true", "--model.freeze_vit=true", "--model.freeze_aligner=true"],
])
def test_combinations_that_train_nothing_exit_2_in_one_line(flags: list[str],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    err = _exit_message(capsys, *flags)
    lines = [line for line in err.splitlines() if line.strip()]
    key = next(f for f in flags if "_lr" in f or "freeze_llm" in f).split("=")[0].removeprefix("--")
    assert len(lines) == 1 and key in lines[0], err
