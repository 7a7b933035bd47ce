"""The built-in Qwen2.5-VL: offline, idempotent build; tokenizer; chat template; image tokens; generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLForConditionalGeneration

from anatomy_lightning.models.tiny import (
    FORMAT_TOKENS,
    QWEN_SPECIAL_TOKENS,
    TINY_MODEL_NAMES,
    build_tiny_checkpoint,
    mrope_section,
    qwen25_vl_config,
    tiny_checkpoint_dir,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def loaded(tiny_dir: Path):
    return AutoModelForImageTextToText.from_pretrained(tiny_dir), AutoProcessor.from_pretrained(tiny_dir)


def _messages(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def test_build_is_idempotent_and_settings_aware(tmp_path: Path) -> None:
    path = build_tiny_checkpoint(tmp_path / "m", seed=1)
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= {
        p.name for p in path.iterdir()
    }
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_checkpoint(tmp_path / "m", seed=1) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # nothing rewritten
    w1 = AutoModelForImageTextToText.from_pretrained(path).lm_head.weight.clone()
    build_tiny_checkpoint(tmp_path / "m", seed=2)  # other settings: rebuilt in place
    w2 = AutoModelForImageTextToText.from_pretrained(path).lm_head.weight
    assert not torch.equal(w1, w2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_loads_with_auto_classes(loaded) -> None:
    model, processor = loaded
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.3e6 < n_params < 5e6
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert model.config.text_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert model.config.text_config.pad_token_id == tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id in model.generation_config.eos_token_id
    assert len(tok) <= model.config.text_config.vocab_size


def test_tokenizer_single_ids_and_short_answers(loaded) -> None:
    tok = loaded[1].tokenizer
    for t in (*QWEN_SPECIAL_TOKENS, *FORMAT_TOKENS, *"ABCDEF"):
        assert len(tok(t, add_special_tokens=False).input_ids) == 1, t
    answer = "<think> The liver is at the top-left. </think> <answer>C</answer>"
    ids = tok(answer, add_special_tokens=False).input_ids
    assert len(ids) <= 16
    assert tok.convert_tokens_to_ids("C") in ids
    # format tags are not "special": they survive skip_special_tokens, which the rewards rely on
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == answer
    assert len(tok("What is the anatomy left of the gallbladder?").input_ids) <= 10
    assert 800 < len(tok) <= 2048


def test_chat_template_and_image_token_count(loaded) -> None:
    processor = loaded[1]
    text = processor.apply_chat_template(_messages("What anatomy is at the top-left of the frame?"),
                                         add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert "<|vision_start|><|image_pad|><|vision_end|>What anatomy" in text
    assert text.endswith("<|im_start|>assistant\n")
    inputs = processor(text=[text], images=[Image.new("RGB", (56, 56), "red")], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]  # 4x4 patches of 14 px
    assert int((inputs["input_ids"] == image_id).sum()) == 4  # merged 2x2 -> 4 tokens
    big = processor(text=[text], images=[Image.new("RGB", (1000, 800))], return_tensors="pt")
    assert int((big["input_ids"] == image_id).sum()) <= 224 * 224 // (28 * 28)  # max_pixels caps tokens


def test_generates_from_processor_prompt(loaded) -> None:
    model, processor = loaded
    texts = [processor.apply_chat_template(_messages(q), add_generation_prompt=True, tokenize=False)
             for q in ("Which organ?", "What is the anatomy left of the gallbladder?")]
    images = [Image.new("RGB", (56, 56), c) for c in ("red", "blue")]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    assert processor.tokenizer.padding_side == "left"
    assert inputs["attention_mask"][0, 0] == 0  # the shorter prompt is padded on the left
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=True)
    new = out[:, inputs["input_ids"].shape[1]:]
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 6
    assert int(new.max()) < model.config.text_config.vocab_size
    assert all(isinstance(s, str) for s in processor.batch_decode(new, skip_special_tokens=True))


def test_size_presets_match_published_dimensions() -> None:
    c3, c7 = qwen25_vl_config("3b"), qwen25_vl_config("7b")
    t3, t7 = c3.text_config, c7.text_config
    assert (t3.hidden_size, t3.num_hidden_layers, t3.num_attention_heads, t3.num_key_value_heads,
            t3.intermediate_size, t3.vocab_size) == (2048, 36, 16, 2, 11008, 151936)
    assert (t7.hidden_size, t7.num_hidden_layers, t7.num_attention_heads, t7.num_key_value_heads,
            t7.intermediate_size, t7.vocab_size) == (3584, 28, 28, 4, 18944, 152064)
    assert c3.tie_word_embeddings and not c7.tie_word_embeddings
    assert t3.rope_parameters["mrope_section"] == t7.rope_parameters["mrope_section"] == [16, 24, 24]
    v = c7.vision_config
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size) == (32, 1280, 16, 3420, 3584)
    assert c3.vision_config.out_hidden_size == 2048 and c3.image_token_id == 151655
    with torch.device("meta"):  # count parameters without allocating them
        n3 = sum(p.numel() for p in Qwen2_5_VLForConditionalGeneration(c3).parameters())
        n_small = sum(p.numel() for p in Qwen2_5_VLForConditionalGeneration(qwen25_vl_config("small")).parameters())
    assert 3.7e9 < n3 < 3.8e9  # Qwen2.5-VL-3B: 3.75B
    assert 20e6 < n_small < 50e6


def test_config_overrides() -> None:
    c = qwen25_vl_config("tiny", hidden_size=256, num_attention_heads=4, vision_depth=3, tie_word_embeddings=True)
    assert c.text_config.hidden_size == 256 and c.vision_config.out_hidden_size == 256
    assert c.vision_config.depth == 3 and c.tie_word_embeddings
    assert sum(c.text_config.rope_parameters["mrope_section"]) == 256 // 4 // 2
    assert mrope_section(128) == [16, 24, 24]
    with pytest.raises(ValueError, match="mrope_section"):
        qwen25_vl_config("tiny", rope_parameters={"rope_type": "default", "mrope_section": [1, 2, 3]})
    with pytest.raises(ValueError, match="size='huge'"):
        qwen25_vl_config("huge")


def test_checkpoint_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ANATOMY_LIGHTNING_CACHE", str(tmp_path))
    assert tiny_checkpoint_dir(TINY_MODEL_NAMES[0]) == tmp_path / "models" / "tiny-qwen2.5-vl"
    assert tiny_checkpoint_dir("tiny-qwen2.5-vl", cache_dir=tmp_path / "x") == tmp_path / "x" / "models" / "tiny-qwen2.5-vl"
    monkeypatch.delenv("ANATOMY_LIGHTNING_CACHE")
    assert tiny_checkpoint_dir("tiny-qwen2.5-vl") == Path.home() / ".cache" / "anatomy_lightning" / "models" / "tiny-qwen2.5-vl"
    with pytest.raises(ValueError, match="not a built-in model"):
        tiny_checkpoint_dir("gigantic-vl")
