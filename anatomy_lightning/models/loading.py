"""Load the policy (built-in tiny, local folder or hub id), with optional QLoRA / LoRA, and the
pieces GRPO needs around it: the reference model, adapter saving and the optimizer.

With an adapter the reference model is the same weights with the adapter switched off, so
QLoRA on one consumer GPU holds a single copy of the base model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anatomy_lightning.models.attention import install as install_attention
from anatomy_lightning.models.families import ModelFamily, family_for_type, family_of
from anatomy_lightning.models.lora_dropout import fold_lora_dropout
from anatomy_lightning.models.parts import LoraSettings, freeze_parts, resolve_frozen, trainable_by_part

log = logging.getLogger(__name__)

QUANTIZATIONS = ("4bit", "8bit")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
_DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
DTYPES = tuple(_DTYPES)  # model.dtype's choices (the settings check names them before any load)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


# -- resolving the model name -----------------------------------------------------------------
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _builtin_names() -> tuple[str, ...]:
    """The built-in model names (imported on use: the tiny builder pulls in transformers)."""
    from anatomy_lightning.models.tiny import TINY_MODEL_NAMES

    return TINY_MODEL_NAMES


def resolve_model_path(model_name_or_path: str) -> str:
    """A built-in tiny name -> its (built) cache folder; a local folder -> itself; else a hub id.

    Fails early with the path and the fix, instead of a deep transformers traceback.
    """
    name = str(model_name_or_path)
    if name in _builtin_names():
        from anatomy_lightning.models.tiny import ensure_tiny_checkpoint

        return str(ensure_tiny_checkpoint(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {str(path)!r} has no config.json; point `model` at a Hugging Face checkpoint folder "
                f"(config.json, *.safetensors, tokenizer and processor files) or use a built-in name {_builtin_names()}"
            )
        return str(path)
    if path.exists():
        raise ValueError(f"model {name!r} is a file; pass the checkpoint folder that contains it")
    looks_local = name.startswith(("/", ".", "~")) or "\\" in name or name.endswith("/") or name.count("/") > 1
    if looks_local or not _HUB_ID.match(name):
        raise FileNotFoundError(
            f"model folder {name!r} does not exist (resolved to {str(path.resolve())!r}); pass an existing checkpoint "
            f"folder, a hub id such as 'Qwen/Qwen2.5-VL-3B-Instruct', or a built-in name {_builtin_names()}"
        )
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if not isinstance(cached, str):
            raise FileNotFoundError(_not_cached_message(name, "HF_HUB_OFFLINE=1"))
    return name


def _not_cached_message(name: str, why: str) -> str:
    """One line for a hub id whose files are neither in the local cache nor downloadable (`why`)."""
    from huggingface_hub import constants

    return (
        f"model {name!r}: no local folder of that name, and its files are not in the local Hugging Face cache "
        f"({constants.HF_HUB_CACHE}; set by HF_HOME / HF_HUB_CACHE) while {why}; on a machine with network run "
        f"`hf download {name} --local-dir <folder>`, copy the folder here and pass --model.model=<folder> "
        f"(or use a built-in name {_builtin_names()})"
    )


def _hub_unreachable(err: BaseException) -> str | None:
    """Why the hub could not be used, if `err` (or its cause chain) is a cache miss without network/offline."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or "couldn't connect to" in str(cause):
            return "HF_HUB_OFFLINE=1" if _offline() else "the Hugging Face Hub cannot be reached (no network?)"
        cause = cause.__cause__ or cause.__context__
    return None


def load_model_config(path: str, model_name_or_path: str) -> Any:
    """`AutoConfig.from_pretrained(path)`; a hub id neither cached nor reachable -> one clear FileNotFoundError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except OSError as err:
        why = None if Path(path).is_dir() else _hub_unreachable(err)
        if why is None:
            raise
        raise FileNotFoundError(_not_cached_message(str(model_name_or_path), why)) from None


# -- quantisation -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def check_quantization_supported(quantization: str | None, device: str | None = None) -> None:
    """Raise a RuntimeError saying what to do if bitsandbytes cannot run `quantization` here.

    Runs one small quantised matmul on `device` (default: cuda if available, else cpu), since
    bitsandbytes imports fine on hardware where its kernels then fail.
    """
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not supported; use one of {QUANTIZATIONS} or None")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    fix = "set quantization: null (bf16 LoRA needs about 4x the weight memory) or install a bitsandbytes build for this hardware"
    try:
        import bitsandbytes as bnb

        if quantization == "4bit":
            layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
        layer = layer.to(device)
        out = layer(torch.ones(2, 64, device=device))
        if not torch.isfinite(out).all():
            raise RuntimeError("non-finite output from a quantised test layer")
    except Exception as err:  # ImportError, missing kernels, unsupported device
        raise RuntimeError(
            f"bitsandbytes cannot run {quantization} quantisation on {device!r} ({type(err).__name__}: {err}); {fix}"
        ) from err


def bnb_quantization_config(quantization: str, quantize_vision: bool, family: ModelFamily,
                            quant_storage: torch.dtype | None = None) -> Any:
    """The bitsandbytes config of a 4bit/8bit load, keeping the vision tower (unless `quantize_vision`)
    and lm_head unquantised; shared with export, which must rebuild the base exactly as training did.

    `quant_storage`: the dtype the packed 4-bit weights are stored in (default uint8). Sharded
    training (FSDP-QLoRA, `sharding`) stores them in the weights' dtype, the FSDP-QLoRA recipe: casting
    the model to that dtype (trainer.precision "bf16-true") is then a no-op on the packed bits. The
    quantised values are the same."""
    from transformers import BitsAndBytesConfig

    skip = ["lm_head"] if quantize_vision else family.quant_skip_modules()
    if quantization == "4bit":
        storage = {"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,  # also runs on CPU with bitsandbytes 0.50
            llm_int8_skip_modules=skip,
            **storage,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


# -- the policy --------------------------------------------------------------------------------
def load_policy(
    model_name_or_path: str,
    *,
    dtype: str = "auto",
    quantization: str | None = None,
    lora: LoraSettings | dict[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    quantize_vision: bool = False,
    device_map: Any = None,
    freeze_vit: bool | None = None,
    freeze_aligner: bool | None = None,
    freeze_llm: bool = False,
    quant_storage: torch.dtype | None = None,
) -> tuple[Any, Any]:
    """Load (model, processor) ready to train.

    - lora None, no quantization: full fine-tuning (every weight trainable but the parts frozen by
      freeze_vit / freeze_aligner / freeze_llm, see `resolve_frozen`);
    - lora set: a peft model with only the adapter trainable (on the parts those keys leave unfrozen);
    - quantization "4bit"/"8bit" (needs lora to train): bitsandbytes with the vision tower and
      lm_head unquantised, prepared with peft's `prepare_model_for_kbit_training`;
      `quant_storage` (4bit): the packed weights' storage dtype (see `bnb_quantization_config`).
    The tokenizer pads on the left, as batched generation needs.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    install_attention()  # grouped K/V kept unrepeated for backward (`models.attention`): same numbers, less memory
    lora = LoraSettings.coerce(lora)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    check_quantization_supported(quantization)
    path = resolve_model_path(model_name_or_path)
    family = family_for_type(load_model_config(path, model_name_or_path).model_type, str(model_name_or_path))

    kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization:
        kwargs["quantization_config"] = bnb_quantization_config(quantization, quantize_vision, family, quant_storage)
        if device_map is None and torch.cuda.is_available():
            device_map = {"": torch.cuda.current_device()}  # bitsandbytes quantises while placing the weights
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        processor = AutoProcessor.from_pretrained(path)
    except OSError as err:
        why = None if Path(path).is_dir() else _hub_unreachable(err)
        if why is not None:  # config.json cached, weights or processor files not
            raise FileNotFoundError(_not_cached_message(str(model_name_or_path), why)) from None
        raise OSError(
            f"could not load model {model_name_or_path!r} from {path!r}: {err}. Check the hub id / folder, network "
            f"access (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}) and that the checkpoint is complete."
        ) from err
    processor.tokenizer.padding_side = "left"  # batched generation pads on the left
    family.set_pixel_bounds(processor, min_pixels, max_pixels)

    if quantization:
        from peft import prepare_model_for_kbit_training

        # Freezes the base, upcasts the unquantised weights to fp32; checkpointing is enabled below.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _keep_cpu_4bit_trainable(model)
        if lora is None:
            log.warning("quantization=%s without lora: the model is frozen; pass lora=LoraSettings() to fine-tune",
                        quantization)
    fv, fa = resolve_frozen(freeze_vit, freeze_aligner, lora)
    if lora is None and not quantization:
        freeze_parts(model, family, freeze_vit=fv, freeze_aligner=fa, freeze_llm=freeze_llm)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)

    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora.to_peft(family, model, freeze_vit=fv, freeze_aligner=fa,
                                                   freeze_llm=freeze_llm))
        fold_lora_dropout(model)  # same masks and numbers as peft's dropout, a bool mask kept for backward
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        log.info("LoRA: %d of %d parameters trainable (%.3f%%)", n_train, n_all, 100 * n_train / max(1, n_all))
    counts = {part: sum(p.numel() for _, p in pairs) for part, pairs in trainable_by_part(model, family).items()}
    log.info("trainable parameters: language model %d, vision tower %d, projector %d", counts["language_model"],
             counts["vision_tower"], counts["projector"])
    return model, processor


def _keep_cpu_4bit_trainable(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On a CPU with AVX512-BF16, a `Linear4bit` called in eval mode without grad (our rollouts) converts
    its weight to a packed format whose matmul adds the bias in place, which autograd then refuses
    in the training forward ("a view of a leaf Variable ... in-place operation").
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def enable_gradient_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing, which gives gradients to LoRA weights behind frozen layers."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # Training forwards never use the KV cache; say so, or every forward warns. generate() still caches.
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.use_cache = False
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # belt and braces for reentrant checkpointing set elsewhere


def sanitize_completion_ids(ids: torch.Tensor, model: Any, processor: Any) -> torch.Tensor:
    """Copy of `ids` with the family's vision special tokens replaced by the pad id.

    A sampled completion may contain an image placeholder token. Fed back with the prompt's
    pixel_values, the model then counts more image tokens than image features and raises "Image
    features and image tokens do not match". Those positions are masked out of the loss anyway;
    replacing the ids lets the forward run.
    """
    tok = getattr(processor, "tokenizer", processor)
    vision_ids = family_of(model).vision_token_ids(model, processor)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    hit = torch.isin(ids, torch.tensor(vision_ids, device=ids.device, dtype=ids.dtype))
    return ids.masked_fill(hit, pad)


# -- reference model, adapters -----------------------------------------------------------------
def has_adapter(model: Any) -> bool:
    """True for a peft model (LoRA): its reference is the same weights with the adapter off."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


@contextlib.contextmanager
def reference_forward(model: Any) -> Iterator[Any]:
    """Within the block, `model` computes the reference (base) outputs: the adapter is disabled."""
    if not has_adapter(model):
        raise TypeError(
            f"reference_forward needs a peft (LoRA) model, got {type(model).__name__}; for full fine-tuning "
            "use frozen_copy(model) as the reference"
        )
    with model.disable_adapter():
        yield model


@contextlib.contextmanager
def reference_model(policy: Any, copy_: Any | None) -> Iterator[Any]:
    """The reference model for the block: the frozen copy if there is one, else the policy with its
    adapter disabled."""
    if copy_ is not None:
        yield copy_
    else:
        with reference_forward(policy):
            yield policy


def frozen_copy(model: nn.Module) -> nn.Module:
    """A separate frozen reference for full fine-tuning (a second full copy of the weights)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable tensors only (the LoRA adapter, or every weight in full fine-tuning)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: Any, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter in peft's format: `PeftModel.from_pretrained(base, path)` loads it anywhere.

    `state_dict`: the weights to write instead of the model's own (a sharded model's, gathered whole)."""
    if not has_adapter(model):
        raise TypeError(f"save_adapter needs a peft (LoRA) model, got {type(model).__name__}; save a full model "
                        "with model.save_pretrained(path)")
    path = Path(path)
    model.save_pretrained(path, **({"state_dict": state_dict} if state_dict is not None else {}))
    return path


# -- optimizer --------------------------------------------------------------------------------
def build_optimizer(
    name: str,
    params: Iterable[Any],
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """"adamw" (torch), "adamw_8bit" or "paged_adamw_8bit" (bitsandbytes; optimizer state in 8 bits)."""
    params = list(params)
    if not params:
        raise ValueError("build_optimizer got no parameters: nothing is trainable (set lora, or drop quantization)")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not one of {OPTIMIZERS}")
    first = params[0]["params"][0] if isinstance(params[0], dict) else params[0]
    device = first.device.type
    try:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if name == "adamw_8bit" else bnb.optim.PagedAdamW8bit
        _probe_bnb_optimizer(cls, device)
    except Exception as err:
        raise RuntimeError(
            f"optimizer={name!r} needs bitsandbytes 8-bit optimizers, which fail on {device!r} "
            f"({type(err).__name__}: {err}); use optimizer: adamw"
        ) from err
    return cls(params, lr=lr, weight_decay=weight_decay, betas=betas)


@functools.lru_cache(maxsize=None)
def _probe_bnb_optimizer(cls: type, device: str) -> None:
    """One step on a throwaway tensor (large enough for 8-bit state) so failures surface at setup."""
    w = nn.Parameter(torch.zeros(4096, device=device))
    w.grad = torch.ones_like(w)
    opt = cls([w], lr=1e-3)
    opt.step()
