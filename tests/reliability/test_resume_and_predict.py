"""Issue #24: a resume that changes the optimisation settings applies them and says so (or refuses a
different optimizer), and `predict` answers unlabelled questions (the other files still need answers)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from anatomy_lightning.cli import main
from anatomy_lightning.data.datamodule import AnatomyVQADataModule
from anatomy_lightning.data.loader import BadRecords, load_questions
from anatomy_lightning.grpo.evaluation import evaluation_rows
from anatomy_lightning.module import GRPOModule
from anatomy_lightning.optimization import apply_resumed_settings, configure_optimization
from tests.support.tiny_vqa import MODEL_KWARGS, tiny_fit, write_questions

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FITTING = SimpleNamespace(state=SimpleNamespace(fn="fit"), max_steps=10)
SETTINGS = {"optimizer": "adamw", "learning_rate": 1e-5, "weight_decay": 0.0, "lr_schedule": "constant",
            "warmup_steps": 0}


def _checkpoint(steps: int = 3, **saved: object) -> dict:
    """What Lightning saves after `steps` optimiser steps under `saved` settings (our LambdaLR)."""
    hp = {**SETTINGS, **saved}
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = configure_optimization(params, **hp, max_steps=10)
    sched = opt["lr_scheduler"]["scheduler"]
    for _ in range(steps):
        params[0].grad = torch.ones(2)
        opt["optimizer"].step()
        sched.step()
    return {"hyper_parameters": hp, "optimizer_states": [opt["optimizer"].state_dict()],
            "lr_schedulers": [sched.state_dict()]}


def _resumed(ckpt: dict, **now: object) -> torch.optim.Optimizer:
    """Apply `now`, then load the checkpoint into a fresh optimiser and schedule built from `now`, as
    Lightning does after `on_load_checkpoint`."""
    hp = {**SETTINGS, **now}
    apply_resumed_settings(ckpt, hp, FITTING)
    built = configure_optimization([torch.nn.Parameter(torch.zeros(2))], **hp, max_steps=10)
    built["optimizer"].load_state_dict(ckpt["optimizer_states"][0])
    built["lr_scheduler"]["scheduler"].load_state_dict(ckpt["lr_schedulers"][0])
    return built


def test_changed_learning_rate_is_applied_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="anatomy_lightning.optimization"):
        built = _resumed(_checkpoint(), learning_rate=5e-6, weight_decay=0.1)
    opt, sched = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-6) and opt.param_groups[0]["weight_decay"] == 0.1
    assert opt.state[opt.param_groups[0]["params"][0]]["step"] == 3  # the moments are kept
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-6)  # the schedule continues from the new base
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resume:")]
    assert "model.learning_rate 1e-05 -> 5e-06" in line and "model.weight_decay 0 -> 0.1" in line
    assert "optimizer state is kept" in line


def test_changed_schedule_and_warmup_apply_at_the_resumed_step() -> None:
    built = _resumed(_checkpoint(), lr_schedule="linear", warmup_steps=1)
    # step 3 of a linear decay to 0 at step 10 after 1 warmup step: 1 - (3 - 1) / 9
    assert built["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-5 * (1 - 2 / 9))


def test_same_settings_change_nothing_and_say_nothing(caplog: pytest.LogCaptureFixture) -> None:
    ckpt = _checkpoint(lr_schedule="cosine", warmup_steps=2)
    before = json.dumps(ckpt["optimizer_states"][0]["param_groups"])
    with caplog.at_level(logging.INFO, logger="anatomy_lightning.optimization"):
        apply_resumed_settings(ckpt, {**SETTINGS, "lr_schedule": "cosine", "warmup_steps": 2}, FITTING)
    assert json.dumps(ckpt["optimizer_states"][0]["param_groups"]) == before and not caplog.records


def test_another_optimizer_is_refused_naming_both() -> None:
    with pytest.raises(ValueError, match="model.optimizer is adamw_8bit but the checkpoint's optimizer state is adamw"):
        apply_resumed_settings(_checkpoint(), {**SETTINGS, "optimizer": "adamw_8bit"}, FITTING)
    test_run = SimpleNamespace(state=SimpleNamespace(fn="test"), max_steps=10)  # no optimiser is restored there
    apply_resumed_settings(_checkpoint(), {**SETTINGS, "optimizer": "adamw_8bit"}, test_run)


def test_resume_through_lightning_uses_the_new_rate(standin, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The real hook order: `on_load_checkpoint` edits the state that Lightning then loads."""
    model = str(standin("qwen2.5-vl"))
    train = write_questions(tmp_path / "data", 4, images=(1,))
    trainer, _, _ = tiny_fit(model, train, tmp_path, learning_rate=1e-3)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    # the real CLI: Lightning fills model.* from a checkpoint file's hyperparameters; a flag still wins
    args = ["fit", f"--model.model={model}", f"--data.train_file={train}", "--data.val_fraction=0",
            "--data.batch_size=2", f"--ckpt_path={ckpt}", "--model.learning_rate=0.002", "--trainer.accelerator=cpu",
            "--trainer.devices=1", "--trainer.max_steps=2", "--trainer.logger=false", "--trainer.limit_val_batches=0",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}"]
    with caplog.at_level(logging.INFO, logger="anatomy_lightning.optimization"):
        cli = main(args)
    assert cli.model.hparams.learning_rate == 2e-3 and cli.model.hparams.num_generations == 2  # the rest: ckpt's
    assert cli.model.optimizers().param_groups[0]["lr"] == pytest.approx(2e-3)  # constant schedule
    assert cli.trainer.global_step == 2  # resumed at step 1, not started over
    assert any("resume: model.learning_rate 0.001 -> 0.002" in r.getMessage() for r in caplog.records)


def _mixed_file(folder: Path) -> Path:
    """Four questions, the last two without an answer."""
    path = write_questions(folder, 4, images=(1,), name="new.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows[2:]:
        del row["answer"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_answers_are_optional_for_the_predict_file_only(tmp_path: Path) -> None:
    path = _mixed_file(tmp_path)
    with pytest.raises(BadRecords, match="is missing; give the answer letter"):
        load_questions(path)  # training, validation and test files: unchanged
    questions = load_questions(path, answer_optional=True).questions
    assert [q.answer_index for q in questions] == [0, 1, None, None]
    rows = evaluation_rows(questions, ["<answer>A</answer>"] * 4)
    assert [(r["gold"], r["prediction"], r["correct"]) for r in rows] == [
        ("A", "A", True), ("B", "A", False), (None, "A", None), (None, "A", None)]


def test_predict_writes_every_unlabelled_question(standin, tmp_path: Path) -> None:
    path = _mixed_file(tmp_path)
    module = GRPOModule(model=str(standin("qwen2.5-vl")), **MODEL_KWARGS)
    module.evaluation.predictions_file = str(tmp_path / "preds.jsonl")
    labelled = write_questions(tmp_path, 2, images=(1,), name="test.jsonl")  # still needs its answers
    dm = AnatomyVQADataModule(test_file=str(labelled), predict_file=str(path), eval_batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.predict(module, datamodule=dm)
    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q0", "q1", "q2", "q3"]
    assert [r["gold"] for r in rows] == ["A", "B", None, None]
    assert rows[2]["correct"] is None and rows[2]["stage"] is None and "completion" in rows[2]
