"""Honest splits: `test` never scores the validation questions (the curriculum promotes on them);
without data.test_file it refuses, or with `data.test_split: heldout` scores a share of train_file
that neither training nor validation sees; hold-outs are recorded in the checkpoint; `test` says
which split and which weights it scored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from anatomy_lightning.data.datamodule import AnatomyVQADataModule
from anatomy_lightning.data.schema import DataError
from anatomy_lightning.grpo.evaluation import EvaluationSettings
from anatomy_lightning.module import GRPOModule
from tests.support.cli_runs import REPO
from tests.support.tiny_vqa import MODEL_KWARGS, tiny_fit, write_questions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_questions(tmp_path_factory.mktemp("splits"), 20, images=(1,))


def _dm(path: Path, **kw) -> AnatomyVQADataModule:
    return AnatomyVQADataModule(train_file=str(path), **{"val_fraction": 0.2, "check_images": False, **kw})


def _uids(questions) -> list[str]:
    return [q.uid for q in questions]


def test_test_without_test_file_refuses_naming_the_setting(train_file: Path) -> None:
    dm = _dm(train_file)
    dm.setup("fit")  # training is fine
    with pytest.raises(DataError, match=r"data\.test_file is not set.*data\.test_split: heldout"):
        dm.setup("test")
    with pytest.raises(ValueError, match="data.test_split"):
        _dm(train_file, test_split="validation")


def test_heldout_split_is_disjoint_from_train_and_validation(train_file: Path) -> None:
    plain, held = _dm(train_file), _dm(train_file, test_split="heldout", test_fraction=0.25)
    plain.setup("fit")
    held.setup("test")
    train, val, test = (set(_uids(x)) for x in (held.train_questions, held.val_questions, held.test_questions))
    assert (len(train), len(val), len(test)) == (11, 4, 5)
    assert not (train & val or train & test or val & test) and len(train | val | test) == 20
    assert _uids(plain.val_questions) == _uids(held.val_questions)  # turning the hold-out on keeps validation
    assert "held-out split" in held.describe_test_split() and "(5 of 20 questions" in held.describe_test_split()


def test_checkpointed_split_wins_over_changed_settings(train_file: Path) -> None:
    first = _dm(train_file, test_split="heldout")
    first.setup("fit")
    state = first.state_dict()
    assert state["split"]["val"] == _uids(first.val_questions) and len(state["split"]["test"]) == 2
    later = _dm(train_file, test_split="heldout", seed=7, val_fraction=0.4)  # another seed and fraction
    later.setup("test")
    assert _uids(later.val_questions) != _uids(first.val_questions)
    later.load_state_dict(state)  # what Trainer does after setup when given --ckpt_path
    for what in ("train_questions", "val_questions", "test_questions"):
        assert _uids(getattr(later, what)) == _uids(getattr(first, what))
    resumed = _dm(train_file, seed=5)  # resuming fit without the setting: the hold-out stays out of training
    resumed.setup("fit")
    resumed.load_state_dict(state)
    assert _uids(resumed.train_questions) == _uids(first.train_questions) and not resumed.test_questions
    # a checkpoint trained without the hold-out has trained on those questions: refuse
    no_test = _dm(train_file)
    no_test.setup("fit")
    again = _dm(train_file, test_split="heldout")
    again.setup("test")
    with pytest.raises(DataError, match="trained without it"):
        again.load_state_dict(no_test.state_dict())


def test_test_banner_names_the_split_and_the_weights(standin, train_file: Path, tmp_path: Path, capsys) -> None:
    """fit with a held-out split, then `test` on the checkpoint with other split settings: the same
    held-out questions are scored, and the banner says so; without a checkpoint it is the base model."""
    model = str(standin("qwen2.5-vl"))
    trainer, module, dm = tiny_fit(model, train_file, tmp_path, lora={"r": 4, "alpha": 8, "dropout": 0.0},
                                   datamodule=_dm(train_file, test_split="heldout", batch_size=2))
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    held = _uids(dm.test_questions)
    capsys.readouterr()
    for ckpt_path in (str(ckpt), None):
        preds = tmp_path / f"preds_{ckpt_path is None}.jsonl"
        tester = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                           enable_model_summary=False, default_root_dir=str(tmp_path))
        fresh = GRPOModule(model=model, lora={"r": 4, "alpha": 8, "dropout": 0.0}, **MODEL_KWARGS)
        fresh.evaluation = EvaluationSettings(predictions_file=str(preds), max_new_tokens=4)
        tester.test(fresh, datamodule=_dm(train_file, test_split="heldout", seed=3), ckpt_path=ckpt_path)
        out = capsys.readouterr().out
        banner = next(line for line in out.splitlines() if line.startswith("test: scoring"))
        with capsys.disabled():
            print(f"\n{banner}")
        assert f"the held-out split of {train_file} (2 of 20 questions" in banner
        assert (f"checkpoint {ckpt}" if ckpt_path else "the base model") in banner
        rows = [json.loads(line) for line in preds.read_text().splitlines()]
        if ckpt_path:
            assert [r["uid"] for r in rows] == held  # the checkpoint's hold-out, not seed 3's
        assert all(r["images"] and all(os.path.isfile(p) for p in r["images"]) for r in rows)


@pytest.mark.slow
def test_cli_test_without_test_file_refuses(train_file: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False},
        "model": {"model": "tiny-qwen2.5-vl", "num_generations": 2},
        "data": {"train_file": str(train_file), "check_images": False},
    }))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "anatomy_lightning", "test", "--config", str(config)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    print(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 2 and "error: test: data.test_file is not set" in proc.stderr
    assert "Traceback" not in proc.stderr
