"""Every numeric setting is range-checked before any model loads, and all problems come in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from anatomy_lightning.cli import main
from anatomy_lightning.settings_check import SettingsError, check_settings, settings_problems

REPO = Path(__file__).resolve().parents[2]

BAD = {
    "model": {
        "temperature": 0.0, "beta": -0.1, "epsilon_low": 1.2, "epsilon_high": -0.1, "learning_rate": -1e-4,
        "max_new_tokens": 0, "num_generations": 1, "top_p": 0.0, "lora": {"r": 0, "dropout": 1.0},
    },
    "data": {
        "batch_size": 0, "eval_batch_size": 0, "val_fraction": 1.5, "num_stages": 0, "synthetic": {"num_options": 1},
    },
}


def test_every_bad_setting_is_named_with_its_value() -> None:
    problems = settings_problems(BAD["model"], BAD["data"])
    named = {p.split(" = ")[0]: p.split(" = ")[1].split(":")[0] for p in problems}
    assert named == {
        "model.temperature": "0.0", "model.beta": "-0.1", "model.epsilon_low": "1.2", "model.epsilon_high": "-0.1",
        "model.learning_rate": "-0.0001", "model.max_new_tokens": "0", "model.num_generations": "1",
        "model.top_p": "0.0", "model.lora.r": "0", "model.lora.dropout": "1.0", "data.batch_size": "0",
        "data.eval_batch_size": "0", "data.val_fraction": "1.5", "data.num_stages": "0",
        "data.synthetic.num_options": "1",
    }


def test_good_settings_and_unset_ones_pass() -> None:
    check_settings(
        {"temperature": 1.0, "beta": 0.0, "epsilon_low": 0.0, "learning_rate": 1e-5},
        {"batch_size": 1, "val_fraction": 0.0},
    )
    check_settings(None, None)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, "0.5"])
def test_non_numbers_and_non_finite_values_are_refused(value: object) -> None:
    with pytest.raises(SettingsError, match=r"model\.temperature = "):
        check_settings({"temperature": value}, {})


def test_min_new_tokens_above_max_new_tokens_is_refused() -> None:
    assert settings_problems({"min_new_tokens": 8, "max_new_tokens": 4}, {}) == [
        "model.min_new_tokens = 8: must be <= model.max_new_tokens (4)"
    ]


def test_the_cli_reports_all_problems_in_one_line_before_loading_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import anatomy_lightning.cli as cli_py

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model path was resolved before the settings were checked")

    monkeypatch.setattr(cli_py, "resolve_model_path", no_model)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  temperature: -1\n  beta: -1\n  epsilon_low: 1.2\n  learning_rate: -1e-4\n  max_new_tokens: 0\n"
        "data:\n  batch_size: 0\n  eval_batch_size: 0\n  val_fraction: 1.5\n"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--config", str(bad)])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: 8 setting(s) out of range")
    for part in (
        "model.temperature = -1", "model.beta = -1", "model.epsilon_low = 1.2", "model.learning_rate = -0.0001",
        "model.max_new_tokens = 0", "data.batch_size = 0", "data.eval_batch_size = 0", "data.val_fraction = 1.5",
    ):
        assert part in err[0]
    assert not (tmp_path / "outputs").exists()  # nothing was built or written


@pytest.mark.parametrize("given", [["--augmentation.dynamic_sampling=true"], "yaml"])
def test_the_retired_dynamic_sampling_key_is_refused_naming_requeue_originals(
    given: list[str] | str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import anatomy_lightning.cli as cli_py

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model path was resolved before the settings were checked")

    monkeypatch.setattr(cli_py, "resolve_model_path", no_model)
    monkeypatch.chdir(tmp_path)
    if given == "yaml":
        (tmp_path / "old.yaml").write_text("augmentation:\n  dynamic_sampling: true\n")
        given = ["--config", str(tmp_path / "old.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "demo.yaml"), *given])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == ["error: augmentation.dynamic_sampling was renamed: use augmentation.requeue_originals"]
    assert settings_problems(augmentation={"dynamic_sampling": None, "requeue_originals": True}) == []
