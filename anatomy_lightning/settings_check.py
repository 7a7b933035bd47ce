"""Range checks for every numeric setting and choice checks for every setting with a fixed set of
values (loss_type, scale_rewards, lr_schedule, curriculum.mode, ...), run by the CLI before any data
is read or model is built.

Why up front: a nonsense value otherwise surfaces minutes later as a library traceback
("probability tensor contains inf/nan" for temperature 0), as a misleading message ("no training
questions" for val_fraction 1.5), or not at all (a negative beta trains without complaint); a
misspelt choice (loss_type: dapo2) surfaced only after the model loaded, one at a time. Every
problem is collected and reported in one error, each naming the setting and the value found, so a
config is fixed in one round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from anatomy_lightning.settings import Rule as _Rule
from anatomy_lightning.settings import SettingsError, plain_dict, range_problems

__all__ = ["SettingsError", "check_settings", "settings_problems"]

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


# (setting, its choices, what else is accepted); the choices come from the module that acts on the
# setting, imported when a section is checked (those modules import torch, some import this one)
_Choice = tuple[str, tuple[Any, ...], str]


def _model_choices() -> tuple[_Choice, ...]:
    from anatomy_lightning.grpo.advantages import SCALE_REWARDS
    from anatomy_lightning.grpo.loss import IMPORTANCE_SAMPLING_LEVELS, LOSS_AGGREGATIONS
    from anatomy_lightning.models.loading import DTYPES, OPTIMIZERS, QUANTIZATIONS
    from anatomy_lightning.optimization import LR_SCHEDULES

    return (
        ("loss_type", tuple(LOSS_AGGREGATIONS), ""),
        ("scale_rewards", (*SCALE_REWARDS, True, False), " (true = group, false = none)"),
        ("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS, ""),
        ("lr_schedule", LR_SCHEDULES, ""),
        ("optimizer", OPTIMIZERS, " (or the CLI's --optimizer for any torch optimizer)"),
        ("quantization", QUANTIZATIONS, ", or null"),
        ("dtype", DTYPES, ""),
    )


def _data_choices() -> dict[str, tuple[_Choice, ...]]:
    from anatomy_lightning.data.loader import FORMATS
    from anatomy_lightning.data.prompts import PROMPTS
    from anatomy_lightning.data.settings import ON_BAD_RECORD, TEST_SPLITS
    from anatomy_lightning.data.stages import STAGINGS
    from anatomy_lightning.data.synthetic import BENCHMARKS

    return {
        "data.": (("format", FORMATS, ""), ("prompt", PROMPTS, ""), ("on_bad_record", ON_BAD_RECORD, ""),
                  ("test_split", TEST_SPLITS, ", or null")),
        "data.similarity.": (("stages", STAGINGS, ""),),
        "data.synthetic.": (("benchmark", BENCHMARKS, ""),),
    }


def _curriculum_choices() -> tuple[_Choice, ...]:
    from anatomy_lightning.callbacks.curriculum import MODES, PACINGS

    return (("mode", MODES, ""), ("pacing", PACINGS, ""))


def _is_one_of(value: Any, choices: tuple[Any, ...]) -> bool:
    """`value` is one of `choices`; booleans match booleans only (1 is not `True`, "true" is not either)."""
    return any(type(value) is type(c) and value == c for c in choices)


def _check_choices(prefix: str, section: Mapping[str, Any], rules: tuple[_Choice, ...], problems: list[str]) -> None:
    for name, choices, also in rules:
        value = section.get(name)
        if value is not None and not _is_one_of(value, choices):
            problems.append(f"{prefix}{name} = {value!r}: must be one of {list(choices)}{also}")


def _data_choice_problems(data: Mapping[str, Any], problems: list[str]) -> None:
    """data.format / prompt / on_bad_record / test_split, data.similarity.aggregation / stages,
    data.synthetic.benchmark / kinds."""
    from anatomy_lightning.data.similarity import AGGREGATIONS, check_aggregation
    from anatomy_lightning.data.synthetic import KINDS

    sections = {"data.": data, "data.similarity.": plain_dict(data.get("similarity")),
                "data.synthetic.": plain_dict(data.get("synthetic"))}
    for prefix, rules in _data_choices().items():
        _check_choices(prefix, sections[prefix], rules, problems)
    aggregation = sections["data.similarity."].get("aggregation")
    if aggregation is not None:
        try:
            check_aggregation(aggregation)  # also takes the old names "mean" / "max"
        except ValueError:
            problems.append(f"data.similarity.aggregation = {aggregation!r}: must be one of {list(AGGREGATIONS)}")
    kinds = sections["data.synthetic."].get("kinds")
    if kinds is not None:
        listed = list(kinds) if isinstance(kinds, (list, tuple)) else [kinds]
        if not listed or any(k not in KINDS for k in listed):
            problems.append(f"data.synthetic.kinds = {listed!r}: must be a non-empty subset of {list(KINDS)}")


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
    problems.extend(range_problems(prefix, section, rules))


def settings_problems(
    model: Any = None, data: Any = None, augmentation: Any = None, evaluation: Any = None, curriculum: Any = None
) -> list[str]:
    """Every out-of-range setting, and every setting that is not one of its choices, of the given
    sections, as "section.key = value: must be ..."."""
    model, data, augmentation = plain_dict(model), plain_dict(data), plain_dict(augmentation)
    problems: list[str] = []
    from anatomy_lightning.grpo.evaluation import EVALUATION_RULES

    _check("evaluation.", plain_dict(evaluation), EVALUATION_RULES, problems)
    if model:
        _check_choices("model.", model, _model_choices(), problems)
    if data:
        _data_choice_problems(data, problems)
    curriculum = plain_dict(curriculum)
    if curriculum:
        _check_choices("curriculum.", curriculum, _curriculum_choices(), problems)
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


def check_settings(
    model: Any = None, data: Any = None, augmentation: Any = None, evaluation: Any = None, curriculum: Any = None
) -> None:
    """Raise one `SettingsError` listing every out-of-range setting and every value that is not one of
    its setting's choices; nothing when all are valid.

    A renamed key is refused on its own, naming the new key, rather than counted as out of range."""
    renamed = _renamed_problems(plain_dict(augmentation))
    if renamed:
        raise SettingsError("; ".join(renamed))
    problems = settings_problems(model, data, augmentation, evaluation, curriculum)
    if problems:
        raise SettingsError(f"{len(problems)} setting(s) out of range: " + "; ".join(problems))
