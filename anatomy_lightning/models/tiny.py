"""A built-in Qwen2.5-VL that needs no download: the real architecture with random weights.

The checkpoint is written to disk in the standard Hugging Face layout (config, safetensors,
tokenizer, processor), so the built-in default is loaded by exactly the same code path
(`AutoModelForImageTextToText` / `AutoProcessor`) as a real Qwen2.5-VL checkpoint. Tests and the
CPU demo use "tiny"; benchmarks use "small"; "3b" / "7b" reproduce the published dimensions for
memory and speed measurements without the real weights.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

# Qwen's own special tokens (single ids, `special=True` so decoding can drop them) and the
# answer-format tags, which must survive decoding because the rewards read them.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
FORMAT_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"
TINY_VOCAB_SIZE = 1088  # embedding rows for tiny/small: the tokenizer's ids padded to a multiple of 64
# Special-token ids of the built-in tokenizer (trained with QWEN_SPECIAL_TOKENS first) and of real Qwen2.5-VL.
BUILTIN_TOKEN_IDS = {t: i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
QWEN_TOKEN_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
    "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
}

# Qwen2-VL's published chat template: image items become <|vision_start|><|image_pad|><|vision_end|>,
# which the processor then expands to one <|image_pad|> per merged image patch.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ANATOMY_NAMES = (
    "liver", "gut", "omentum", "gallbladder", "cystic duct", "cystic artery", "cystic plate",
    "common bile duct", "common hepatic duct", "hepatic artery", "abdominal wall cavity", "diaphragm",
    "stomach", "fat", "connective tissue", "blood", "grasper", "hook", "clipper", "scissors",
    "irrigator", "specimen bag", "kidney", "spleen", "pancreas", "duodenum", "colon", "heart", "lung",
    "brain", "bladder", "uterus", "aorta", "vein", "bone", "muscle", "tumor", "lesion", "nerve",
)
POSITIONS = (
    "top-left", "top-right", "bottom-left", "bottom-right", "center", "top", "bottom", "left", "right",
)
RELATIONS = ("left of", "right of", "above", "below", "next to", "behind", "in front of")
PHRASES = (
    "You are a helpful assistant.",
    "You are an expert surgeon. Look at the image and answer the question.",
    "First think about the question step by step, then give the answer.",
    "Answer with the letter of the correct option.",
    "Output the thinking process in <think> </think> and the final answer in <answer> </answer> tags.",
    "<think> The image shows the liver at the top of the frame. </think> <answer>A</answer>",
    "<think> I see the gallbladder next to the cystic duct, so the answer is B. </think> <answer>B</answer>",
    "The answer is C. The correct option is D. It is E or F.",
    "Which organ is shown? Which structure is visible? What is the instrument touching?",
)
# Words of surgical descriptions and step-by-step answers, so reasoning text is a few ids per word.
REASONING_TEXT = """
First I look at the image carefully and identify each visible structure before I choose an option.
The instrument is retracting tissue while the surgeon dissects the hepatocystic triangle of safety.
This is a laparoscopic cholecystectomy view; the camera points upward toward the inferior surface.
The structure in the upper part of the image appears dark red, smooth and shiny, which suggests liver.
The yellow lobulated tissue is fat, and the pale white band is peritoneum or connective tissue.
Because the tubular structure runs toward the gallbladder neck it must be the cystic duct, not the artery.
Therefore the correct answer is the option that names it. Wait, let me reconsider the position and
colour before answering. The organ on the left side is larger, brighter and closer to the camera than
the one on the right side. An endoscopic, radiological, ultrasound, microscopic or dermoscopic image;
computed tomography, magnetic resonance imaging, x-ray, fundus photograph, histopathology slide.
Bleeding vessels, clips, sutures, staples, trocars, ports, smoke, reflections and blurred regions may
hide anatomy. Anterior, posterior, superior, inferior, medial, lateral, proximal, distal, upper, lower,
between, around, under, over, inside, outside, adjacent, nearest, farthest, middle, corner, edge, frame.
Normal, abnormal, inflamed, enlarged, thickened, healthy, diseased, benign, malignant, cyst, polyp, stone.
The question asks which anatomy is shown, so I compare every candidate: none of the other options fit.
"""
SIZES = ("tiny", "small", "3b", "7b")
TINY_MODEL_NAMES = ("tiny-qwen2.5-vl", "small-qwen2.5-vl", "random-qwen2.5-vl-3b", "random-qwen2.5-vl-7b")
_NAME_TO_SIZE = dict(zip(TINY_MODEL_NAMES, SIZES))
_MANIFEST = "anatomy_lightning_build.json"
_BUILD_VERSION = 1  # bump when the built files change, so cached checkpoints are rebuilt

# Text and vision dimensions. 3b/7b are the published Qwen2.5-VL-3B/7B-Instruct configs.
_TEXT: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=TINY_VOCAB_SIZE, max_position_embeddings=4096),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1536, vocab_size=TINY_VOCAB_SIZE, max_position_embeddings=8192),
    "3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
               intermediate_size=11008, vocab_size=151936, max_position_embeddings=128000,
               rms_norm_eps=1e-6, max_window_layers=70),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, max_position_embeddings=128000,
               rms_norm_eps=1e-6, max_window_layers=28),
}
_VISION: dict[str, dict[str, Any]] = {
    "tiny": dict(depth=2, hidden_size=64, num_heads=2, intermediate_size=128, fullatt_block_indexes=[1]),
    "small": dict(depth=4, hidden_size=256, num_heads=4, intermediate_size=512, fullatt_block_indexes=[1, 3]),
    "3b": dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, tokens_per_second=2,
               fullatt_block_indexes=[7, 15, 23, 31]),
    "7b": dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, tokens_per_second=2,
               fullatt_block_indexes=[7, 15, 23, 31]),
}
_TIE = {"tiny": False, "small": False, "3b": True, "7b": False}
# Tiny/small: a 56x56 image is 4x4 patches of 14 -> 2x2 merged -> 4 image tokens; the cap keeps
# prompts short on CPU (real images are downscaled to at most 8x8 merged patches = 64 tokens).
_PIXELS = {
    "tiny": (56 * 56, 224 * 224),
    "small": (56 * 56, 224 * 224),
    "3b": (56 * 56, 28 * 28 * 1280),
    "7b": (56 * 56, 28 * 28 * 1280),
}


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) in Qwen's 16:24:24 proportion."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def qwen25_vl_config(size: str = "tiny", token_ids: dict[str, int] | None = None, **overrides: Any) -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL config for `size` ("tiny", "small", "3b", "7b").

    Overrides: text keys as they are (`hidden_size=256`), vision keys prefixed `vision_`
    (`vision_depth=4`), plus `tie_word_embeddings`. The vision output width follows the text
    width and the mrope split follows the head size unless overridden. `token_ids` maps the
    Qwen special tokens to ids (default: the built-in tokenizer's for tiny/small, Qwen's for 3b/7b).
    """
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not one of {SIZES}; pick one of them or override dimensions")
    text, vision = dict(_TEXT[size]), dict(_VISION[size], patch_size=14, spatial_merge_size=2)
    tie = _TIE[size]
    for key, value in overrides.items():
        if key == "tie_word_embeddings":
            tie = bool(value)
        elif key.startswith("vision_"):
            vision[key.removeprefix("vision_")] = value
        else:
            text[key] = value
    vision.setdefault("out_hidden_size", text["hidden_size"])
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text.setdefault(
        "rope_parameters", {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope_section(head_dim)}
    )
    section = text["rope_parameters"]["mrope_section"]
    if sum(section) != head_dim // 2:
        raise ValueError(f"mrope_section {section} must sum to head_dim/2 = {head_dim // 2} (hidden/heads)")
    ids = token_ids or (QWEN_TOKEN_IDS if size in ("3b", "7b") else BUILTIN_TOKEN_IDS)
    for key, token in (("bos_token_id", PAD_TOKEN), ("eos_token_id", EOS_TOKEN), ("pad_token_id", PAD_TOKEN)):
        text.setdefault(key, ids[token])  # Qwen: bos = <|endoftext|>, never prepended
    if max(ids.values()) >= text["vocab_size"]:
        raise ValueError(f"vocab_size={text['vocab_size']} has no row for special-token id {max(ids.values())}")
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=tie,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _corpus() -> list[str]:
    """Sentences in the shape of the prompts and answers, so the BPE merges make them short."""
    lines = list(PHRASES) + [ln for ln in REASONING_TEXT.splitlines() if ln]
    names = [n.title() for n in ANATOMY_NAMES] + list(ANATOMY_NAMES)
    lines += [f"What anatomy is at the {pos} of the frame?" for pos in POSITIONS]
    for i, name in enumerate(ANATOMY_NAMES):
        other = ANATOMY_NAMES[(i * 7 + 3) % len(ANATOMY_NAMES)]
        rel = RELATIONS[i % len(RELATIONS)]
        lines += [
            f"What is the anatomy {rel} the {name}?",
            f"Which structure is {rel} the {other}?",
            f"The {name} is {rel} the {other}.",
            f"Is the {name} visible in the image?",
        ]
    for start in range(0, len(names), 4):
        opts = names[start:start + 4]
        lines.append("Options:\n" + "\n".join(f"{'ABCDEF'[j]}. {o}" for j, o in enumerate(opts)))
    return lines * 3


def train_bpe(special_tokens: list[str] | tuple[str, ...], unk: str | None = None) -> Tokenizer:
    """Byte-level BPE on the built-in corpus: `special_tokens` first (ids 0..n-1), then the merges,
    then the answer tags as non-special added tokens (so decoding keeps them)."""
    tok = Tokenizer(models.BPE(unk_token=unk) if unk else models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE - len(FORMAT_TOKENS),
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte (so A-F) is one token
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in FORMAT_TOKENS])
    return tok


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (~2k ids) with Qwen's special tokens and the answer tags as single ids."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(QWEN_SPECIAL_TOKENS),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        padding_side="left",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(size: str = "tiny", min_pixels: int | None = None, max_pixels: int | None = None) -> Qwen2_5_VLProcessor:
    """Tokenizer + Qwen2-VL image/video processors with the pixel bounds for `size`."""
    lo, hi = _PIXELS[size]
    pixels = {"min_pixels": min_pixels or lo, "max_pixels": max_pixels or hi}
    common = dict(patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**common, **pixels),
        tokenizer=build_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(**common, **pixels),
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(
    size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, processor: Qwen2_5_VLProcessor | None = None,
    **overrides: Any,
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """In-memory model + processor, special-token ids wired to the tokenizer's."""
    processor = processor or build_processor(size)
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = qwen25_vl_config(size, token_ids=ids, **overrides)
    if config.text_config.vocab_size < len(tok):
        raise ValueError(f"vocab_size={config.text_config.vocab_size} is smaller than the tokenizer ({len(tok)} ids)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    gen = model.generation_config
    gen.eos_token_id = [tok.eos_token_id, tok.pad_token_id]
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = tok.pad_token_id
    return model.eval(), processor


def _settings(size: str, seed: int, dtype: torch.dtype, overrides: dict[str, Any]) -> dict[str, Any]:
    return {"version": _BUILD_VERSION, "size": size, "seed": seed, "dtype": str(dtype), "overrides": overrides}


def _is_complete(path: Path, settings: dict[str, Any]) -> bool:
    manifest = path / _MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()) == json.loads(json.dumps(settings))
    except json.JSONDecodeError:
        return False


def save_checkpoint_atomically(path: Path, settings: dict[str, Any], build: Callable[[], tuple[Any, Any]]) -> Path:
    """`build()` -> (model, processor), saved to `path` with `settings` as its manifest; no-op if
    a complete build with the same settings is there.

    The manifest is written last and the folder is swapped in with a rename, so a half-written
    build (crash, parallel test workers) is never mistaken for a complete one.
    """
    if _is_complete(path, settings):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model, processor = build()
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / _MANIFEST).write_text(json.dumps(settings, indent=2))
        if _is_complete(path, settings):  # another process finished first
            return path
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_tiny_checkpoint(
    path: str | Path, size: str = "tiny", seed: int = 0, dtype: torch.dtype | None = None, **overrides: Any
) -> Path:
    """Write a loadable random-weight Qwen2.5-VL checkpoint to `path`; no-op if already there."""
    path = Path(path).expanduser()
    dtype = dtype or (torch.bfloat16 if size in ("3b", "7b") else torch.float32)
    settings = _settings(size, seed, dtype, copy.deepcopy(overrides))
    return save_checkpoint_atomically(
        path, settings, lambda: build_tiny_model(size, seed=seed, dtype=dtype, **overrides)
    )


def tiny_checkpoint_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the built-in `name` lives: <cache>/models/<name>, cache = $ANATOMY_LIGHTNING_CACHE or ~/.cache/anatomy_lightning."""
    if name not in TINY_MODEL_NAMES:
        raise ValueError(f"{name!r} is not a built-in model; built-in names: {TINY_MODEL_NAMES}")
    root = cache_dir or os.environ.get("ANATOMY_LIGHTNING_CACHE") or Path.home() / ".cache" / "anatomy_lightning"
    return Path(root).expanduser() / "models" / name


def ensure_tiny_checkpoint(name: str, cache_dir: str | Path | None = None) -> Path:
    """Build the built-in `name` into the cache if needed and return its folder."""
    return build_tiny_checkpoint(tiny_checkpoint_dir(name, cache_dir), size=_NAME_TO_SIZE[name])
