"""Stand-ins of every VLM family: offline build + Auto-class reload, family tokens, chat template,
token-id wiring, batched processor calls (1+1 and 1+2 images) and generate."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from anatomy_lightning.models.tiny import FORMAT_TOKENS, qwen25_vl_config
from tests.support.standins import (
    END_OF_TURN,
    STANDIN_FAMILIES,
    build_standin,
    qwen3_vl_config,
    standin_image_size,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_QWEN_KEYS = {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
_QWEN_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|endoftext|>")
# Per family: model class, processor class, family special tokens, processor output keys, image tokens
# per image (at standin_image_size), config attribute -> token it must point at, images nested per prompt.
SPEC: dict[str, dict] = {
    "qwen2-vl": dict(model="Qwen2VLForConditionalGeneration", processor="Qwen2VLProcessor", tokens=_QWEN_TOKENS,
                     keys=_QWEN_KEYS, per_image=4, nested=False,
                     ids={"image_token_id": "<|image_pad|>", "vision_start_token_id": "<|vision_start|>"}),
    "qwen2.5-vl": dict(model="Qwen2_5_VLForConditionalGeneration", processor="Qwen2_5_VLProcessor",
                       tokens=_QWEN_TOKENS, keys=_QWEN_KEYS, per_image=4, nested=False,
                       ids={"image_token_id": "<|image_pad|>", "vision_start_token_id": "<|vision_start|>"}),
    "qwen3-vl": dict(model="Qwen3VLForConditionalGeneration", processor="Qwen3VLProcessor", tokens=_QWEN_TOKENS,
                     keys=_QWEN_KEYS, per_image=4, nested=False,
                     ids={"image_token_id": "<|image_pad|>", "vision_start_token_id": "<|vision_start|>"}),
    "qwen3.5": dict(model="Qwen3_5ForConditionalGeneration", processor="Qwen3VLProcessor", tokens=_QWEN_TOKENS,
                    keys=_QWEN_KEYS, per_image=4, nested=False,
                    ids={"image_token_id": "<|image_pad|>", "vision_start_token_id": "<|vision_start|>"}),
    "gemma3": dict(model="Gemma3ForConditionalGeneration", processor="Gemma3Processor",
                   tokens=("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                           "<image_soft_token>", "<bos>", "<eos>", "<pad>"),
                   keys={"input_ids", "attention_mask", "pixel_values", "token_type_ids"}, per_image=4, nested=True,
                   ids={"image_token_index": "<image_soft_token>", "boi_token_index": "<start_of_image>",
                        "eoi_token_index": "<end_of_image>"}),
    "idefics3": dict(model="Idefics3ForConditionalGeneration", processor="Idefics3Processor",
                     tokens=("<image>", "<fake_token_around_image>", "<global-img>", "<row_1_col_1>",
                             "<row_6_col_6>", "<end_of_utterance>", "<|im_start|>"),
                     keys={"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"}, per_image=4,
                     nested=True, ids={"image_token_id": "<image>"}),
    "llava-onevision": dict(model="LlavaOnevisionForConditionalGeneration", processor="LlavaOnevisionProcessor",
                            tokens=("<image>", "<video>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"),
                            keys={"input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images"},
                            per_image=10, nested=False,
                            ids={"image_token_index": "<image>", "video_token_index": "<video>"}),
}
# What the generation prompt must end with (the assistant turn opened; Qwen3.5 opens a think block).
GEN_PROMPT = {
    "qwen2-vl": "<|im_start|>assistant\n", "qwen2.5-vl": "<|im_start|>assistant\n",
    "qwen3-vl": "<|im_start|>assistant\n", "qwen3.5": "<|im_start|>assistant\n<think>\n",
    "gemma3": "<start_of_turn>model\n", "idefics3": "Assistant:", "llava-onevision": "<|im_start|>assistant\n",
}
_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PLACEHOLDER = {
    "qwen2-vl": _QWEN_IMAGE, "qwen2.5-vl": _QWEN_IMAGE, "qwen3-vl": _QWEN_IMAGE, "qwen3.5": _QWEN_IMAGE,
    "gemma3": "<start_of_image>", "idefics3": "<image>", "llava-onevision": "<image>",
}
SYSTEM = "You are an expert surgeon."
QUESTION = "Which organ? A. liver B. gut"


def test_spec_covers_every_family() -> None:
    assert set(SPEC) == set(STANDIN_FAMILIES) == set(END_OF_TURN)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    """family -> (model, processor), each built and reloaded once per module, lazily."""
    root = tmp_path_factory.mktemp("standins")
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            path = build_standin(family, root / family)
            cache[family] = (AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path))
        return cache[family]

    return get


def _messages(n_images: int) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": QUESTION}]},
    ]


def _image_token_id(config) -> int:
    return config.image_token_id if hasattr(config, "image_token_id") else config.image_token_index


@pytest.mark.parametrize("family", STANDIN_FAMILIES)
def test_reload_tokens_and_ids(built, family: str) -> None:
    model, processor = built(family)
    spec = SPEC[family]
    assert type(model).__name__ == spec["model"]
    assert type(processor).__name__ == spec["processor"]
    assert sum(p.numel() for p in model.parameters()) < 3e6
    tok = processor.tokenizer
    assert tok.padding_side == "left" and tok.pad_token_id is not None and tok.chat_template
    for t in (*spec["tokens"], END_OF_TURN[family], *FORMAT_TOKENS):
        assert len(tok(t, add_special_tokens=False).input_ids) == 1, t  # one id each, not split
    # The answer tags are not special, so they survive decoding that skips special tokens.
    text = "<think> the liver is left of the gut </think> <answer>A</answer>"
    ids = tok(END_OF_TURN[family] + text, add_special_tokens=False).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    for attr, token in spec["ids"].items():
        assert getattr(model.config, attr) == tok.convert_tokens_to_ids(token), attr
    text_config = model.config.get_text_config()
    eos = text_config.eos_token_id if isinstance(text_config.eos_token_id, list) else [text_config.eos_token_id]
    assert tok.eos_token_id in eos and text_config.pad_token_id == tok.pad_token_id
    assert text_config.vocab_size >= len(tok) and text_config.vocab_size % 64 == 0
    gen = model.generation_config
    if family.startswith("qwen"):
        assert tok.convert_tokens_to_ids("<|endoftext|>") in gen.eos_token_id
    assert tok.convert_tokens_to_ids(END_OF_TURN[family]) in gen.eos_token_id and tok.eos_token_id in gen.eos_token_id
    assert gen.pad_token_id == tok.pad_token_id
    if family == "gemma3":  # Gemma3Processor reads these tokenizer attributes
        named = (tok.boi_token, tok.eoi_token, tok.image_token)
        assert named == ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
        assert processor.image_seq_length == model.config.mm_tokens_per_image
    if family == "qwen3.5":
        assert set(text_config.layer_types) == {"linear_attention", "full_attention"}
    if family == "qwen3-vl":
        assert text_config.rope_parameters["mrope_interleaved"] and model.config.vision_config.patch_size == 16


@pytest.mark.parametrize("family", STANDIN_FAMILIES)
def test_chat_template(built, family: str) -> None:
    _, processor = built(family)
    prompt = processor.apply_chat_template(_messages(2), add_generation_prompt=True, tokenize=False)
    assert SYSTEM in prompt and QUESTION in prompt
    assert prompt.count(IMAGE_PLACEHOLDER[family]) == 2
    assert prompt.endswith(GEN_PROMPT[family])
    closed = processor.apply_chat_template(_messages(1), add_generation_prompt=False, tokenize=False)
    assert not closed.endswith(GEN_PROMPT[family]) and END_OF_TURN[family] in closed
    if family == "qwen3.5":  # thinking off: the published template closes an empty think block
        off = processor.apply_chat_template(
            _messages(1), add_generation_prompt=True, tokenize=False, enable_thinking=False
        )
        assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    if family == "gemma3":  # no system role: the text is folded into the first user turn
        assert "system" not in prompt and prompt.startswith("<bos><start_of_turn>user\n" + SYSTEM)


def _vision_token_count(model, inputs) -> int:
    """Rows of image features the vision tower + projector produce for these inputs."""
    params = inspect.signature(model.model.get_image_features).parameters
    kwargs = {k: v for k, v in inputs.items() if k in params and k != "input_ids"}
    with torch.no_grad():
        out = model.model.get_image_features(**kwargs)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    feats = feats if isinstance(feats, (list, tuple)) else [feats]
    return sum(f.reshape(-1, f.shape[-1]).shape[0] for f in feats)


@pytest.mark.parametrize("family", STANDIN_FAMILIES)
@pytest.mark.parametrize("n_images", [(1, 1), (1, 2)], ids=["1+1", "1+2"])
def test_batched_processor_and_generate(built, family: str, n_images: tuple[int, int]) -> None:
    model, processor = built(family)
    spec = SPEC[family]
    side = standin_image_size(family)
    image = Image.new("RGB", (side, side), (150, 40, 50))
    texts = [processor.apply_chat_template(_messages(n), add_generation_prompt=True, tokenize=False) for n in n_images]
    images = [[image] * n for n in n_images] if spec["nested"] else [image] * sum(n_images)
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert set(inputs) == spec["keys"]
    ids = inputs["input_ids"]
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left padding: prompts end at the last column
    per_row = (ids == _image_token_id(model.config)).sum(1).tolist()
    assert per_row == [spec["per_image"] * n for n in n_images]
    assert sum(per_row) == _vision_token_count(model, inputs)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and ids.shape[1] < out.shape[1] <= ids.shape[1] + 4
    assert torch.equal(out[:, : ids.shape[1]], ids)


def test_build_is_idempotent(tmp_path: Path) -> None:
    path = build_standin("gemma3", tmp_path / "g", seed=1)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert build_standin("gemma3", tmp_path / "g", seed=1) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # nothing rewritten
    w1 = AutoModelForImageTextToText.from_pretrained(path).lm_head.weight.clone()
    build_standin("gemma3", tmp_path / "g", seed=2)  # other settings: rebuilt in place
    assert not torch.equal(w1, AutoModelForImageTextToText.from_pretrained(path).lm_head.weight)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_image_sizes_and_errors() -> None:
    assert standin_image_size("qwen2.5-vl") % 28 == 0 and standin_image_size("qwen3-vl") % 32 == 0
    with pytest.raises(ValueError, match="unknown stand-in family"):
        standin_image_size("gpt-2")
    with pytest.raises(ValueError, match="not available"):
        build_standin("gemma3", "/nonexistent/never-written", size="real")


def test_real_configs_construct() -> None:
    """The benchmark-size configs (random weights, published dimensions) construct; not built here."""
    ids = {t: i for i, t in enumerate(_QWEN_TOKENS + ("<|video_pad|>",))}
    q3 = qwen3_vl_config("real", ids, vocab_size=0)
    assert (q3.text_config.hidden_size, q3.text_config.num_hidden_layers, q3.vision_config.depth) == (2560, 36, 24)
    assert sum(q3.text_config.rope_parameters["mrope_section"]) == q3.text_config.head_dim // 2
    q25 = qwen25_vl_config("3b")
    assert (q25.text_config.hidden_size, q25.text_config.num_hidden_layers) == (2048, 36)
