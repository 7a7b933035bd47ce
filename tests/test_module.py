"""`GRPOModule` as a user builds it: from Python and through the CLI, with the `evaluation:` section.

The training step itself runs end to end in tests/e2e and tests/grpo; here are the module's own
surfaces: settings checked the same way from Python as from the CLI, evaluation knobs that are not
hyperparameters (so a checkpoint never overrides them), and the family path chosen once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from anatomy_lightning.cli import SuggestingParser, main
from anatomy_lightning.grpo.evaluation import EvaluationSettings
from anatomy_lightning.module import GRPOModule
from anatomy_lightning.settings_check import SettingsError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_python_settings_are_range_checked_by_the_cli_rules() -> None:
    with pytest.raises(SettingsError, match=r"model\.num_generations = 1: .*model\.temperature = 0"):
        GRPOModule(num_generations=1, temperature=0)
    with pytest.raises(SettingsError, match=r"evaluation\.max_new_tokens = 0"):
        EvaluationSettings(max_new_tokens=0)
    module = GRPOModule()
    assert module.evaluation == EvaluationSettings()
    assert not {"predictions_file", "eval_max_new_tokens", "sample_every_n_steps"} & set(module.hparams)


def test_evaluation_section_reaches_the_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    preds = tmp_path / "p.jsonl"
    cli = main(["--config", str(DEMO), f"--evaluation.predictions_file={preds}", "--evaluation.max_new_tokens=7",
                "--evaluation.sample_every_n_steps=0"], run=False)
    assert cli.model.evaluation == EvaluationSettings(str(preds), 7, 0)
    assert "predictions_file" not in cli.model.hparams


@pytest.mark.parametrize(("old", "new"), [("predictions_file=x.jsonl", "evaluation.predictions_file"),
                                          ("eval_max_new_tokens=4", "evaluation.max_new_tokens"),
                                          ("sample_every_n_steps=0", "evaluation.sample_every_n_steps")])
def test_moved_model_keys_name_their_new_place(old: str, new: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(DEMO), f"--model.{old}"])
    assert info.value.code == 2
    assert f"is {new} now" in capsys.readouterr().err


def test_an_older_checkpoints_evaluation_hyperparameters_are_dropped() -> None:
    """Checkpoints written before the `evaluation:` section hold these keys in their model hparams;
    Lightning parses them with the subcommand's parser (`parse_object`), which must not refuse them."""
    parser, sub = SuggestingParser(), SuggestingParser()
    sub.add_class_arguments(GRPOModule, "model")
    parser.add_subcommands().add_subcommand("test", sub)
    old = {"model": "tiny-qwen2.5-vl", "predictions_file": "old.jsonl", "eval_max_new_tokens": 4,
           "sample_every_n_steps": 3}
    cfg = parser.parse_object({"subcommand": "test", "test": {"model": old}})
    assert cfg.test.model.model == "tiny-qwen2.5-vl"
    assert not [k for k in ("predictions_file", "eval_max_new_tokens", "sample_every_n_steps") if k in cfg.test.model]


def test_the_family_path_is_chosen_once_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    module = GRPOModule(dtype="float32", num_generations=2, max_new_tokens=2, beta=0.0)
    with caplog.at_level("INFO", logger="anatomy_lightning"):
        module.configure_model()
    assert module.rollouts.path == "fast" and module.rollouts.family is module.family
    assert "(fast path)" in caplog.text
    assert module.rollouts.vision_frozen() is False  # full fine-tuning: the vision tower trains
