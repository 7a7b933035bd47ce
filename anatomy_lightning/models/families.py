"""One explicit description per supported model family, instead of Qwen names spread over the code.

Rollout, loading, the module and the warm start ask the family of the loaded model for what differs
between vision-language models: which token ids are image placeholders, where an assistant turn
ends, how the processor takes images, which modules LoRA targets and 4-bit leaves alone, where the
vision tower and the projector are (`model.freeze_vit` / `freeze_aligner`, `vit_lr` / `aligner_lr`), how
pixel bounds are written, and whether the fast rollout path applies.

Token ids are always read from the model's own config, processor and generation config; the only
strings here are each family's end-of-turn token, a fallback for checkpoints whose generation
config does not list it.

Paths:
- fast (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): image features and mrope positions once per prompt, prefill
  once per group with the KV cache repeated G times, shared-prompt log-prob forwards (`grpo.fast_path`);
- generic (every other image-text-to-text model): Hugging Face `generate` and whole-sequence forwards
  on prompts that the processor encoded once per completion, so any processor layout (tiles, image
  masks, token types) stays aligned with its row.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Config / processor attributes that hold ids of tokens standing for (or framing) images and videos.
_VISION_ID_ATTRS = (
    "image_token_id", "image_token_index", "video_token_id", "video_token_index", "vision_start_token_id",
    "vision_end_token_id", "boi_token_id", "boi_token_index", "eoi_token_id", "eoi_token_index",
    "fake_image_token_id", "global_image_token_id", "start_image_token_id", "end_image_token_id",
    "context_image_token_id", "audio_token_id", "boa_token_id", "eoa_token_id",
)
_LM_PROJECTIONS = r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"


@dataclass(frozen=True)
class ModelFamily:
    """What a model family does differently. See the module docstring for the two paths."""

    name: str
    model_types: tuple[str, ...]  # `config.model_type` values of this family
    fast_path: bool
    language_layers: str  # regex of the language model's decoder layers, e.g. r"model\.language_model\.layers"
    unquantized: tuple[str, ...]  # module name prefixes kept out of 4-bit/8-bit (vision tower, projector)
    # ms-swift's `vision_tower` and `aligner`: name prefixes of the image (and audio) encoder and of what maps
    # its features into the language model. A name under both (Qwen's `visual.merger`) is the projector's.
    vision_tower: tuple[str, ...]
    projector: tuple[str, ...]
    end_of_turn: tuple[str, ...]  # the assistant turn's end token(s), if the generation config lacks them
    nested_images: bool  # the processor wants one image list per prompt (a list of lists for a batch)
    pixel_bounds: str  # "qwen" (min/max pixels as shortest/longest_edge), "longest_edge", "fixed"
    positions_from_mask: bool = True  # generic forwards pass position ids as generate computes them

    # -- LoRA and quantisation ---------------------------------------------------------------
    @property
    def lora_target_regex(self) -> str:
        """The language model's attention and MLP projections, never the vision tower's."""
        return rf".*{self.language_layers}\.\d+\.{_LM_PROJECTIONS}"

    def quant_skip_modules(self) -> list[str]:
        """Prefixes bitsandbytes leaves unquantised: the vision side and `lm_head`."""
        return [*self.unquantized, "lm_head"]

    def vision_module_regex(self) -> str:
        """peft `exclude_modules` pattern keeping a plain target name list off the vision side."""
        return r"(" + "|".join(p.replace(".", r"\.") for p in self.unquantized) + r")\..*"

    # -- vision tower / projector / language model -------------------------------------------
    def part_of(self, name: str) -> str:
        """Which part a parameter or module name (of the model without its peft wrapper) belongs to:
        "projector", "vision_tower" or "language_model" (everything else: the decoder, embeddings, lm_head)."""
        if _under(name, self.projector):
            return "projector"
        return "vision_tower" if _under(name, self.vision_tower) else "language_model"

    def part_regex(self, part: str) -> str:
        """A regex whose fullmatch is `part_of(name) == part`, for peft's `exclude_modules`."""
        proj, vision = _alternatives(self.projector), _alternatives(self.vision_tower + self.projector)
        if part == "projector":
            return rf"{proj}(\..*)?"
        if part == "vision_tower":
            return rf"(?!{proj}(\.|$)){_alternatives(self.vision_tower)}(\..*)?"
        if part == "language_model":
            return rf"(?!{vision}(\.|$)).*"
        raise ValueError(f"part {part!r} is not one of {PARTS}")

    # -- tokens ------------------------------------------------------------------------------
    def vision_token_ids(self, model: Any, processor: Any) -> list[int]:
        """Ids of image/video placeholder and framing tokens, from the config and the processor.

        A sampled completion holding one of them, fed back with the prompt's images, makes the
        model count more image tokens than features; they are masked (see `grpo.sequences.vision_token_guard`).
        """
        config = _unwrap(model).config
        ids: set[int] = set()
        for source in (config, getattr(config, "text_config", None), processor):
            for attr in _VISION_ID_ATTRS:
                value = getattr(source, attr, None) if source is not None else None
                if isinstance(value, int) and value >= 0:
                    ids.add(value)
        ids.update(getattr(processor, "row_col_ids", None) or [])  # Idefics3 tile markers
        tok = getattr(processor, "tokenizer", processor)
        ids.discard(tok.pad_token_id)
        ids.discard(tok.eos_token_id)
        return sorted(ids)

    def image_token_id(self, model: Any) -> int:
        config = _unwrap(model).config
        for attr in ("image_token_id", "image_token_index"):
            value = getattr(config, attr, None)
            if isinstance(value, int):
                return value
        raise ValueError(f"{self.name}: the model config has no image_token_id")

    def stop_token_ids(self, model: Any, processor: Any) -> list[int]:
        """End of the assistant turn: generation config eos ids, the tokenizer's eos and the
        family's end-of-turn token when the tokenizer holds it."""
        tok = getattr(processor, "tokenizer", processor)
        ids: set[int] = set()
        gen_eos = getattr(getattr(_unwrap(model), "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, (list, tuple)):
            ids.update(i for i in gen_eos if isinstance(i, int))
        if isinstance(tok.eos_token_id, int):
            ids.add(tok.eos_token_id)
        vocab = tok.get_vocab()
        ids.update(vocab[t] for t in self.end_of_turn if t in vocab)
        return sorted(i for i in ids if i >= 0 and i != tok.unk_token_id)

    def end_of_turn_token(self, model: Any, processor: Any) -> str:
        """The string a supervised target ends with (the warm start): the family's end-of-turn
        token if the tokenizer has it, else the first stop id's token."""
        tok = getattr(processor, "tokenizer", processor)
        vocab = tok.get_vocab()
        for t in self.end_of_turn:
            if t in vocab:
                return t
        return tok.convert_ids_to_tokens(self.stop_token_ids(model, processor)[0])

    # -- processor ---------------------------------------------------------------------------
    def images_argument(self, per_prompt: list[list[Any]]) -> list[Any] | None:
        """The `images=` argument for a batch: one list per prompt, or flat, as the processor wants."""
        if not any(per_prompt):
            return None
        return per_prompt if self.nested_images else [img for imgs in per_prompt for img in imgs]

    def set_pixel_bounds(self, processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
        """Apply min/max pixel bounds in the form this family's image processor understands."""
        if min_pixels is None and max_pixels is None:
            return
        if self.pixel_bounds == "fixed":
            log.warning("%s resizes every image to a fixed size; min_pixels/max_pixels are ignored", self.name)
            return
        from transformers.image_utils import SizeDict

        subs = [getattr(processor, "image_processor", None), getattr(processor, "video_processor", None)]
        for sub in (s for s in subs if s is not None and hasattr(s, "size")):
            size = dict(sub.size) if sub.size is not None else {}
            if self.pixel_bounds == "qwen":
                lo = min_pixels if min_pixels is not None else size["shortest_edge"]
                hi = max_pixels if max_pixels is not None else size["longest_edge"]
                if lo > hi:
                    raise ValueError(f"min_pixels={lo} is larger than max_pixels={hi}; lower min_pixels or raise max_pixels")
                sub.size = SizeDict(shortest_edge=lo, longest_edge=hi)
            elif self.pixel_bounds == "longest_edge" and max_pixels is not None:
                sub.size = SizeDict(longest_edge=int(math.isqrt(int(max_pixels))))


def _unwrap(model: Any) -> Any:
    """The transformers model inside a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


PARTS = ("language_model", "vision_tower", "projector")  # `ModelFamily.part_of`'s answers


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _alternatives(prefixes: tuple[str, ...]) -> str:
    return "(" + "|".join(re.escape(p) for p in prefixes) + ")"


_QWEN = dict(  # `visual` alone: checkpoints of the older layout, with the tower beside `model`
    language_layers=r"model\.language_model\.layers", unquantized=("model.visual", "visual"),
    vision_tower=("model.visual", "visual"),
    # the patch merger; Qwen3-VL adds the deepstack mergers, which feed features into early decoder layers
    projector=tuple(f"{v}.{m}" for v in ("model.visual", "visual") for m in ("merger", "deepstack_merger_list")),
    end_of_turn=("<|im_end|>",), nested_images=False, pixel_bounds="qwen", positions_from_mask=False,
)

FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("qwen2-vl", ("qwen2_vl",), fast_path=True, **_QWEN),
    ModelFamily("qwen2.5-vl", ("qwen2_5_vl",), fast_path=True, **_QWEN),
    ModelFamily("qwen3-vl", ("qwen3_vl",), fast_path=True, **_QWEN),  # deepstack features carried through every forward
    # not the fast path: its linear-attention cache layers cannot be repeated per group
    ModelFamily("qwen3.5", ("qwen3_5",), fast_path=False, **_QWEN),
    ModelFamily(
        "gemma3", ("gemma3",), fast_path=False, language_layers=r"model\.language_model\.layers",
        unquantized=("model.vision_tower", "model.multi_modal_projector"), end_of_turn=("<end_of_turn>",),
        nested_images=True, pixel_bounds="fixed",
        vision_tower=("model.vision_tower",), projector=("model.multi_modal_projector",),
    ),
    ModelFamily(
        "gemma4", ("gemma4",), fast_path=False, language_layers=r"model\.language_model\.layers",
        unquantized=("model.vision_tower", "model.audio_tower", "model.embed_vision", "model.embed_audio"),
        end_of_turn=("<turn|>",), nested_images=True, pixel_bounds="fixed",
        # as in ms-swift, the audio encoder counts as "vit" and its embedder as an aligner
        vision_tower=("model.vision_tower", "model.audio_tower"), projector=("model.embed_vision", "model.embed_audio"),
    ),
    ModelFamily(  # also SmolVLM checkpoints
        "idefics3", ("idefics3", "smolvlm"), fast_path=False, language_layers=r"model\.text_model\.layers",
        unquantized=("model.vision_model", "model.connector"), end_of_turn=("<end_of_utterance>",),
        nested_images=True, pixel_bounds="longest_edge",
        vision_tower=("model.vision_model",), projector=("model.connector",),
    ),
    ModelFamily(
        "llava-onevision", ("llava_onevision",), fast_path=False, language_layers=r"model\.language_model\.layers",
        unquantized=("model.vision_tower", "model.multi_modal_projector"), end_of_turn=("<|im_end|>",),
        nested_images=False, pixel_bounds="fixed",
        # image_newline: the learned vector appended to each row of projected image features
        vision_tower=("model.vision_tower",), projector=("model.multi_modal_projector", "model.image_newline"),
    ),
    ModelFamily(
        "internvl", ("internvl",), fast_path=False, language_layers=r"model\.language_model\.layers",
        unquantized=("model.vision_tower", "model.multi_modal_projector"), end_of_turn=("<|im_end|>",),
        nested_images=True, pixel_bounds="fixed",
        vision_tower=("model.vision_tower",), projector=("model.multi_modal_projector",),
    ),
)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


class UnsupportedModelError(ValueError):
    """A `model_type` no family describes; the message lists the supported families."""

    def __init__(self, model_type: str, source: str = "") -> None:
        where = f" ({source})" if source else ""
        super().__init__(f"model type {model_type!r}{where} is not a supported family; supported: "
                         f"{', '.join(f.name for f in FAMILIES)}")
        self.model_type = model_type


def family_for_type(model_type: str, source: str = "") -> ModelFamily:
    try:
        return _BY_TYPE[model_type]
    except KeyError:
        raise UnsupportedModelError(model_type, source) from None


def family_of(model: Any) -> ModelFamily:
    """The family of a loaded model (through a peft wrapper)."""
    config = _unwrap(model).config
    return family_for_type(getattr(config, "model_type", type(config).__name__), type(_unwrap(model)).__name__)
