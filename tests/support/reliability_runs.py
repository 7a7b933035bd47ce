"""Helpers for tests that run `python -m anatomy_lightning fit --config configs/demo.yaml` in a subprocess.

Every run happens with cwd = a tmp folder: the demo config's relative output folders
(`checkpoints/demo`, `outputs/...`, the synthetic data) then land there. The overrides shrink the
demo to seconds per step: tiny synthetic set, G = 2, 4 new tokens, validation every few steps that
always promotes (so curriculum decisions happen), checkpoints every 2 steps, and the test-only
`StateDump` callback that records every rank's state after every step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"
G = 2


def write_override(
    folder: Path, *, max_steps: int, val_every: int, ckpt_every: int = 2, n_train: int = 24,
    extra_callbacks: tuple[dict[str, Any], ...] = (),
) -> Path:
    """A second --config for demo.yaml (a list in a later config replaces the earlier list)."""
    override = {
        "trainer": {
            "max_steps": max_steps,
            "val_check_interval": val_every,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "anatomy_lightning.checkpointing.ResumableCheckpoint",
                    "init_args": {
                        "dirpath": "checkpoints/demo",
                        "filename": "{step}",
                        "save_last": True,
                        "every_n_train_steps": ckpt_every,
                        "save_top_k": -1,
                    },
                },
                {"class_path": "tests.support.state_dump.StateDump"},
                *extra_callbacks,
            ],
        },
        # validation pacing, so every validation promotes (the demo's signal pacing needs a full window)
        "curriculum": {"promote_at": 0.0, "max_steps_per_stage": 60, "pacing": "adaptive"},
        # the queue (next_batches): its rewrites, deferred questions and queue state must cross a resume;
        # same-step rewrites are drawn from (seed, step, round, uid) and hold no state of their own
        "augmentation": {"num_rewrites": 2, "max_fraction": 0.25, "seed": 0, "encoder": "jaccard",
                         "when": "next_batches"},
        "model": {"num_generations": G, "max_new_tokens": 4},
        "data": {
            "synthetic": {"n_train": n_train, "n_val": 8, "n_test": 8},
            "batch_size": 4,
            "eval_batch_size": 8,
        },
    }
    path = folder / "override.yaml"
    path.write_text(yaml.safe_dump(override, sort_keys=False))
    return path


def fit_command(override: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "anatomy_lightning", "fit", "--config", str(DEMO), "--config", str(override), *extra]


def run_env(dump_dir: Path, cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        STATE_DUMP_DIR=str(dump_dir),
        ANATOMY_LIGHTNING_CACHE=str(cache_dir),  # embedding cache shared by the runs of one test
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def read_dump(dump_dir: Path, rank: int = 0, run_dir: Path | None = None) -> list[dict[str, Any]]:
    """The rows `StateDump` wrote; `run_dir` (the run's cwd) is replaced by "<run>" in every string,
    so that two runs in different folders compare equal (question metadata holds data file paths)."""
    path = dump_dir / f"rank{rank}.jsonl"
    rows = []
    text = path.read_text()
    if run_dir is not None:
        text = text.replace(json.dumps(str(run_dir))[1:-1], "<run>")
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed run may be cut short
            break
    return rows


def without_run_dir(obj: Any, run_dir: Path) -> Any:
    """`obj` (JSON-able) with the run folder replaced by "<run>" in every string."""
    return json.loads(json.dumps(obj, default=str).replace(json.dumps(str(run_dir))[1:-1], "<run>"))


def check(result: subprocess.CompletedProcess, log: Path) -> None:
    if result.returncode != 0:
        tail = log.read_text()[-4000:] if log.exists() else ""
        raise AssertionError(f"{' '.join(map(str, result.args))} exited {result.returncode}:\n{tail}")
