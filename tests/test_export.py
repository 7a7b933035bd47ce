"""`export`: a trained checkpoint becomes a Hugging Face folder that loads without this project
(`AutoModelForImageTextToText.from_pretrained`) and gives the trained policy's logits: LoRA merged,
the adapter alone, and a full fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText, AutoProcessor

from anatomy_lightning.export import export
from anatomy_lightning.models.loading import check_quantization_supported
from tests.support.cli_runs import REPO
from tests.support.standins import standin_image_size
from tests.support.tiny_vqa import tiny_fit, write_questions

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
TOL = 1e-5


@pytest.fixture(scope="module")
def trained(standin, tmp_path_factory: pytest.TempPathFactory):
    """kind ("lora" | "qlora" | "full" | "gemma3": LoRA on a generic-path family) -> (trained module, config file, checkpoint), each fitted once."""
    cache: dict[str, tuple] = {}

    def get(kind: str):
        if kind not in cache:
            tmp = tmp_path_factory.mktemp(f"export_{kind}")
            family = "gemma3" if kind == "gemma3" else "qwen2.5-vl"
            model = str(standin(family))
            lora = None if kind == "full" else LORA
            quant = "4bit" if kind == "qlora" else None
            data = write_questions(tmp / "data", 4, images=(1, 2), image_size=standin_image_size(family))
            trainer, module, _ = tiny_fit(model, data, tmp, lora=lora, quantization=quant)
            ckpt = tmp / "last.ckpt"
            trainer.save_checkpoint(ckpt)
            config = tmp / "model.yaml"
            config.write_text(yaml.safe_dump({"model": {"model": model, "lora": lora, "dtype": "float32",
                                                        "quantization": quant}}))
            cache[kind] = (module, config, ckpt)
        return cache[kind]

    return get


def _max_logit_diff(module, folder: Path) -> float:
    exported = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == type(module.processor).__name__
    dm_questions = module.trainer.datamodule.train_questions[:2]  # one and two images
    inputs = module.encode(dm_questions)
    module.policy.eval()
    with torch.no_grad():
        want = module.policy(**inputs).logits
        got = exported(**inputs).logits
    return float((want - got).abs().max())


@pytest.mark.parametrize("kind, merge, files", [
    ("lora", True, {"config.json", "model.safetensors"}),
    ("lora", False, {"adapter_config.json", "adapter_model.safetensors"}),
    ("full", False, {"config.json", "model.safetensors"}),
    ("gemma3", True, {"config.json", "model.safetensors"}),
])
def test_export_round_trip_gives_the_trained_logits(trained, tmp_path: Path, kind: str, merge: bool,
                                                    files: set[str], capsys) -> None:
    module, config, ckpt = trained(kind)
    out = tmp_path / "export"
    result = export([str(config)], str(ckpt), out, merge=merge)
    assert result.kind == ("full" if kind == "full" else "merged" if merge else "adapter")
    written = {p.name for p in out.iterdir()}
    assert files <= written and written & {"preprocessor_config.json", "processor_config.json"}, written
    if merge:
        assert not any("lora" in k for k in _safetensors_keys(out / "model.safetensors"))
    diff = _max_logit_diff(module, out)
    with capsys.disabled():
        print(f"\nexport {kind} -> {result.kind}: max abs logit diff vs trained policy {diff:.2e}")
    assert diff < TOL
    # the export is not the base model: training moved the weights the export carries
    base = AutoModelForImageTextToText.from_pretrained(module.hparams.model, dtype=torch.float32).eval()
    with torch.no_grad():
        inputs = module.encode(module.trainer.datamodule.train_questions[:1])
        assert float((base(**inputs).logits - module.policy(**inputs).logits).abs().max()) > 1e-3


def test_qlora_merges_into_the_unquantised_base(trained, tmp_path: Path, capsys) -> None:
    """A 4-bit QLoRA checkpoint: the base is reloaded from its original (unquantised) weights in the
    adapter's dtype and the adapter merged there; no bitsandbytes weights in the export."""
    try:
        check_quantization_supported("4bit")
    except RuntimeError as err:
        pytest.skip(f"bitsandbytes cannot run 4-bit here: {err}")
    module, config, ckpt = trained("qlora")
    merged = export([str(config)], str(ckpt), tmp_path / "merged", merge=True)
    adapter = export([str(config)], str(ckpt), tmp_path / "adapter")
    assert merged.dtype == "float32"  # prepare_model_for_kbit_training keeps the adapter in float32
    assert "quantization_config" not in json.loads((merged.out / "config.json").read_text())
    inputs = module.encode(module.trainer.datamodule.train_questions[:2])
    with torch.no_grad():
        got = AutoModelForImageTextToText.from_pretrained(merged.out).eval()(**inputs).logits
        want = AutoModelForImageTextToText.from_pretrained(adapter.out).eval()(**inputs).logits  # base + peft
        policy = module.policy.eval()(**inputs).logits
        deq = export([str(config)], str(ckpt), tmp_path / "dequantised", merge=True, dequantize=True)
        closer = AutoModelForImageTextToText.from_pretrained(deq.out).eval()(**inputs).logits
    diff, quant_gap = float((got - want).abs().max()), float((got - policy.float()).abs().max())
    deq_gap = float((closer - policy.float()).abs().max())
    with capsys.disabled():
        print(f"\nexport qlora merged: max abs logit diff vs unquantised base + adapter {diff:.2e}; vs the 4-bit "
              f"policy {quant_gap:.2e} (nf4 rounding); --dequantize vs the 4-bit policy {deq_gap:.2e}")
    assert diff < TOL and torch.isfinite(got).all()
    assert deq_gap < quant_gap / 5  # merged into the weights it was trained against: the trained outputs


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_export_names_what_is_wrong(trained, tmp_path: Path) -> None:
    _, config, _ = trained("lora")
    with pytest.raises(FileNotFoundError, match="--ckpt_path"):
        export([str(config)], str(tmp_path / "nope.ckpt"), tmp_path / "out")


@pytest.mark.slow
def test_export_command_line(trained, tmp_path: Path) -> None:
    """`python -m anatomy_lightning export ... --merge` as a user runs it."""
    import os
    import subprocess
    import sys

    _, config, ckpt = trained("lora")
    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "anatomy_lightning", "export", "--config", str(config),
                           "--ckpt_path", str(ckpt), "--out", str(out), "--merge"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA merged into the base" in proc.stdout and (out / "config.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "anatomy_lightning", "export", "--config", str(config),
                          "--ckpt_path", str(tmp_path / "missing.ckpt"), "--out", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error: --ckpt_path" in bad.stderr and "Traceback" not in bad.stderr
