"""`export`: a trained checkpoint becomes a Hugging Face folder that loads without this project
(`AutoModelForImageTextToText.from_pretrained`) and gives the trained policy's logits: LoRA merged,
the adapter alone, and a full fine-tune. An export cannot destroy: it never replaces the base model,
the checkpoint or a folder it did not write, and a killed export leaves no folder that looks finished."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText, AutoProcessor

from anatomy_lightning.export import MARKER, export, write_atomically
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
            lora = None if kind.startswith("full") else LORA
            quant = "4bit" if kind == "qlora" else None
            # the vision-tower knobs change which weights train (full) or carry adapters (LoRA)
            freeze = {"full_frozen_vit": {"freeze_vit": True}, "lora_vit": {"freeze_vit": False}}.get(kind, {})
            data = write_questions(tmp / "data", 4, images=(1, 2), image_size=standin_image_size(family))
            L.seed_everything(0, verbose=False)  # sampled completions, so whether the step moves the weights, repeat
            trainer, module, _ = tiny_fit(model, data, tmp, lora=lora, quantization=quant, **freeze)
            ckpt = tmp / "last.ckpt"
            trainer.save_checkpoint(ckpt)
            config = tmp / "model.yaml"
            config.write_text(yaml.safe_dump({"model": {"model": model, "lora": lora, "dtype": "float32",
                                                        "quantization": quant, **freeze}}))
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
    ("full_frozen_vit", False, {"config.json", "model.safetensors"}),
    ("lora_vit", True, {"config.json", "model.safetensors"}),
])
def test_export_round_trip_gives_the_trained_logits(trained, tmp_path: Path, kind: str, merge: bool,
                                                    files: set[str], capsys) -> None:
    module, config, ckpt = trained(kind)
    out = tmp_path / "export"
    result = export([str(config)], str(ckpt), out, merge=merge)
    assert result.kind == ("full" if kind.startswith("full") else "merged" if merge else "adapter")
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


def _cli_export(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "anatomy_lightning", "export", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_export_command_line(trained, tmp_path: Path) -> None:
    """`python -m anatomy_lightning export ... --merge` as a user runs it, with the flags of the `fit` it follows."""
    _, config, ckpt = trained("lora")
    out = tmp_path / "merged"
    proc = _cli_export(tmp_path, "--config", str(config), "--ckpt_path", str(ckpt), "--out", str(out), "--merge",
                       "--model.dtype=float32", "--model.lora.r=4", "--trainer.max_steps=1", "--run_name=tiny")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA merged into the base" in proc.stdout and (out / "config.json").is_file() and (out / MARKER).is_file()
    assert "from the command line, over" not in proc.stderr  # the same values as the checkpoint: nothing to say
    missing = str(tmp_path / "missing.ckpt")
    bad = _cli_export(tmp_path, "--config", str(config), "--ckpt_path", missing, "--out", str(out))
    assert bad.returncode == 2 and "error: --ckpt_path" in bad.stderr and "Traceback" not in bad.stderr


def _contents(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_the_command_line_refuses_the_base_model_folder_in_one_line(trained, tmp_path: Path) -> None:
    module, config, ckpt = trained("lora")
    base = Path(module.hparams.model)
    before = _contents(base)
    proc = _cli_export(tmp_path, "--config", str(config), "--ckpt_path", str(ckpt), "--out", str(base), "--merge")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    said = proc.stderr.strip().splitlines()[-1]
    assert said.startswith(f"error: --out {base} holds the base model ({base})"), said
    assert _contents(base) == before and not (base / MARKER).exists()


def test_export_refuses_to_replace_what_it_did_not_write(trained, tmp_path: Path) -> None:
    _, config, ckpt = trained("lora")
    with pytest.raises(ValueError, match=r"holds the checkpoint being exported"):
        export([str(config)], str(ckpt), ckpt.parent)
    with pytest.raises(ValueError, match=r"is an existing file; an export is a folder"):
        export([str(config)], str(ckpt), config)
    with pytest.raises(ValueError, match=re.escape(f"{config} is a file, so no folder can be made below it")):
        export([str(config)], str(ckpt), config / "sub" / "out")
    with pytest.raises(ValueError, match=r"export: unrecognized arguments: --model.bogus=1"):
        export([str(config)], str(ckpt), tmp_path / "out", overrides=["--model.bogus=1"])
    foreign = tmp_path / "someone_elses_model"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds files this command did not write \(config.json\); .*--overwrite"):
        export([str(config)], str(ckpt), foreign)
    assert _contents(foreign) == {"config.json": hashlib.sha1(b"{}").hexdigest()}
    export([str(config)], str(ckpt), foreign, overwrite=True)  # the explicit override replaces it
    assert (foreign / MARKER).is_file() and (foreign / "adapter_config.json").is_file()
    assert not (foreign / "config.json").exists()
    export([str(config)], str(ckpt), foreign, merge=True)  # our own export: replaced without --overwrite
    assert (foreign / "config.json").is_file() and not (foreign / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["someone_elses_model"]  # no hidden folder left


_KILLED_WHILE_WRITING = """
import os, signal, sys
import transformers

transformers.ProcessorMixin.save_pretrained = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
from anatomy_lightning.export import main

main(sys.argv[1:])
"""


def test_a_killed_export_leaves_no_folder_that_looks_finished(trained, tmp_path: Path) -> None:
    """SIGKILL after the weights are written, before the processor: `--out` does not exist; the
    next export to it cleans up and finishes."""
    _, config, ckpt = trained("lora")
    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _KILLED_WHILE_WRITING, "--config", str(config), "--ckpt_path",
                           str(ckpt), "--out", str(out), "--merge"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not out.exists()
    (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.export-partial-")]
    assert (partial / "model.safetensors").is_file() and not (partial / MARKER).exists()
    export([str(config)], str(ckpt), out, merge=True)
    assert (out / MARKER).is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_writing_is_all_or_nothing(tmp_path: Path) -> None:
    """No model needed: a failed write keeps the previous export; one moved aside by a killed export
    is put back before the next write; nothing hidden stays behind."""
    target = tmp_path / "out"
    write_atomically(target, lambda folder: (folder / "weights").write_text("first"), {"n": 1})

    def fails(folder: Path) -> None:
        (folder / "weights").write_text("half")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="simulated"):
        write_atomically(target, fails, {"n": 2})
    assert (target / "weights").read_text() == "first" and os.listdir(tmp_path) == ["out"]
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)  # a process that has ended: what a killed export leaves behind
    os.rename(target, tmp_path / f".out.export-replaced-{pid}-0123abcd")
    (tmp_path / f".out.export-partial-{pid}-4567cdef").mkdir()
    with pytest.raises(OSError, match="simulated"):
        write_atomically(target, fails, {"n": 2})
    assert (target / "weights").read_text() == "first" and os.listdir(tmp_path) == ["out"]  # put back
    write_atomically(target, lambda folder: (folder / "weights").write_text("second"), {"n": 3})
    assert (target / "weights").read_text() == "second" and os.listdir(tmp_path) == ["out"]
    assert json.loads((target / MARKER).read_text()) == {"n": 3}
