"""load_policy and the GRPO plumbing around it, on the built-in tiny Qwen2.5-VL (real transformers/peft)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from anatomy_lightning.models.loading import (
    LoraSettings,
    build_optimizer,
    check_quantization_supported,
    frozen_copy,
    has_adapter,
    load_policy,
    reference_forward,
    sanitize_completion_ids,
    save_adapter,
    trainable_state_dict,
)
from anatomy_lightning.models.tiny import build_tiny_checkpoint

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny"))


def _inputs(processor, n: int = 2) -> dict:
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Which organ is {i}?"}]}],
            add_generation_prompt=True, tokenize=False,
        )
        for i in range(n)
    ]
    images = [Image.new("RGB", (56, 56), (40 * i, 100, 200)) for i in range(n)]
    return dict(processor(text=texts, images=images, return_tensors="pt", padding=True))


def _logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _perturb_adapter(model, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _trainable_modules(model) -> set[str]:
    return {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}


def test_missing_paths_raise_with_the_path(tmp_path: Path) -> None:
    for bad in (str(tmp_path / "no_such_model"), "./checkpoints/missing-run", "~/nothing/here/at/all"):
        with pytest.raises(FileNotFoundError, match="does not exist") as err:
            load_policy(bad)
        assert bad in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_policy(str(tmp_path / "empty"))


def test_uncached_hub_id_offline_says_how_to_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so "someorg/..." is not a local folder by accident
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1") as err:
        load_policy("someorg/no-such-vl-model")
    assert "someorg/no-such-vl-model" in str(err.value) and "hf download" in str(err.value)


def test_builtin_name_builds_into_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ANATOMY_LIGHTNING_CACHE", str(tmp_path))
    model, processor = load_policy("tiny-qwen2.5-vl", max_pixels=112 * 112)
    assert (tmp_path / "models" / "tiny-qwen2.5-vl" / "config.json").is_file()
    assert processor.tokenizer.padding_side == "left"
    big = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[Image.new("RGB", (1000, 800))],
                    return_tensors="pt")
    assert int(big["image_grid_thw"].prod()) // 4 <= 112 * 112 // (28 * 28)  # max_pixels applied
    # full fine-tuning: every weight trains, and the reference is a separate frozen copy
    assert not has_adapter(model) and all(p.requires_grad for p in model.parameters())
    ref = frozen_copy(model)
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert not torch.equal(model.lm_head.weight, ref.lm_head.weight)
    with pytest.raises(TypeError, match="frozen_copy"):
        with reference_forward(model):
            pass


def test_lora_only_on_language_model(tiny_dir: str) -> None:
    model, _ = load_policy(tiny_dir, lora=LoraSettings(r=4))
    modules = _trainable_modules(model)
    layers = model.config.text_config.num_hidden_layers
    assert len(modules) == layers * len(PROJECTIONS)
    assert all(".language_model.layers." in m and m.rsplit(".", 1)[1] in PROJECTIONS for m in modules)
    assert not any("visual" in n for n, p in model.named_parameters() if p.requires_grad)
    # a plain name list is kept off the vision tower too (its MLP also has gate/up/down_proj)
    listed, _ = load_policy(tiny_dir, lora=LoraSettings(r=4, target_modules=["gate_proj", "qkv"]))
    assert _trainable_modules(listed) and not any("visual" in m for m in _trainable_modules(listed))
    state = trainable_state_dict(model)
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in k for k in state)


def test_reference_forward_is_base_model(tiny_dir: str) -> None:
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    model, processor = load_policy(tiny_dir, lora=LoraSettings(r=4, dropout=0.0))
    model.eval()
    inputs = _inputs(processor)
    base_logits = _logits(base, inputs)
    torch.testing.assert_close(_logits(model, inputs), base_logits)  # lora_B starts at zero
    _perturb_adapter(model)
    assert not torch.allclose(_logits(model, inputs), base_logits, atol=1e-3)
    with reference_forward(model) as ref:
        torch.testing.assert_close(_logits(ref, inputs), base_logits)
    assert not torch.allclose(_logits(model, inputs), base_logits, atol=1e-3)  # adapter back on after the block


def test_gradient_checkpointing_gives_lora_grads(tiny_dir: str) -> None:
    model, processor = load_policy(tiny_dir, lora=LoraSettings(r=4), gradient_checkpointing=True)
    assert model.base_model.model.model.language_model.gradient_checkpointing
    assert model.config.use_cache is False
    _perturb_adapter(model)  # with lora_B = 0, lora_A would get no gradient
    model.train()
    model(**_inputs(processor)).logits.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_4bit_lora_optimizer_step(tiny_dir: str) -> None:
    try:
        check_quantization_supported("4bit")
    except RuntimeError as err:
        pytest.skip(f"bitsandbytes 4-bit cannot run here: {err}")
    import bitsandbytes as bnb

    model, processor = load_policy(tiny_dir, quantization="4bit", lora=LoraSettings(r=4), gradient_checkpointing=True)
    inner = model.base_model.model.model
    assert isinstance(inner.language_model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert type(inner.visual.blocks[0].attn.qkv) is torch.nn.Linear  # vision tower not quantised
    assert type(model.base_model.model.lm_head) is torch.nn.Linear
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = build_optimizer("adamw", [p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = trainable_state_dict(model)
    model.train()
    model(**_inputs(processor)).logits.float().pow(2).mean().backward()
    opt.step()
    after = trainable_state_dict(model)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert {n for n in changed if "lora_B" in n} == {n for n in before if "lora_B" in n}


def test_save_adapter_reloads_with_plain_peft(tiny_dir: str, tmp_path: Path) -> None:
    from peft import PeftModel

    model, processor = load_policy(tiny_dir, lora=LoraSettings(r=4, dropout=0.0))
    _perturb_adapter(model, seed=3)
    model.eval()
    inputs = _inputs(processor)
    out = save_adapter(model, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_dir), out).eval()
    torch.testing.assert_close(_logits(reloaded, inputs), _logits(model, inputs))
    with pytest.raises(TypeError, match="peft"):
        save_adapter(AutoModelForImageTextToText.from_pretrained(tiny_dir), tmp_path / "x")


def test_sanitize_completion_ids_lets_vision_tokens_through_forward(tiny_dir: str) -> None:
    model, processor = load_policy(tiny_dir)
    model.eval()
    tok = processor.tokenizer
    prompt = _inputs(processor, n=1)
    image_pad, v_start = tok.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>"])
    completion = torch.tensor([[11, v_start, image_pad, image_pad, 12, tok.eos_token_id]])
    # prompt + completion, with the prompt's pixels; mm_token_type_ids marks image positions (0 for the completion)
    extra = {
        "attention_mask": torch.ones(1, prompt["input_ids"].shape[1] + completion.shape[1], dtype=torch.long),
        "mm_token_type_ids": torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion)], dim=1),
        "pixel_values": prompt["pixel_values"],
        "image_grid_thw": prompt["image_grid_thw"],
    }
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(input_ids=torch.cat([prompt["input_ids"], completion], dim=1), **extra)
    clean = sanitize_completion_ids(completion, model, processor)
    assert clean.tolist() == [[11, tok.pad_token_id, tok.pad_token_id, tok.pad_token_id, 12, tok.eos_token_id]]
    assert completion[0, 2] == image_pad  # input untouched
    assert sanitize_completion_ids(completion, model, tok).equal(clean)  # a bare tokenizer works too
    ids = torch.cat([prompt["input_ids"], clean], dim=1)
    n = prompt["input_ids"].shape[1]
    with torch.no_grad():
        full = model(input_ids=ids, **extra).logits
        no_types = model(input_ids=ids, **{k: v for k, v in extra.items() if k != "mm_token_type_ids"}).logits
    torch.testing.assert_close(full[:, :n], _logits(model, prompt))  # causal: prompt logits unchanged
    # transformers 5.24 trap: without mm_token_type_ids the forward silently falls back to 1-D text
    # positions, so training log-probs would not match the 3-D (mrope) positions used by generate()
    assert not torch.allclose(no_types[:, :n], full[:, :n], atol=1e-4)


def test_build_optimizer_choices() -> None:
    w = torch.nn.Parameter(torch.ones(8192))
    assert isinstance(build_optimizer("adamw", [w], lr=1e-3, weight_decay=0.1), torch.optim.AdamW)
    try:
        opt = build_optimizer("adamw_8bit", [w], lr=1e-2, betas=(0.9, 0.95))
    except RuntimeError as err:
        pytest.skip(f"bitsandbytes 8-bit optimizers cannot run here: {err}")
    w.grad = torch.ones_like(w)
    opt.step()
    assert float(w.max()) < 1.0 and type(opt).__name__ == "AdamW8bit"
    with pytest.raises(ValueError, match="optimizer='sgdx'"):
        build_optimizer("sgdx", [w], lr=1e-3)
    with pytest.raises(ValueError, match="no parameters"):
        build_optimizer("adamw", [], lr=1e-3)
    with pytest.raises(ValueError, match="quantization='3bit'"):
        check_quantization_supported("3bit")
