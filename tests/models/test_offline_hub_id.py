"""A hub id that is neither in the local Hugging Face cache nor reachable: one line at the CLI, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anatomy_lightning.models.loading import load_model_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
HUB_ID = "someorg/not-cached-model"


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE")}
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    return {**env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "PYTHONPATH": str(REPO)}


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], hf_home: Path) -> None:
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert HUB_ID in line and f"hf download {HUB_ID} --local-dir" in line and "--model.model=" in line, line
    assert str(hf_home / "hub") in line, line  # where the cache is


def test_fit_with_uncached_hub_id_offline_is_one_line(tmp_path: Path) -> None:
    env = _env(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "anatomy_lightning", "fit", "--config", str(CONFIGS / "demo.yaml"),
         f"--model.model={HUB_ID}", "--trainer.max_steps=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    _assert_one_line_error(proc, tmp_path / "hf_home")
    assert not (tmp_path / "checkpoints").exists()


def test_export_with_uncached_hub_id_offline_is_one_line(tmp_path: Path) -> None:
    env = _env(tmp_path)
    ckpt = tmp_path / "fake.ckpt"
    torch.save({"state_dict": {"policy.lm_head.weight": torch.zeros(1)}}, ckpt)
    override = tmp_path / "model.yaml"
    override.write_text(f"model:\n  model: {HUB_ID}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "anatomy_lightning", "export", "--config", str(CONFIGS / "demo.yaml"),
         "--config", str(override), f"--ckpt_path={ckpt}", f"--out={tmp_path / 'out'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    _assert_one_line_error(proc, tmp_path / "hf_home")


def test_config_load_failure_without_network_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without HF_HUB_OFFLINE the hub download fails with a cache miss: the same message, not transformers' OSError."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*args: object, **kwargs: object) -> None:
        try:
            raise LocalEntryNotFoundError("cannot find the requested files in the local cache")
        except LocalEntryNotFoundError as err:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from err

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", unreachable)
    with pytest.raises(FileNotFoundError, match="cannot be reached") as err:
        load_model_config(HUB_ID, HUB_ID)
    assert f"hf download {HUB_ID} --local-dir" in str(err.value)
