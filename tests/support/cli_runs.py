"""Run the real CLI (`python -m anatomy_lightning ...`) in a subprocess, as a user does, on tiny
CPU stand-ins: the shipped config files with only the model, accelerator, precision and data swapped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def cpu_override(tmp: Path, *, model: str | None, image_size: int = 56, steps: int = 2, data: dict[str, Any] | None = None,
                 model_extra: dict[str, Any] | None = None, name: str = "cpu.yaml", float32: bool = True) -> Path:
    """A config layered over a shipped one: CPU, 2 steps, a few tiny synthetic questions, a reward
    with spread inside every group (so the adapter really moves), the model optionally swapped;
    float32 (exact comparisons) unless `float32=False` keeps the config's own precision and dtype."""
    model_section: dict[str, Any] = {
        "num_generations": 2, "max_new_tokens": 6, "max_pixels": None,
        "rewards": {"tests.support.cli_runs:length_reward": 1.0, "accuracy": 1.0},
    }
    if model is not None:
        model_section["model"] = model
    model_section.update(model_extra or {})
    data_section = data if data is not None else {
        "train_file": None, "val_file": None, "test_file": None, "image_root": None,
        "synthetic": {"n_train": 8, "n_val": 4, "n_test": 4, "image_size": image_size, "grid": 1,
                      "kinds": ["position"], "questions_per_scene": 1, "unique_scenes": False,
                      "out_dir": str(tmp / "synthetic")},
    }
    data_section = {"batch_size": 2, "eval_batch_size": 4, "max_val_questions": 4,
                    **data_section}
    trainer = {"accelerator": "cpu", "devices": 1, "max_steps": steps, "val_check_interval": steps,
               "enable_progress_bar": False}
    if float32:
        trainer["precision"], model_section["dtype"] = "32-true", "float32"
    cfg = {
        "trainer": trainer,
        "model": model_section,
        "evaluation": {"sample_every_n_steps": 1},
        "data": data_section,
    }
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def length_reward(completions: list[str], questions: list, **kwargs: Any) -> list[float]:
    """Spread inside every group, whatever a random-weight policy writes: every step has a gradient."""
    return [float(len(c) % 5) for c in completions]


def run_cli(subcommand: str, configs: list[Path], cwd: Path, *extra: str, timeout: int = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    args = [sys.executable, "-m", "anatomy_lightning", subcommand]
    for c in configs:
        args += ["--config", str(c)]
    proc = subprocess.run(args + list(extra), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{subcommand} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def predictions(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def half_signal_reward(completions: list[str], questions: list, **kwargs: Any) -> list[float]:
    """Spread inside the groups of about half the questions (by uid) and none in the others: dynamic
    sampling has groups to replace, and the step still has a gradient."""
    import zlib

    return [float(len(c) % 5) if zlib.crc32(q.uid.encode()) % 2 else 0.0 for c, q in zip(completions, questions)]
