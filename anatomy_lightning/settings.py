"""Structured settings (LoRA, synthetic data, ...) become their dataclass in one place.

They arrive in many shapes: a YAML mapping, a JSON string on the command line that LightningCLI
hands over as a dict, dotted flags (`--model.lora.r=8`), a jsonargparse namespace, a checkpoint's
saved hyperparameters, `true` for the defaults, or the dataclass itself from Python. Every
constructor that takes one calls `coerce_settings`, so no call site sees a dict by surprise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def coerce_settings(cls: type[T], value: Any, name: str) -> T | None:
    """`value` as a `cls` instance (None stays None); unknown keys are refused naming `name`."""
    if value is None or value is False:
        return None
    if isinstance(value, cls):
        return value
    if value is True:
        return cls()
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if hasattr(value, "items"):  # dict, omegaconf / jsonargparse namespaces
        data = dict(value.items())
        data.pop("class_path", None)
        data = dict(data.pop("init_args", None) or {}, **data)
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"{name}: unknown keys {unknown}; valid keys: {sorted(fields)}")
        return cls(**data)
    raise ValueError(f"{name} must be null, true or a mapping of {sorted(fields)}, got {type(value).__name__} {value!r}")


def plain_dict(section: Any) -> dict[str, Any]:
    """A config section (dict, jsonargparse Namespace, dataclass, None or `true`) as a plain dict."""
    if section is None or isinstance(section, bool):  # `lora: true` = the defaults
        return {}
    if isinstance(section, Mapping):
        return dict(section)
    if hasattr(section, "as_dict"):  # jsonargparse Namespace
        return section.as_dict()
    if dataclasses.is_dataclass(section):
        return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    return dict(vars(section))


class SettingsError(ValueError):
    """One or more settings are out of range; the message lists all of them."""


# (setting, test, what the test demands); a setting that is absent or None is not checked
Rule = tuple[str, Callable[[float], bool], str]


def range_problems(prefix: str, section: Mapping[str, Any], rules: tuple[Rule, ...]) -> list[str]:
    """"<prefix><key> = value: must be ..." for every value of `section` that breaks its rule."""
    problems = []
    for name, ok, demand in rules:
        value = section.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{prefix}{name} = {value!r}: must be a number, {demand}")
        elif not math.isfinite(value) or not ok(value):
            problems.append(f"{prefix}{name} = {value!r}: must be {demand}")
    return problems
