"""`--help` as a new user runs it: at once, grouped by what a researcher tunes first, and never stale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anatomy_lightning import cli_help

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "COLUMNS": cli_help.WIDTH}
    return subprocess.run([sys.executable, "-m", "anatomy_lightning", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_shipped_help_is_what_the_parser_prints_now() -> None:
    """Fails when an option, a default or a docstring changed: run `python -m anatomy_lightning.cli_help --write`."""
    shipped = json.loads(cli_help.HELP_FILE.read_text())
    fresh = cli_help.generate()
    stale = [sub for sub in cli_help.SUBCOMMANDS if shipped.get(sub) != fresh[sub]]
    assert not stale, f"stale help for {stale}: python -m anatomy_lightning.cli_help --write"


def test_subcommand_help_is_grouped_and_full_help_stays_reachable() -> None:
    short = _run("fit", "--help")
    assert short.returncode == 0 and short.stdout == json.loads(cli_help.HELP_FILE.read_text())["fit"]
    text = short.stdout
    order = [text.index(h) for h in ("\ngeneral:", "\nmodel:", "\ndata:", "\ncurriculum:", "\naugmentation:",
                                     "\nevaluation:", "\ntrainer (the most used")]
    assert order == sorted(order)
    for option in ("--model.num_generations", "--model.lora", "--data.similarity", "--curriculum.pacing",
                   "--augmentation.when", "--evaluation.predictions_file", "--trainer.max_steps"):
        assert option in text
    assert "--trainer.enable_checkpointing" not in text  # the long tail is in --help-all
    full = _run("fit", "--help-all")
    assert full.returncode == 0 and "--trainer.enable_checkpointing" in full.stdout
    assert len(full.stdout.splitlines()) > 2 * len(text.splitlines())


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_top_level_help_names_every_subcommand(flag: str) -> None:
    out = _run(flag)
    assert out.returncode == 0
    for sub in (*cli_help.SUBCOMMANDS, "export"):
        assert f"\n  {sub} " in out.stdout
