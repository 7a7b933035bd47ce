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
    ("delta", lambda v: v > 1, "> 1, or null (off)"),
    ("sapo_temperature_pos", lambda v: v > 0, "> 0 (sapo's gate divides by it)"),
    ("sapo_temperature_neg", lambda v: v > 0, "> 0 (sapo's gate divides by it)"),
    ("vespo_k_pos", lambda v: v >= 0, ">= 0 (a negative power would boost tiny importance weights)"),
    ("vespo_k_neg", lambda v: v >= 0, ">= 0 (a negative power would boost tiny importance weights)"),
    ("vespo_lambda_pos", lambda v: v > 0, "> 0 (TRL would silently raise it to 1e-4)"),
    ("vespo_lambda_neg", lambda v: v > 0, "> 0 (TRL would silently raise it to 1e-4)"),
    ("num_iterations", lambda v: v >= 1, "an integer >= 1"),
    ("max_resample_times", lambda v: v >= 0, "an integer >= 0"),
    ("soft_max_length", lambda v: v >= 1, "an integer >= 1, or null (= model.max_new_tokens)"),
    ("soft_cache_length", lambda v: v >= 0, "an integer >= 0, or null"),
    ("ref_model_mixup_alpha", lambda v: 0 <= v <= 1, "in [0, 1] (ref = alpha * policy + (1 - alpha) * ref)"),
    ("ref_model_sync_steps", lambda v: v >= 1, "an integer >= 1 (optimiser steps between syncs)"),
    ("logprob_batch_size", lambda v: v >= 1, "an integer >= 1, or null for all rows at once"),
    ("learning_rate", lambda v: v > 0, "> 0"),
    ("vit_lr", lambda v: v > 0, "> 0, or null (model.learning_rate)"),
    ("aligner_lr", lambda v: v > 0, "> 0, or null (model.learning_rate)"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("warmup_steps", lambda v: v >= 0, "an integer >= 0"),
    ("min_pixels", lambda v: v >= 1, "an integer >= 1, or null"),
    ("max_pixels", lambda v: v >= 1, "an integer >= 1, or null"),
    ("max_prompt_length", lambda v: v >= 1, "an integer >= 1, or null (the model's context minus max_new_tokens)"),
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
    from anatomy_lightning.grpo.advantages import ADVANTAGE_ESTIMATORS, MULTI_OBJECTIVE_AGGREGATIONS, SCALE_REWARDS
    from anatomy_lightning.grpo.loss import IMPORTANCE_SAMPLING_LEVELS, LOSS_AGGREGATIONS
    from anatomy_lightning.grpo.preflight import TRUNCATION_STRATEGIES
    from anatomy_lightning.models.loading import DTYPES, OPTIMIZERS, QUANTIZATIONS
    from anatomy_lightning.optimization import LR_SCHEDULES

    return (
        ("loss_type", tuple(LOSS_AGGREGATIONS), ""),
        ("scale_rewards", (*SCALE_REWARDS, True, False), " (true = group, false = none)"),
        ("advantage_estimator", ADVANTAGE_ESTIMATORS, ""),
        ("multi_objective_aggregation", MULTI_OBJECTIVE_AGGREGATIONS, ""),
        ("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS, ""),
        ("lr_schedule", LR_SCHEDULES, ""),
        ("optimizer", OPTIMIZERS, " (or the CLI's --optimizer for any torch optimizer)"),
        ("quantization", QUANTIZATIONS, ", or null"),
        ("dtype", DTYPES, ""),
        ("truncation_strategy", TRUNCATION_STRATEGIES, " (prompts are never cut: image tokens must stay whole)"),
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _loss_knob_problems(model: Mapping[str, Any], problems: list[str]) -> None:
    """Loss settings that are in range alone but wrong together: `delta` at or below the clip
    range's top (it would never act on a negative-advantage token; TRL recommends > 1 + epsilon_high),
    `delta` with a loss_type that ignores it, cispo's eps_max (= epsilon_high) below 1."""
    from anatomy_lightning.grpo.loss import TWO_SIDED_CLIP_LOSS_TYPES

    loss_type, delta, high = model.get("loss_type"), model.get("delta"), model.get("epsilon_high")
    if _is_number(delta) and _is_number(high) and delta > 1 and delta <= 1 + high:
        problems.append(f"model.delta = {delta!r}: must be > 1 + model.epsilon_high ({1 + high:g}), or null (off)")
    if delta is not None and isinstance(loss_type, str) and loss_type not in TWO_SIDED_CLIP_LOSS_TYPES:
        problems.append(f"model.delta = {delta!r}: acts only on loss_type {', '.join(TWO_SIDED_CLIP_LOSS_TYPES)} "
                        f"(model.loss_type = {loss_type!r}); set it to null")
    if loss_type == "cispo" and _is_number(high) and high < 1:
        problems.append(f"model.epsilon_high = {high!r}: must be >= 1 with model.loss_type = 'cispo' (there it is "
                        "eps_max, the cap on the importance ratio itself; ScaleRL uses 5.0)")


def reward_knob_problems(model: Mapping[str, Any]) -> list[str]:
    """Advantage / reward / reference settings that are in range alone but wrong together, as TRL and
    ms-swift refuse them: sync_ref_model without a reference (beta 0) or with LoRA (the reference is
    the adapter-off policy, no separate copy to mix), the soft_overlong reward without
    soft_cache_length, and a cache not shorter than soft_max_length. `GRPOModule` calls it again
    with `lora` and `rewards`, which its first check leaves out."""
    problems = []
    if model.get("sync_ref_model"):
        beta, lora = model.get("beta"), model.get("lora")
        if _is_number(beta) and beta == 0:
            problems.append("model.sync_ref_model = True: needs model.beta > 0; with beta 0 there is no reference "
                            "model to sync (TRL refuses this too)")
        if lora is not None and lora is not False:
            problems.append("model.sync_ref_model = True: full fine-tuning only; with LoRA/QLoRA the reference is the "
                            "policy with its adapter off, there is no separate copy to mix (TRL refuses this too)")
    rewards = model.get("rewards") or {}
    cache, longest = model.get("soft_cache_length"), model.get("soft_max_length")
    if longest is None:
        longest = model.get("max_new_tokens")
    if "soft_overlong" in rewards and cache is None:
        problems.append("model.soft_cache_length = None: must be set when model.rewards has soft_overlong (the last "
                        "tokens before soft_max_length over which the punishment grows from 0 to -1)")
    if _is_number(cache) and _is_number(longest) and cache >= longest >= 1:
        problems.append(f"model.soft_cache_length = {cache!r}: must be < model.soft_max_length ({longest}; "
                        "null means model.max_new_tokens)")
    return problems


def _vision_problems(model: Mapping[str, Any], problems: list[str]) -> None:
    """freeze_vit / freeze_aligner / freeze_llm / vit_lr / aligner_lr against each other and against LoRA:
    an lr for a part that does not train, freeze keys with a regex LoRA target (the regex alone picks
    the modules), `lora.include_vision` against freeze_vit / freeze_aligner true, nothing left to train.
    Without a `lora` key (GRPOModule from Python) only what holds with and without LoRA is checked."""
    from anatomy_lightning.models.parts import LoraSettings, resolve_frozen

    given = {k: model.get(k) for k in ("freeze_vit", "freeze_aligner", "freeze_llm")}
    bad = [f"model.{k} = {v!r}: must be true or false" + (", or null" if k != "freeze_llm" else "")
           for k, v in given.items() if v is not None and not isinstance(v, bool)]
    if bad:
        problems.extend(bad)
        return
    try:
        lora = LoraSettings.coerce(model.get("lora"))
    except (TypeError, ValueError):
        return  # an unreadable lora setting is refused where the module reads it
    known = "lora" in model
    if lora is not None and isinstance(lora.target_modules, str):
        problems.extend(f"model.{k} = {v!r}: model.lora.target_modules is a regex, which alone picks the adapted "
                        f"modules; set {k} to {'false' if k == 'freeze_llm' else 'null'}, or target_modules to null "
                        "or a list of names" for k, v in given.items() if v is not None and (v or k != "freeze_llm"))
        return
    if lora is not None and lora.include_vision and lora.target_modules is not None:
        problems.extend(f"model.{k} = True contradicts model.lora.include_vision = true (the target list may match "
                        "the vision side); drop one of them" for k in ("freeze_vit", "freeze_aligner") if given[k])
    keys = ("freeze_vit", "freeze_aligner")
    resolved = resolve_frozen(given["freeze_vit"], given["freeze_aligner"], lora) if known else (
        given["freeze_vit"] is True, given["freeze_aligner"] is True)
    frozen = dict(zip(keys, resolved))
    untrained = known and lora is None and model.get("quantization") is not None  # nothing trains at all
    for key, freeze, part in (("vit_lr", "freeze_vit", "vision tower"), ("aligner_lr", "freeze_aligner", "projector")):
        lr = model.get(key)
        if lr is None:
            continue
        if untrained:
            problems.append(f"model.{key} = {lr!r}: quantization without lora trains no weight; set model.lora "
                            f"or drop {key}")
        elif frozen[freeze]:
            how = "true" if given[freeze] else "null, which with lora means frozen"
            problems.append(f"model.{key} = {lr!r}: the {part} does not train (model.{freeze} is {how}); set "
                            f"model.{freeze}: false or drop {key}")
    if given["freeze_llm"] and frozen["freeze_vit"] and frozen["freeze_aligner"] and not untrained:
        problems.append("model.freeze_llm = True: with the vision tower and projector frozen too (model.freeze_vit, "
                        "model.freeze_aligner; frozen by default with lora) nothing trains; unfreeze one of them")


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
    _loss_knob_problems(model, problems)
    if model:
        _vision_problems(model, problems)
    problems += reward_knob_problems(model)
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
