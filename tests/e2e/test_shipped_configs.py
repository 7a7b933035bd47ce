"""Every file in `configs/` runs end to end through the real CLI (`fit` 2 steps, then `test` on the
checkpoint), with only the model, accelerator and data swapped for tiny CPU stand-ins (the
configs' own bf16-true precision runs on CPU too: swapping it once hid a crash on every GPU run),
so no shipped config can break silently again (a LoRA setting once crashed every CLI run while
every unit test passed). Model configs keep their own LoRA/QLoRA, optimizer, checkpointing and
callback sections; data configs are paired with a model config as the README shows and get a tiny
file in their own format in place of the dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from anatomy_lightning.data.synthetic import write_synthetic_split
from anatomy_lightning.models.loading import check_quantization_supported
from tests.support.cli_runs import CONFIGS, cpu_override, predictions, run_cli

pytestmark = pytest.mark.slow

ALL_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml"))
DATA_CONFIGS = [n for n in ALL_CONFIGS if "model" not in (yaml.safe_load((CONFIGS / n).read_text()) or {})]
MODEL_FOR_DATA = "qwen2_5_vl_3b_qlora.yaml"  # the README's pairing


def _quantization_note(config: str) -> None:
    quant = (yaml.safe_load((CONFIGS / config).read_text()).get("model") or {}).get("quantization")
    try:
        check_quantization_supported(quant, "cpu")
    except RuntimeError as err:
        pytest.skip(f"{config} asks for {quant}, which bitsandbytes cannot run on this CPU: {err}")


def _records_in_format(fmt: str, tmp: Path, split: str, n: int, seed: int) -> Path:
    """`n` synthetic questions (with images) written in a dataset's own format (the data config's)."""
    src = write_synthetic_split(tmp / "scenes", n, seed=seed, split=split, image_size=56, grid=1, kinds=("position",),
                                questions_per_scene=1, unique_scenes=False)
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    out = []
    for r in rows:
        letters = "ABCDEF"[: len(r["options"])]
        gold = r["answer"] if isinstance(r["answer"], int) else letters.index(str(r["answer"])[0])
        image = str((src.parent / (r["images"][0] if "images" in r else r["image"])).resolve())
        if fmt == "anatomy_r1":
            block = "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(r["options"]))
            out.append({"instruction": f"Question:\n{r['question']}\nAnatomy Options:\n{block}",
                        "solution": letters[gold], "answer": r["options"][gold], "images": image})
        else:  # omnimedvqa
            rec = {"question": r["question"], "gt_answer": r["options"][gold], "image_path": image,
                   "question_id": r.get("id", "")}
            rec.update({f"option_{letters[i]}": o for i, o in enumerate(r["options"])})
            out.append(rec)
    path = tmp / f"{fmt}_{split}.json"
    path.write_text(json.dumps(out))
    return path


@pytest.mark.parametrize("config", [n for n in ALL_CONFIGS if n not in DATA_CONFIGS])
def test_model_config_fit_then_test(config: str, tmp_path: Path) -> None:
    _quantization_note(config)
    cfg = yaml.safe_load((CONFIGS / config).read_text())
    model = None if cfg["model"]["model"].startswith("tiny-") else "tiny-qwen2.5-vl"
    # the config's own precision (bf16-true for the GPU configs: CPUs run it too)
    configs = [CONFIGS / config, cpu_override(tmp_path, model=model, float32=False)]
    if config != "demo.yaml":
        configs.insert(1, CONFIGS / "sgg_vqa.yaml")
    _fit_and_test(configs, tmp_path, lora=cfg["model"].get("lora") is not None)


@pytest.mark.parametrize("config", DATA_CONFIGS)
def test_data_config_fit_then_test(config: str, tmp_path: Path) -> None:
    _quantization_note(MODEL_FOR_DATA)
    text = (CONFIGS / config).read_text()
    fmt = "omnimedvqa" if "omnimedvqa" in config else "anatomy_r1"
    data = {
        "train_file": str(_records_in_format(fmt, tmp_path, "train", 10, 0)),
        "test_file": str(_records_in_format(fmt, tmp_path, "test", 4, 1)) if "test_file: data" in text else None,
        "image_root": str(tmp_path),
        "val_fraction": 0.3,
        "synthetic": None,
    }
    configs = [CONFIGS / MODEL_FOR_DATA, CONFIGS / config,
               cpu_override(tmp_path, model="tiny-qwen2.5-vl", data=data, float32=False)]
    _fit_and_test(configs, tmp_path, lora=True)


def _fit_and_test(configs: list[Path], tmp: Path, lora: bool) -> None:
    run_cli("fit", configs, tmp, "--run_name=e2e")
    ckpt = tmp / "checkpoints" / "e2e" / "last.ckpt"
    assert ckpt.is_file(), sorted(str(p) for p in tmp.rglob("*.ckpt"))
    assert (tmp / "checkpoints" / "e2e" / "adapter" / "adapter_config.json").is_file() == lora
    assert list((tmp / "outputs" / "tensorboard" / "e2e").glob("fit_*/events.out.tfevents.*"))
    preds = tmp / "preds.jsonl"
    test = run_cli("test", configs, tmp, "--run_name=e2e", f"--ckpt_path={ckpt}", f"--evaluation.predictions_file={preds}")
    rows = predictions(preds)
    assert rows and all({"prediction", "correct", "completion"} <= set(r) for r in rows)
    assert "overall" in test.stdout


def test_the_lora_command_that_used_to_crash(tmp_path: Path) -> None:
    """`fit --config configs/demo.yaml --model.lora '{"r":4,"alpha":8}'` (the issue's command), shrunk."""
    configs = [CONFIGS / "demo.yaml", cpu_override(tmp_path, model=None)]
    run_cli("fit", configs, tmp_path, "--run_name=e2e", "--model.lora", '{"r":4,"alpha":8}')
    adapter = json.loads((tmp_path / "checkpoints" / "e2e" / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 8)
