"""Every supported model family through the real CLI as a user runs it: a local model folder
(tiny random-weight stand-in, `save_pretrained`), the model section of the shipped QLoRA config
(4-bit where bitsandbytes runs on this CPU, LoRA, gradient checkpointing, 8-bit paged AdamW),
`fit` for 2 steps, `test` on the checkpoint, then the exported adapter loaded with plain
`peft.PeftModel.from_pretrained` outside the project must give the trained policy's logits."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from anatomy_lightning.models.loading import check_quantization_supported
from tests.support.cli_runs import CONFIGS, cpu_override, predictions, run_cli
from tests.support.standins import STANDIN_FAMILIES, standin_image_size

pytestmark = pytest.mark.slow
QLORA = CONFIGS / "qwen2_5_vl_3b_qlora.yaml"
TIMES: dict[str, float] = {}


def _quantization() -> str | None:
    try:
        check_quantization_supported("4bit", "cpu")
        return "4bit"
    except RuntimeError:
        return None


def test_4bit_runs_on_this_cpu() -> None:
    if _quantization() is None:
        pytest.skip("bitsandbytes cannot run 4-bit on this CPU: the family runs below use bf16-free LoRA instead")


@pytest.mark.parametrize("family", STANDIN_FAMILIES)
def test_family_fit_test_and_adapter_reload(family: str, standin, tmp_path: Path) -> None:
    folder = standin(family)
    quant = _quantization()
    if quant is None:
        warnings.warn(f"{family}: 4-bit is not available on this CPU, running LoRA without quantization")
    over = cpu_override(tmp_path, model=str(folder), image_size=standin_image_size(family),
                        model_extra={"quantization": quant})
    configs = [QLORA, CONFIGS / "sgg_vqa.yaml", over]
    start = time.perf_counter()
    run_cli("fit", configs, tmp_path, "--run_name=fam")
    TIMES[family] = (time.perf_counter() - start) / 2
    run_dir = tmp_path / "checkpoints" / "fam"
    ckpt, adapter = run_dir / "last.ckpt", run_dir / "adapter"
    assert ckpt.is_file() and (adapter / "adapter_config.json").is_file()

    preds = tmp_path / "preds.jsonl"
    test = run_cli("test", configs, tmp_path, "--run_name=fam", f"--ckpt_path={ckpt}",
                   f"--evaluation.predictions_file={preds}")
    assert len(predictions(preds)) == 4 and "overall" in test.stdout

    lora = yaml.safe_load(QLORA.read_text())["model"]["lora"]
    diff, moved = _adapter_reload_difference(folder, adapter, ckpt, quant, lora, family)
    print(f"{family}: fit {TIMES[family]:.1f} s/step (incl. start-up), adapter reload max |logit diff| {diff:.2e}")
    assert moved, "the adapter did not move in 2 steps: the reward had no spread?"
    assert diff < 1e-4


def _adapter_reload_difference(folder: Path, adapter: Path, ckpt: Path, quant: str | None, lora: dict,
                               family: str) -> tuple[float, bool]:
    """Max |logit| difference between the trained policy (our loader + the Lightning checkpoint)
    and base + adapter loaded with plain transformers/peft; and whether lora_B left zero."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from anatomy_lightning.models.loading import bnb_quantization_config as _quantization_config
    from anatomy_lightning.models.families import family_for_type
    from anatomy_lightning.module import GRPOModule

    module = GRPOModule(model=str(folder), quantization=quant, lora=lora, dtype="float32", beta=0.0)
    module.configure_model()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert state and not unexpected
    moved = any("lora_B" in k and v.abs().sum() > 0 for k, v in state.items())

    kwargs = {"dtype": torch.float32}
    if quant:
        import json

        model_type = json.loads((folder / "config.json").read_text())["model_type"]
        kwargs["quantization_config"] = _quantization_config(quant, False, family_for_type(model_type))
    base = AutoModelForImageTextToText.from_pretrained(folder, **kwargs)
    plain = PeftModel.from_pretrained(base, adapter).eval()
    if quant:  # the same 4-bit CPU kernel as training uses (bnb's packed eval kernel rounds differently in bf16)
        import bitsandbytes as bnb

        for m in plain.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Which organ is at the top? A. liver B. gut"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], return_tensors="pt")
    with torch.no_grad():
        ours = module.policy.eval()(**inputs).logits
        theirs = plain(**inputs).logits
    return float((ours - theirs).abs().max()), moved
