"""The fingerprint of a run: what must match for a checkpoint to resume meaningfully (data files,
synthetic settings, stages, group size, model and LoRA shape), and the check that a checkpoint's
weights fit the model built now."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["FINGERPRINT_ENV", "check_weights_fit", "fingerprint_differences", "run_fingerprint"]

FINGERPRINT_ENV = "ANATOMY_LIGHTNING_ALLOW_FINGERPRINT_CHANGE"
_DATA_KEYS = ("num_stages", "val_fraction", "max_val_questions", "seed")
_MODEL_KEYS = ("model", "quantization", "num_generations")
_LORA_KEYS = ("r", "alpha", "target_modules", "include_vision")
_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha1: each file hashed once


def _plain(obj: Any) -> Any:
    """`obj` as dicts/lists/strings/numbers (dataclasses and Namespaces included), loadable with weights_only."""
    if hasattr(obj, "__dataclass_fields__"):
        obj = {name: getattr(obj, name) for name in obj.__dataclass_fields__}
    elif hasattr(obj, "as_dict"):
        obj = obj.as_dict()
    return json.loads(json.dumps(obj, default=str))


def _file_identity(path: str) -> dict[str, Any]:
    """Name, size and content hash of a data file (a folder or a missing file: just the name)."""
    if not os.path.isfile(path):
        return {"name": os.path.basename(os.path.normpath(path)), "size": None, "sha1": None}
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return {"name": os.path.basename(path), "size": stat.st_size, "sha1": _HASHES[key]}


def run_fingerprint(datamodule: Any, module: Any) -> dict[str, Any]:
    """What makes a resume meaningful, as a flat {setting: value} dict.

    Data files enter by name, size and content hash (not by folder, so a moved run still matches);
    evaluation-only knobs and the test file stay out, so they can change between runs.
    """
    data = dict(getattr(datamodule, "hparams", None) or {})
    model = dict(getattr(module, "hparams", None) or {})
    fp: dict[str, Any] = {}
    for key in ("train_file", "val_file"):
        if data.get(key):
            fp[f"data.{key}"] = _file_identity(str(data[key]))
    if data.get("synthetic") is not None:
        fp["data.synthetic"] = {k: v for k, v in _plain(data["synthetic"]).items() if k != "out_dir"}
    fp.update({f"data.{k}": _plain(data[k]) for k in _DATA_KEYS if k in data})
    for key in _MODEL_KEYS:
        if key in model:
            value = model[key]
            # a local model folder enters by its name, so the run survives moving it
            moved_ok = key == "model" and os.path.isdir(str(value))
            fp[f"model.{key}"] = os.path.basename(os.path.normpath(value)) if moved_ok else _plain(value)
    if "lora" in model:
        lora = _plain(model["lora"])
        fp["model.lora"] = {k: lora.get(k) for k in _LORA_KEYS} if isinstance(lora, dict) else lora
    return fp


def _show(value: Any) -> str:
    if isinstance(value, dict) and set(value) == {"name", "size", "sha1"}:
        return f"{value['name']} ({value['size']} bytes, sha1 {str(value['sha1'])[:10]})"
    return json.dumps(value, sort_keys=True)


def fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """"setting: checkpoint value -> this run's value" for every setting that differs."""
    return [
        f"{key}: {_show(saved.get(key))} -> {_show(current.get(key))}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


def _describe_model(hparams: Mapping[str, Any]) -> str:
    lora = hparams.get("lora")
    lora = _plain(lora) if lora is not None else None
    shape = f"LoRA r={lora.get('r')}" if isinstance(lora, dict) else "no LoRA"
    return f"{hparams.get('model')!r} ({shape}, quantization {hparams.get('quantization')})"


def check_weights_fit(module: torch.nn.Module, checkpoint: Mapping[str, Any],
                      own: Mapping[str, Any] | None = None) -> None:
    """Raise a one-line ValueError when the checkpoint's weights do not fit `module`, naming the
    model the checkpoint was trained for (from its hyperparameters) and the one built now.

    Called before the weights are loaded: otherwise a size mismatch is a long torch traceback, and
    a checkpoint of a LoRA run loaded into a full model (or the reverse) matches no name and, with
    non-strict loading, would be evaluated with untrained weights without a word. (ModelParallelStrategy
    loads the weights itself, before any hook: there it runs right after, before any step or evaluation.)
    `own`: the module's tensors by name (default `module.state_dict()`).
    """
    saved = checkpoint.get("state_dict") or {}
    own = module.state_dict() if own is None else own
    unknown = [k for k in saved if k not in own]
    wrong = [k for k in saved if k in own and getattr(saved[k], "shape", None) != getattr(own[k], "shape", None)]
    if not unknown and not wrong:
        return
    if wrong:
        example = f"{wrong[0]} is {tuple(saved[wrong[0]].shape)} in the checkpoint, {tuple(own[wrong[0]].shape)} here"
    else:
        example = f"{unknown[0]} is not a weight of this model"
    trained = _describe_model(checkpoint.get("hyper_parameters") or {})
    here = _describe_model(dict(getattr(module, "hparams", None) or {}))
    raise ValueError(
        f"this checkpoint was trained for model {trained}; this run builds {here}: {len(wrong)} weights differ in "
        f"shape and {len(unknown)} are unknown here (e.g. {example}); use the checkpoint's model settings or a "
        "checkpoint of this model"
    )
