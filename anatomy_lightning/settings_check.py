"""Range checks for every numeric setting, run by the CLI before any data is read or model is built.

Why up front: a nonsense value otherwise surfaces minutes later as a library traceback
("probability tensor contains inf/nan" for temperature 0), as a misleading message ("no training
questions" for val_fraction 1.5), or not at all (a negative beta trains without complaint). Every
problem is collected and reported in one error, each naming the setting and the value found, so a
config is fixed in one round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from anatomy_lightning.settings import plain_dict

__all__ = ["SettingsError", "check_settings", "settings_problems"]


class SettingsError(ValueError):
    """One or more settings are out of range; the message lists all of them."""


# (setting, test, what the test demands); a setting that is absent or None is not checked
_Rule = tuple[str, Callable[[float], bool], str]

_MODEL_RULES: tuple[_Rule, ...] = (
    ("num_generations", lambda v: v >= 2, "an integer >= 2 (GRPO compares completions within a group)"),
    ("max_new_tokens", lambda v: v >= 1, "an integer >= 1"),
    ("min_new_tokens", lambda v: v >= 0, "an integer >= 0"),
    ("temperature", lambda v: v > 0, "> 0 (sampling divides the logits by it)"),
    ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("top_k", lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    ("std_tol", lambda v: v >= 0, ">= 0"),
    ("beta", lambda v: v >= 0, ">= 0 (0 = no KL term)"),
    ("epsilon_low", lambda v: 0 <= v < 1, "in [0, 1) (the clip range starts at 1 - epsilon_low)"),
    ("epsilon_high", lambda v: v >= 0, ">= 0"),
    ("num_iterations", lambda v: v >= 1, "an integer >= 1"),
    ("max_resample_times", lambda v: v >= 0, "an integer >= 0"),
    ("logprob_batch_size", lambda v: v >= 1, "an integer >= 1, or null for all rows at once"),
    ("learning_rate", lambda v: v > 0, "> 0"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("warmup_steps", lambda v: v >= 0, "an integer >= 0"),
    ("min_pixels", lambda v: v >= 1, "an integer >= 1, or null"),
    ("max_pixels", lambda v: v >= 1, "an integer >= 1, or null"),
)
_EVALUATION_RULES: tuple[_Rule, ...] = (
    ("max_new_tokens", lambda v: v >= 1, "an integer >= 1, or null for model.max_new_tokens"),
    ("sample_every_n_steps", lambda v: v >= 0, "an integer >= 0 (0 = no text samples)"),
)
_LORA_RULES: tuple[_Rule, ...] = (
    ("r", lambda v: v >= 1, "an integer >= 1"),
    ("alpha", lambda v: v > 0, "> 0"),
    ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
)
_DATA_RULES: tuple[_Rule, ...] = (
    ("batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("eval_batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("num_workers", lambda v: v >= 0, "an integer >= 0"),
    ("num_stages", lambda v: v >= 1, "an integer >= 1"),
    ("val_fraction", lambda v: 0 <= v < 1, "in [0, 1) (the share of train_file held out for validation)"),
    ("epoch_length", lambda v: v >= 1, "an integer >= 1, or null"),
    ("max_val_questions", lambda v: v >= 1, "an integer >= 1, or null"),
)
_SYNTHETIC_RULES: tuple[_Rule, ...] = (
    ("n_train", lambda v: v >= 1, "an integer >= 1"),
    ("n_val", lambda v: v >= 0, "an integer >= 0"),
    ("n_test", lambda v: v >= 0, "an integer >= 0"),
    ("image_size", lambda v: v >= 16, "an integer >= 16 (pixels)"),
    ("grid", lambda v: v >= 1, "an integer >= 1"),
    ("num_options", lambda v: 2 <= v <= 6, "an integer from 2 to 6"),
    ("questions_per_scene", lambda v: v >= 1, "an integer >= 1"),
)

_AUGMENTATION_RULES: tuple[_Rule, ...] = (
    ("num_rewrites", lambda v: v >= 0, "an integer >= 0"),
    ("max_fraction", lambda v: 0 <= v <= 1, "in [0, 1] (the share of a batch that may be rewrites)"),
    ("max_rounds", lambda v: v >= 0, "an integer >= 0"),
    ("max_rounds_per_step", lambda v: v >= 0 and v == int(v), "an integer >= 0 (0 = no same-step replacement)"),
    ("queue_size", lambda v: v >= 0, "an integer >= 0"),
    ("max_age_steps", lambda v: v >= 1, "an integer >= 1, or null (queued rewrites never expire)"),
    ("temperature", lambda v: v > 0, "> 0, or null"),
    ("lambda_", lambda v: 0 <= v <= 1, "in [0, 1]"),
)
# rewriter -> (argument, test, demand); checked where a rewriter is given as {name: ..., <args>}
_REWRITER_ARG_RULES: dict[str, tuple[tuple[str, Callable[[Any], bool], str], ...]] = {
    "eliminate_options": (
        ("keep", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2,
         "an integer >= 2 (the gold plus at least one distractor)"),
        ("num_variants", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    ),
    "contrast_cue": (
        ("template", lambda v: isinstance(v, str) and "{distractor}" in v and "{gold" not in v,
         "a text containing {distractor} and not naming the gold"),
    ),
}


def _augmentation_problems(section: Mapping[str, Any], problems: list[str]) -> None:
    from anatomy_lightning.augment.augmenter import DETECT_RULES, WHEN
    from anatomy_lightning.augment.registry import REWRITERS

    problems += _renamed_problems(section)
    _check("augmentation.", section, _AUGMENTATION_RULES, problems)
    when = section.get("when")
    if when is not None and when not in WHEN:
        problems.append(f"augmentation.when = {when!r}: must be one of {list(WHEN)}")
    detect = section.get("detect")
    if detect is not None:
        bad = [d for d in (detect if isinstance(detect, (list, tuple)) else [detect]) if d not in DETECT_RULES]
        if bad:
            problems.append(f"augmentation.detect = {list(detect)!r}: unknown rules {bad}; choose from {list(DETECT_RULES)}")
    for k, spec in enumerate(section.get("rewriters") or []):
        spec = {"name": spec} if isinstance(spec, str) else plain_dict(spec) if isinstance(spec, Mapping) or hasattr(
            spec, "as_dict") else None
        if spec is None:
            continue  # a Rewriter object from Python: its constructor checked it
        name = spec.get("name")
        if name not in REWRITERS:
            problems.append(f"augmentation.rewriters[{k}].name = {name!r}: must be one of {sorted(REWRITERS)}")
            continue
        for arg, ok, demand in _REWRITER_ARG_RULES.get(name, ()):
            if arg in spec and not ok(spec[arg]):
                problems.append(f"augmentation.rewriters[{k}] ({name}).{arg} = {spec[arg]!r}: must be {demand}")


def _renamed_problems(augmentation: Mapping[str, Any]) -> list[str]:
    """Retired augmentation keys that are set, each naming its new key (the callback still accepts
    the old names, so the CLI parses them and the refusal comes from here, before instantiation)."""
    from anatomy_lightning.augment.augmenter import RENAMED_SETTINGS

    return [f"augmentation.{old} was renamed: use augmentation.{new}"
            for old, new in RENAMED_SETTINGS.items() if augmentation.get(old) is not None]


def _check(prefix: str, section: Mapping[str, Any], rules: tuple[_Rule, ...], problems: list[str]) -> None:
    for name, ok, demand in rules:
        value = section.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{prefix}{name} = {value!r}: must be a number, {demand}")
        elif not math.isfinite(value) or not ok(value):
            problems.append(f"{prefix}{name} = {value!r}: must be {demand}")


def settings_problems(model: Any = None, data: Any = None, augmentation: Any = None, evaluation: Any = None) -> list[str]:
    """Every out-of-range setting of the `model`, `data` and `augmentation` sections, as
    "section.key = value (...)"."""
    model, data, augmentation = plain_dict(model), plain_dict(data), plain_dict(augmentation)
    problems: list[str] = []
    _check("evaluation.", plain_dict(evaluation), _EVALUATION_RULES, problems)
    _check("model.", model, _MODEL_RULES, problems)
    lora = model.get("lora")
    if lora is not None:
        _check("model.lora.", plain_dict(lora), _LORA_RULES, problems)
    low, high = model.get("min_new_tokens"), model.get("max_new_tokens")
    if isinstance(low, int) and isinstance(high, int) and 1 <= high < low:
        problems.append(f"model.min_new_tokens = {low}: must be <= model.max_new_tokens ({high})")
    for reward, weight in (model.get("rewards") or {}).items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            problems.append(f"model.rewards.{reward} = {weight!r}: must be a finite number")
    _check("data.", data, _DATA_RULES, problems)
    synthetic = data.get("synthetic")
    if synthetic is not None:
        _check("data.synthetic.", plain_dict(synthetic), _SYNTHETIC_RULES, problems)
    if augmentation:
        _augmentation_problems(augmentation, problems)
    return problems


def check_settings(model: Any = None, data: Any = None, augmentation: Any = None, evaluation: Any = None) -> None:
    """Raise one `SettingsError` listing every out-of-range setting; nothing when all are in range.

    A renamed key is refused on its own, naming the new key, rather than counted as out of range."""
    renamed = _renamed_problems(plain_dict(augmentation))
    if renamed:
        raise SettingsError("; ".join(renamed))
    problems = settings_problems(model, data, augmentation, evaluation)
    if problems:
        raise SettingsError(f"{len(problems)} setting(s) out of range: " + "; ".join(problems))
