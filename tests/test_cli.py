"""The user-facing commands: every shipped config parses, `fit` then `test` on the demo config
write TensorBoard events, a checkpoint, a predictions file and the per-anatomy table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from anatomy_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
MODEL_CONFIGS = ["demo.yaml", "qwen2_5_vl_3b_qlora.yaml", "qwen2_5_vl_7b_qlora.yaml"]
DATA_CONFIGS = ["sgg_vqa.yaml", "omnimedvqa.yaml"]


def _print_config(capsys: pytest.CaptureFixture[str], *configs: str, extra: tuple[str, ...] = ()) -> dict:
    args = ["fit"] + [a for c in configs for a in ("--config", str(CONFIGS / c))] + list(extra) + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("model_cfg", MODEL_CONFIGS)
def test_every_model_config_parses_against_the_real_signatures(model_cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    configs = [model_cfg] if model_cfg == "demo.yaml" else [model_cfg, "sgg_vqa.yaml"]
    cfg = _print_config(capsys, *configs)
    run = cfg["run_name"]
    assert cfg["trainer"]["default_root_dir"] == f"outputs/{run}"  # interpolation resolved
    assert cfg["model"]["num_generations"] >= 2


@pytest.mark.parametrize("data_cfg", DATA_CONFIGS)
def test_data_configs_combine_with_a_model_config(data_cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _print_config(capsys, "qwen2_5_vl_3b_qlora.yaml", data_cfg)
    assert cfg["data"]["train_file"] and cfg["model"]["quantization"] == "4bit"


def test_run_name_from_the_command_line_renames_every_output_folder(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _print_config(capsys, "demo.yaml", extra=("--run_name=trial7",))
    assert cfg["trainer"]["default_root_dir"] == "outputs/trial7"
    assert cfg["trainer"]["logger"]["init_args"]["name"] == "trial7"
    assert cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] == "checkpoints/trial7"


def test_unknown_config_key_suggests_the_nearest_valid_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_generation: 4\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(bad)])
    assert exit_info.value.code == 2
    assert "did you mean model.num_generations" in capsys.readouterr().err


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


@pytest.mark.slow
def test_fit_then_test_on_the_demo_config(tmp_path: Path) -> None:
    """The issue's acceptance run, shrunk: fixed curriculum pacing so stages change within 6 steps."""
    override = tmp_path / "small.yaml"
    override.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "max_steps": 6,
                    "val_check_interval": 3,
                    "enable_progress_bar": False,
                    "callbacks": [  # a list in a later config replaces the earlier one
                        {
                            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                            "init_args": {"dirpath": "checkpoints/${run_name}", "save_last": True,
                                          "every_n_train_steps": 3},
                        },
                    ],
                },
                # sections merge key by key: the demo's other curriculum/augmentation settings stay
                "curriculum": {"pacing": "fixed", "fixed_steps": 2},
                "augmentation": {"encoder": "jaccard"},
                "model": {"num_generations": 2, "max_new_tokens": 6},
                "data": {
                    "synthetic": {"n_train": 48, "n_val": 8, "n_test": 12},
                    "batch_size": 4,
                    "eval_batch_size": 12,
                },
            }
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "anatomy_lightning"]
    common = ["--config", str(CONFIGS / "demo.yaml"), "--config", str(override), "--run_name=clitest"]
    fit = subprocess.run(base + ["fit", *common], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]

    ckpt = tmp_path / "checkpoints" / "clitest" / "last.ckpt"
    assert ckpt.is_file()
    [log_dir] = sorted((tmp_path / "outputs" / "tensorboard" / "clitest").glob("fit_*"))
    assert log_dir.name == "fit_0"  # the run folder says what it holds
    from tests.callbacks.test_dashboard import written_layout

    assert written_layout(log_dir) is not None  # TensorBoard's custom-scalars page opens on the method
    scalars = _scalars(log_dir)
    for tag in ("train/reward", "train/reward_std", "train/invalid_gradient_ratio", "train/loss", "train/lr",
                "train/completion_length/mean", "train/truncated_share", "curriculum/stage",
                "curriculum/batch_similarity", "val/acc"):
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    assert len(scalars["train/reward"]) == 6
    stage = dict(scalars["curriculum/stage"])
    sims = dict(scalars["curriculum/batch_similarity"])
    first = [sims[s] for s in sims if stage.get(s) == 0]
    last = [sims[s] for s in sims if stage.get(s) == max(stage.values())]
    assert max(stage.values()) >= 2 and sum(first) / len(first) < sum(last) / len(last)

    preds = tmp_path / "preds.jsonl"
    test = subprocess.run(
        base + ["test", *common, f"--ckpt_path={ckpt}", f"--evaluation.predictions_file={preds}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert test.returncode == 0, test.stderr[-3000:]
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 12
    assert {"id", "question", "options", "gold", "prediction", "correct", "completion", "anatomy", "stage"} <= set(rows[0])
    assert "per anatomy (gold option):" in test.stdout and "per difficulty stage" in test.stdout
    runs = sorted(p.name for p in (tmp_path / "outputs" / "tensorboard" / "clitest").iterdir())
    assert runs == ["fit_0", "test_0"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [([], None), (["--run_name=trial7"], "trial7"), (["--trainer.max_steps=3", "--run_name", "b"], "b")],
)
def test_demo_follows_the_run_name_of_the_command_line(extra: list[str], expected: str | None) -> None:
    """The demo's own folders (summary, predictions, the checkpoint it tests) follow `--run_name`,
    as the CLI's do; otherwise `test` after `fit` would load another run's last.ckpt."""
    from anatomy_lightning.demo import _run_name

    assert _run_name(extra) == expected
