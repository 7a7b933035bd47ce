"""Structured settings (LoRA, synthetic data, ...) become their dataclass in one place.

They arrive in many shapes: a YAML mapping, a JSON string on the command line that LightningCLI
hands over as a dict, dotted flags (`--model.lora.r=8`), a jsonargparse namespace, a checkpoint's
saved hyperparameters, `true` for the defaults, or the dataclass itself from Python. Every
constructor that takes one calls `coerce_settings`, so no call site sees a dict by surprise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
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
