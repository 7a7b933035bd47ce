"""The same command with the same seed and thread count trains the same weights, bit for bit.

Two `fit` runs of the shipped demo config (curriculum, same-step GDQA with its rewriters, dynamic
sampling off), each in its own process with a different PYTHONHASHSEED, so that nothing may depend
on set or dict order of strings, on wall-clock time or on which process ran first.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anatomy_lightning.models.tiny import ensure_tiny_checkpoint
from tests.support.cli_runs import CONFIGS, cpu_override, run_cli


@pytest.mark.slow
def test_two_fits_with_the_same_seed_give_identical_weights(tmp_path: Path) -> None:
    override = cpu_override(tmp_path, model=None, steps=3)
    weights = []
    for run, hash_seed in (("a", "1"), ("b", "2")):
        run_cli("fit", [CONFIGS / "demo.yaml", override], tmp_path, f"--run_name={run}",
                env={"PYTHONHASHSEED": hash_seed})
        ckpt = torch.load(tmp_path / "checkpoints" / run / "last.ckpt", map_location="cpu", weights_only=False)
        weights.append(ckpt["state_dict"])
    a, b = weights
    assert sorted(a) == sorted(b) and a
    base = load_file(str(Path(ensure_tiny_checkpoint("tiny-qwen2.5-vl")) / "model.safetensors"))
    moved = [k for k, v in a.items() if k.removeprefix("policy.") in base and not torch.equal(v, base[k.removeprefix("policy.")])]
    assert moved, "the runs did not train: nothing to compare"
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f"{len(changed)} of {len(a)} tensors differ, e.g. {changed[:3]}"
