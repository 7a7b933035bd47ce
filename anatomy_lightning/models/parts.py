"""Which weights train: LoRA adapters (`LoraSettings`) and the parts that are frozen.

A model has three parts, each named by its family (`ModelFamily.part_of`): the language model, the
vision tower and the projector. `freeze_vit`, `freeze_aligner` and `freeze_llm` (ms-swift's keys)
freeze a part in full fine-tuning and keep LoRA's adapters off it; `resolve_frozen` gives their
defaults for each mode, and `trainable_by_part` the optimiser's parameter groups.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from anatomy_lightning.models.families import PARTS, ModelFamily
from anatomy_lightning.settings import coerce_settings

__all__ = ["LoraSettings", "freeze_parts", "resolve_frozen", "trainable_by_part"]

log = logging.getLogger(__name__)


@dataclass
class LoraSettings:
    """LoRA adapters. Where they go is `target_modules` together with the module's `freeze_vit`,
    `freeze_aligner` and `freeze_llm` (ms-swift's keys; `resolve_frozen` gives their defaults).

    target_modules: None (every linear layer of each part that is not frozen; by default the
    language model's attention and MLP projections only, as before), a regex matched against full
    module names (it alone picks the modules: the freeze keys stay unset), or a list of module
    names, kept off the frozen parts (by default the vision tower and the projector).
    include_vision: the older key for "a list target may match the vision side too"; with a list it
    makes freeze_vit and freeze_aligner default to false (with no list it changes nothing, as before).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str | None = None
    include_vision: bool = False

    @classmethod
    def coerce(cls, value: Any) -> LoraSettings | None:
        """However the setting arrived (YAML, `--model.lora '{...}'`, `--model.lora.r=8`, a
        checkpoint's hyperparameters, `true`, Python); see `anatomy_lightning.settings`."""
        return coerce_settings(cls, value, "model.lora")

    def to_peft(self, family: ModelFamily, model: Any = None, *, freeze_vit: bool | None = None,
                freeze_aligner: bool | None = None, freeze_llm: bool = False) -> Any:
        """peft's LoraConfig. `model` (the transformers model) is needed when the default target
        reaches the vision tower or the projector: their linear layers are read from it."""
        from peft import LoraConfig

        frozen = _frozen_parts(*resolve_frozen(freeze_vit, freeze_aligner, self), freeze_llm)
        target: Any = self.target_modules
        exclude = None
        if target is None:
            target = _default_lora_target(family, model, frozen)
        elif not isinstance(target, str):  # a name list, kept off the frozen parts
            target = list(target)
            exclude = "|".join(f"({family.part_regex(part)})" for part in frozen) or None
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=target,
            exclude_modules=exclude, bias="none", task_type="CAUSAL_LM",
        )


def resolve_frozen(freeze_vit: bool | None, freeze_aligner: bool | None, lora: Any) -> tuple[bool, bool]:
    """(freeze_vit, freeze_aligner) with None replaced by the mode's default.

    Full fine-tuning (`lora` None): false, every weight trains, as before (ms-swift's default is true).
    LoRA: true, adapters on the language model only (ms-swift's default), except for a target list
    with the older `lora.include_vision: true`, which keeps meaning "the list may match the vision side".
    """
    lora = LoraSettings.coerce(lora)
    listed = lora is not None and lora.target_modules is not None and not isinstance(lora.target_modules, str)
    default = lora is not None and not (listed and lora.include_vision)
    return (default if freeze_vit is None else bool(freeze_vit),
            default if freeze_aligner is None else bool(freeze_aligner))


def _frozen_parts(freeze_vit: bool, freeze_aligner: bool, freeze_llm: bool) -> list[str]:
    return [part for part, frozen in zip(PARTS, (freeze_llm, freeze_vit, freeze_aligner)) if frozen]


def _default_lora_target(family: ModelFamily, model: Any, frozen: list[str]) -> str:
    """The language model's projections (unless frozen) and every linear layer of the vision parts
    that are not frozen, as one regex (just `family.lora_target_regex` by default)."""
    patterns = [] if "language_model" in frozen else [family.lora_target_regex]
    for part in ("vision_tower", "projector"):
        if part in frozen:
            continue
        if model is None:
            raise TypeError(f"LoRA on the {part.replace('_', ' ')} reads its linear layers from the model: "
                            "pass it, to_peft(family, model, ...)")
        found = _linear_patterns(model, family, part)
        if not found:
            log.warning("%s: the %s has no linear layer, so LoRA puts no adapter there", family.name,
                        part.replace("_", " "))
        patterns += found
    if not patterns:
        raise ValueError("model.freeze_llm with the vision tower and projector frozen too: LoRA has nothing to adapt")
    return patterns[0] if len(patterns) == 1 else "|".join(f"({p})" for p in patterns)


def _linear_patterns(model: Any, family: ModelFamily, part: str) -> list[str]:
    """Regexes (fullmatch) naming exactly the linear layers of `part`: one per layer path, with block
    indices written as \\d+ where that names linear layers only, else the names themselves."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = dict(base.named_modules())
    linear = {n for n, m in modules.items() if isinstance(m, nn.Linear) and family.part_of(n) == part}
    grouped: dict[str, list[str]] = {}
    for name in sorted(linear):
        grouped.setdefault(re.sub(r"\\\.\d+(?=\\\.|$)", lambda _: r"\.\d+", re.escape(name)), []).append(name)
    patterns = []
    for pattern, names in grouped.items():
        exact = all(n in linear for n in modules if re.fullmatch(pattern, n))
        patterns += [pattern] if exact else [re.escape(n) for n in names]
    return patterns


def freeze_parts(model: nn.Module, family: ModelFamily, *, freeze_vit: bool, freeze_aligner: bool,
                 freeze_llm: bool = False) -> None:
    """Full fine-tuning: stop the gradients of the frozen parts (`ModelFamily.part_of`)."""
    frozen = set(_frozen_parts(freeze_vit, freeze_aligner, freeze_llm))
    for name, param in model.named_parameters() if frozen else ():
        if family.part_of(name) in frozen:
            param.requires_grad_(False)


def trainable_by_part(model: Any, family: ModelFamily) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The trainable (name, parameter) pairs of each part, names as in the model without its peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parts: dict[str, list[tuple[str, nn.Parameter]]] = {part: [] for part in PARTS}
    for name, param in base.named_parameters():
        if param.requires_grad:
            parts[family.part_of(name)].append((name, param))
    return parts
