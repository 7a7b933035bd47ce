"""Tiny random-weight stand-ins of each supported vision-language family, in the Hugging Face layout.

Tests and benchmarks must run every family end to end offline (no downloads), through exactly the
code path a real checkpoint takes: `AutoModelForImageTextToText` / `AutoProcessor`. Each stand-in is
the family's real architecture and processor classes with tiny dimensions, a small byte-level BPE
tokenizer that holds the family's own special tokens (plus the answer tags as non-special single
ids, so they survive decoding), and a chat template in the family's real style.

Image sizes are chosen so that one image is a handful of image tokens (see `standin_image_size`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

from anatomy_lightning.models.tiny import CHAT_TEMPLATE as QWEN2_CHAT_TEMPLATE
from anatomy_lightning.models.tiny import build_tiny_model, mrope_section, save_checkpoint_atomically, train_bpe

STANDIN_FAMILIES: tuple[str, ...] = (
    "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5", "gemma3", "idefics3", "llava-onevision",
)
STANDIN_SIZES: tuple[str, ...] = ("tiny", "real")
_REAL_FAMILIES = ("qwen2.5-vl", "qwen3-vl")  # families with a published-dimension "real" size
_BUILD_VERSION = 1  # bump when the built files change, so cached stand-ins are rebuilt

# Square image side per family: the smallest the processor accepts without upscaling tricks, and few
# image tokens. Qwen2/2.5: 56 = 4x4 patches of 14 -> 2x2 merged = 4 tokens; Qwen3-VL/3.5: 64 = 4x4
# patches of 16 -> 4 tokens; Gemma 3 / Idefics3: 64 = 4x4 SigLIP patches of 16, pooled / pixel-
# shuffled to 4 tokens; LLaVA-OneVision: 32 = 2x2 patches per tile (base + one anyres tile).
_IMAGE_SIZE = {
    "qwen2-vl": 56, "qwen2.5-vl": 56, "qwen3-vl": 64, "qwen3.5": 64, "gemma3": 64, "idefics3": 64,
    "llava-onevision": 32,
}

# Tiny language model shared by all families: widths are multiples of 64 (bitsandbytes 4-bit blocks).
_TINY_TEXT: dict[str, Any] = dict(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
    max_position_embeddings=4096,
)
_TINY_SIGLIP: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=16,
)


def standin_image_size(family: str) -> int:
    """A square image side (pixels) that `family`'s stand-in processor takes, giving <= 16 image tokens."""
    _check_family(family)
    return _IMAGE_SIZE[family]


def _check_family(family: str) -> None:
    if family not in STANDIN_FAMILIES:
        raise ValueError(f"unknown stand-in family {family!r}; known: {STANDIN_FAMILIES}")


def _round64(n: int) -> int:
    return -(-n // 64) * 64


# ----------------------------------------------------------------------------------------- tokenizer
def build_family_tokenizer(
    special_tokens: list[str],
    *,
    eos: str,
    pad: str,
    bos: str | None = None,
    unk: str | None = None,
    named: dict[str, str] | None = None,
    chat_template: str,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the built-in corpus with `special_tokens` first (ids 0..n-1), the answer tags
    as non-special added tokens, and `named` extra special tokens exposed as tokenizer attributes
    (e.g. Gemma 3's `boi_token`, which its processor reads) that survive save/load."""
    tok = train_bpe(special_tokens, unk)
    role_tokens = {eos, pad, bos, unk} | set((named or {}).values())
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token=pad,
        bos_token=bos,
        unk_token=unk,
        additional_special_tokens=[t for t in special_tokens if t not in role_tokens],
        extra_special_tokens=dict(named or {}),
        padding_side="left",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = chat_template
    return fast


# ---------------------------------------------------------------------------------- chat templates
# Qwen3-VL: the Qwen2-VL format without the default system prompt. Qwen3.5 opens a thinking block at
# the generation prompt (and an empty one when `enable_thinking=False`), as its published template.
def _qwen3_template(think: bool) -> str:
    gen = (
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        + ("{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
           "{% else %}<think>\n{% endif %}" if think else "")
        + "{% endif %}"
    )
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for content in message['content'] %}"
        "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
        "<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
        "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}" + gen
    )


# Gemma 3's published template: bos, the system text folded into the first user turn, "model" role.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% else %}{% set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' %}{% endif %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# SmolVLM / Idefics3 style: "<|im_start|>User:<image>text<end_of_utterance>\nAssistant:".
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

# LLaVA-OneVision (Qwen2 text): images first as <image>, then the text, in Qwen2 turns.
LLAVA_OV_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}<image>{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}<video>{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if not loop.first or message['content'][0]['type'] != 'text' %}\n{% endif %}{{ content['text'] }}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)
GEMMA3_TOKENS = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
    "<image_soft_token>",
)
IDEFICS3_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
    "<global-img>", *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)
LLAVA_OV_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

# End-of-turn token per family (what generation must stop on); the Qwen-text families' published
# generation configs also stop on <|endoftext|>.
END_OF_TURN = {
    "qwen2-vl": "<|im_end|>", "qwen2.5-vl": "<|im_end|>", "qwen3-vl": "<|im_end|>", "qwen3.5": "<|im_end|>",
    "gemma3": "<end_of_turn>", "idefics3": "<end_of_utterance>", "llava-onevision": "<|im_end|>",
}


def _qwen_tokenizer(template: str) -> PreTrainedTokenizerFast:
    return build_family_tokenizer(list(QWEN_TOKENS), eos="<|im_end|>", pad="<|endoftext|>", chat_template=template)


def _ids(tok: PreTrainedTokenizerFast, tokens: tuple[str, ...]) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in tokens}


def _seeded(cls: type[PreTrainedModel], config: Any, seed: int, dtype: torch.dtype) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls._from_config(config, dtype=dtype)


# ------------------------------------------------------------------------------------- family builders
def _build_qwen2_vl(size: str, seed: int, dtype: torch.dtype) -> tuple[PreTrainedModel, ProcessorMixin]:
    from transformers import (
        Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor,
    )

    tok = _qwen_tokenizer(QWEN2_CHAT_TEMPLATE)
    ids = _ids(tok, QWEN_TOKENS)
    text = dict(_TINY_TEXT, vocab_size=_round64(len(tok)), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope_section(32)})
    vision = dict(depth=2, embed_dim=64, hidden_size=text["hidden_size"], mlp_ratio=2, num_heads=2, patch_size=14,
                  spatial_merge_size=2)
    config = Qwen2VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = _seeded(Qwen2VLForConditionalGeneration, config, seed, dtype)
    common = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=224 * 224)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**common), tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**common), chat_template=QWEN2_CHAT_TEMPLATE,
    )
    return model, processor


def _build_qwen25_vl(size: str, seed: int, dtype: torch.dtype) -> tuple[PreTrainedModel, ProcessorMixin]:
    return build_tiny_model("3b" if size == "real" else "tiny", seed=seed, dtype=dtype)


def qwen3_vl_config(size: str, ids: dict[str, int], vocab_size: int) -> Any:
    """Qwen3-VL config wired to the tokenizer's `ids`: "tiny" (`vocab_size` rows), or "real" = the
    published Qwen3-VL-4B-Instruct dimensions (Qwen's 151936 rows; `vocab_size` ignored)."""
    from transformers import Qwen3VLConfig

    if size == "real":
        text = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                     "mrope_section": [24, 20, 20], "mrope_interleaved": True})
        vision = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                      deepstack_visual_indexes=[5, 11, 17], num_position_embeddings=2304)
        tie = True
    else:
        # head_dim 32 -> 16 rotary frequencies, interleaved t/h/w in Qwen3's [24, 20, 20] proportion.
        text = dict(_TINY_TEXT, head_dim=32, vocab_size=vocab_size,
                    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                     "mrope_section": [6, 5, 5], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                      deepstack_visual_indexes=[1], num_position_embeddings=64)
        tie = False
    text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision.update(patch_size=16, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen3VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie,
    )


def _qwen3_processor(tok: PreTrainedTokenizerFast, template: str, size: str) -> ProcessorMixin:
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    hi = 32 * 32 * 1280 if size == "real" else 256 * 256
    size_kw = {"size": {"shortest_edge": 64 * 64, "longest_edge": hi}}
    common = dict(patch_size=16, merge_size=2, temporal_patch_size=2)
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**common, **size_kw), tokenizer=tok,
        video_processor=Qwen3VLVideoProcessor(**common, **size_kw), chat_template=template,
    )


def _build_qwen3_vl(size: str, seed: int, dtype: torch.dtype) -> tuple[PreTrainedModel, ProcessorMixin]:
    from transformers import Qwen3VLForConditionalGeneration

    template = _qwen3_template(think=False)
    tok = _qwen_tokenizer(template)
    config = qwen3_vl_config(size, _ids(tok, QWEN_TOKENS), _round64(len(tok)))
    return _seeded(Qwen3VLForConditionalGeneration, config, seed, dtype), _qwen3_processor(tok, template, size)


def _build_qwen35(size: str, seed: int, dtype: torch.dtype) -> tuple[PreTrainedModel, ProcessorMixin]:
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    template = _qwen3_template(think=True)
    tok = _qwen_tokenizer(template)
    ids = _ids(tok, QWEN_TOKENS)
    # One gated-delta-net (linear attention) layer and one full-attention layer, as the real 3:1 mix.
    text = dict(_TINY_TEXT, head_dim=32, vocab_size=_round64(len(tok)),
                layer_types=["linear_attention", "full_attention"],
                linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": [2, 1, 1], "mrope_interleaved": True},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                  num_position_embeddings=64, patch_size=16, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen3_5Config(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    return _seeded(Qwen3_5ForConditionalGeneration, config, seed, dtype), _qwen3_processor(tok, template, size)


GEMMA3_MM_TOKENS = 4  # 4x4 SigLIP patches average-pooled 2x2 -> 4 soft tokens per image


def _build_gemma3(size: str, seed: int, dtype: torch.dtype) -> tuple[PreTrainedModel, ProcessorMixin]:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = build_family_tokenizer(list(GEMMA3_TOKENS), eos="<eos>", pad="<pad>", bos="<bos>", unk="<unk>",
                                 named=named, chat_template=GEMMA3_CHAT_TEMPLATE)
    ids = _ids(tok, GEMMA3_TOKENS)
    s = _IMAGE_SIZE["gemma3"]
    text = dict(_TINY_TEXT, head_dim=32, query_pre_attn_scalar=32, vocab_size=_round64(len(tok)), sliding_window=64,
                layer_types=["sliding_attention", "full_attention"],
                bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]], pad_token_id=ids["<pad>"])
    vision = dict(_TINY_SIGLIP, image_size=s, model_type="siglip_vision_model", vision_use_head=False)
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=GEMMA3_MM_TOKENS,
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"], tie_word_embeddings=True,
    )
    config.bos_token_id, config.eos_token_id, config.pad_token_id = ids["<bos>"], ids["<eos>"], ids["<pad>"]
    model = _seeded(Gemma3ForConditionalGeneration, config, seed, dtype)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": s, "width": s}), tokenizer=tok,
        chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=GEMMA3_MM_TOKENS,
    )
    return model, processor


IDEFICS3_SCALE = 2  # pixel shuffle: 4x4 patches -> 2x2 = 4 image tokens of 4x the width


def _build_idefics3(size: str, seed: int, dtype: torch.dtype) -> tuple[PreTrainedModel, ProcessorMixin]:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    tok = build_family_tokenizer(list(IDEFICS3_TOKENS), eos="<end_of_utterance>", pad="<|im_end|>",
                                 bos="<|im_start|>", chat_template=IDEFICS3_CHAT_TEMPLATE)
    ids = _ids(tok, IDEFICS3_TOKENS)
    s = _IMAGE_SIZE["idefics3"]
    text = dict(_TINY_TEXT, model_type="llama", head_dim=32, vocab_size=_round64(len(tok)),
                bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<end_of_utterance>"],
                pad_token_id=ids["<|im_end|>"])
    vision = dict(_TINY_SIGLIP, image_size=s)
    config = Idefics3Config(
        text_config=text, vision_config=vision, scale_factor=IDEFICS3_SCALE, image_token_id=ids["<image>"],
        tie_word_embeddings=False, pad_token_id=ids["<|im_end|>"],
    )
    model = _seeded(Idefics3ForConditionalGeneration, config, seed, dtype)
    image_seq_len = (s // _TINY_SIGLIP["patch_size"]) ** 2 // IDEFICS3_SCALE**2
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(size={"longest_edge": s}, max_image_size={"longest_edge": s},
                                               do_image_splitting=False),
        tokenizer=tok, image_seq_len=image_seq_len, chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    return model, processor


def _build_llava_onevision(size: str, seed: int, dtype: torch.dtype) -> tuple[PreTrainedModel, ProcessorMixin]:
    from transformers import (
        LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor,
    )

    tok = build_family_tokenizer(list(LLAVA_OV_TOKENS), eos="<|im_end|>", pad="<|endoftext|>",
                                 named={"image_token": "<image>", "video_token": "<video>"},
                                 chat_template=LLAVA_OV_CHAT_TEMPLATE)
    ids = _ids(tok, LLAVA_OV_TOKENS)
    s = _IMAGE_SIZE["llava-onevision"]
    pinpoints = [[s, s]]  # one anyres tile, so an image is base 2x2 + tile 2x2 + 2 row newlines = 10 tokens
    text = dict(_TINY_TEXT, model_type="qwen2", vocab_size=_round64(len(tok)), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(_TINY_SIGLIP, image_size=s, model_type="siglip_vision_model", vision_use_head=False)
    config = LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_token_index=ids["<image>"], video_token_index=ids["<video>"],
        image_grid_pinpoints=pinpoints, vision_feature_layer=-1, vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )
    model = _seeded(LlavaOnevisionForConditionalGeneration, config, seed, dtype)
    img_kw = dict(size={"height": s, "width": s}, image_grid_pinpoints=pinpoints)
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(**img_kw),
        tokenizer=tok,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": s, "width": s}),
        num_image_tokens=(s // _TINY_SIGLIP["patch_size"]) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_OV_CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )
    return model, processor


_BUILDERS: dict[str, Callable[[str, int, torch.dtype], tuple[PreTrainedModel, ProcessorMixin]]] = {
    "qwen2-vl": _build_qwen2_vl, "qwen2.5-vl": _build_qwen25_vl, "qwen3-vl": _build_qwen3_vl, "qwen3.5": _build_qwen35,
    "gemma3": _build_gemma3, "idefics3": _build_idefics3, "llava-onevision": _build_llava_onevision,
}


def build_standin_model(
    family: str, *, seed: int = 0, size: str = "tiny", dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """In-memory stand-in model (eval mode) and processor, token ids and generation stop ids wired.

    size: "tiny" (all families) or "real" (published dimensions, random weights, for benchmarks:
    "qwen2.5-vl" = Qwen2.5-VL-3B, "qwen3-vl" = Qwen3-VL-4B). dtype defaults to float32 for tiny and
    bfloat16 for real.
    """
    _check_family(family)
    if size not in STANDIN_SIZES or (size == "real" and family not in _REAL_FAMILIES):
        raise ValueError(f"size={size!r} is not available for {family!r} ('tiny' for all; 'real' for {_REAL_FAMILIES})")
    dtype = dtype or (torch.bfloat16 if size == "real" else torch.float32)
    model, processor = _BUILDERS[family](size, seed, dtype)
    tok = processor.tokenizer
    stops = [END_OF_TURN[family], tok.eos_token] + (["<|endoftext|>"] if family.startswith("qwen") else [])
    gen = model.generation_config
    gen.eos_token_id = list(dict.fromkeys(tok.convert_tokens_to_ids(stops)))
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = tok.bos_token_id if tok.bos_token_id is not None else tok.pad_token_id
    return model.eval(), processor


def _settings(family: str, size: str, seed: int, dtype: torch.dtype) -> dict[str, Any]:
    return {"version": _BUILD_VERSION, "family": family, "size": size, "seed": seed, "dtype": str(dtype)}


def build_standin(
    family: str, path: str | Path, *, seed: int = 0, size: str = "tiny", dtype: torch.dtype | None = None
) -> Path:
    """Write the `family` stand-in (model, processor, tokenizer, chat template, generation config) to
    `path` and return it; no-op if a complete build with the same settings is there (see
    `tiny.save_checkpoint_atomically`)."""
    dtype = dtype or (torch.bfloat16 if size == "real" else torch.float32)
    return save_checkpoint_atomically(
        Path(path).expanduser(), _settings(family, size, seed, dtype),
        lambda: build_standin_model(family, seed=seed, size=size, dtype=dtype),
    )
