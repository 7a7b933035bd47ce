"""The model-family layer: typed LoRA settings however they arrive, per-family LoRA targets and
4-bit skips on the real module trees, pixel bounds in each processor's own terms, stop and vision
token ids from the model's own config, and a clear error for an unsupported architecture."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from anatomy_lightning.cli import AnatomyCLI, SuggestingParser
from anatomy_lightning.data.datamodule import AnatomyVQADataModule
from anatomy_lightning.models.families import FAMILIES, UnsupportedModelError, family_for_type, family_of
from anatomy_lightning.models.loading import LoraSettings, check_quantization_supported, load_policy
from anatomy_lightning.module import GRPOModule
from tests.support.standins import END_OF_TURN, STANDIN_FAMILIES

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo.yaml")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cli_lora(*args: str) -> LoraSettings | None:
    cli = AnatomyCLI(GRPOModule, AnatomyVQADataModule, run=False, parser_kwargs={"parser_mode": "omegaconf+"},
                     parser_class=SuggestingParser, args=["--config", DEMO, *args])
    assert cli.model.hparams.lora is None or isinstance(cli.model.hparams.lora, dict)  # plain data in checkpoints
    return LoraSettings.coerce(cli.model.hparams.lora)


@pytest.mark.parametrize(("args", "r", "alpha"), [
    (["--model.lora", '{"r": 4, "alpha": 8}'], 4, 8),  # the command that used to crash every LoRA run
    (["--model.lora.r=8"], 8, 32),
    (["--model.lora=true"], 16, 32),
    ([], None, None),
])
def test_lora_from_the_command_line_arrives_typed(args: list[str], r: int | None, alpha: int | None) -> None:
    lora = _cli_lora(*args)
    assert (lora.r, lora.alpha) == (r, alpha) if r else lora is None


def test_lora_from_yaml_and_python(tmp_path: Path) -> None:
    yml = tmp_path / "lora.yaml"
    yml.write_text("model:\n  lora:\n    r: 6\n    target_modules: [q_proj, v_proj]\n")
    assert _cli_lora("--config", str(yml)).target_modules == ["q_proj", "v_proj"]
    assert GRPOModule(lora=LoraSettings(r=3)).hparams.lora["r"] == 3
    assert GRPOModule(lora={"r": 5}).hparams.lora["r"] == 5
    with pytest.raises(ValueError, match=r"unknown keys \['rank'\]"):
        GRPOModule(lora={"rank": 5})


def test_every_registered_family_is_named_in_the_unsupported_error(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedModelError) as err:
        load_policy(str(folder))
    assert "'bert'" in str(err.value) and all(f.name in str(err.value) for f in FAMILIES)


@pytest.mark.parametrize("family", STANDIN_FAMILIES)
def test_family_description_matches_the_real_model(family: str, standin) -> None:
    folder = standin(family)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    fam = family_of(model)
    assert fam is family_for_type(AutoConfig.from_pretrained(folder).model_type)
    tok = processor.tokenizer
    # the end of the assistant turn comes from the model's own generation config
    assert tok.convert_tokens_to_ids(END_OF_TURN[family]) in fam.stop_token_ids(model, processor)
    image_id = fam.image_token_id(model)
    assert image_id in fam.vision_token_ids(model, processor) and tok.pad_token_id not in fam.vision_token_ids(model, processor)

    names = [n for n, _ in model.named_modules()]
    targets = [n for n in names if re.fullmatch(fam.lora_target_regex, n)]
    assert targets, f"{family}: the default LoRA targets match no module"
    assert not [n for n in targets if any(n.startswith(p + ".") for p in fam.unquantized)]
    assert all(any(n.startswith(p) for n in names) for p in fam.unquantized if p.startswith("model."))

    # pixel bounds in the processor's own terms (Gemma 3 / Idefics3 raised TypeError before)
    fam.set_pixel_bounds(processor, 32 * 32, 64 * 64)
    size = dict(processor.image_processor.size)
    if fam.pixel_bounds == "qwen":
        assert (size["shortest_edge"], size["longest_edge"]) == (32 * 32, 64 * 64)
    elif fam.pixel_bounds == "longest_edge":
        assert size == {"longest_edge": 64}


@pytest.mark.parametrize("family", STANDIN_FAMILIES)
def test_4bit_keeps_the_vision_side_and_lm_head_unquantised(family: str, standin) -> None:
    try:
        check_quantization_supported("4bit", "cpu")
    except RuntimeError as err:
        pytest.skip(f"bitsandbytes cannot run 4-bit on this CPU: {err}")
    import bitsandbytes as bnb

    model, _ = load_policy(str(standin(family)), dtype="float32", quantization="4bit", lora=LoraSettings(r=2))
    fam = family_of(model)
    quantised = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised and all(re.search(fam.language_layers, n) for n in quantised), quantised[:5]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and re.search(fam.language_layers, n) for n in trainable)
    assert model.get_output_embeddings().weight.dtype == torch.float32  # lm_head not quantised


def test_synthetic_settings_from_python_as_a_dict(tmp_path: Path) -> None:
    from anatomy_lightning.data.settings import SyntheticSettings

    dm = AnatomyVQADataModule(synthetic={"n_train": 4, "n_val": 1, "n_test": 1, "out_dir": str(tmp_path)})
    assert isinstance(dm.synthetic, SyntheticSettings) and dm.synthetic.n_train == 4
    with pytest.raises(ValueError, match=r"data.synthetic: unknown keys \['ntrain'\]"):
        AnatomyVQADataModule(synthetic={"ntrain": 4})
