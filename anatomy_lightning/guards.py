"""Refusals and resolutions made before anything is built: `--ckpt_path auto`, and Trainer
strategies `GRPOModule` cannot train under.

`--ckpt_path auto`: a requeue loop (SLURM, preemptible VMs) runs one command for the first start
and for every restart. `--ckpt_path last` stays strict (no checkpoint is an error, so a mistyped
run name never silently starts over); `auto` resumes when this run's checkpoint folder holds a
`last.ckpt` and starts fresh when it does not, and says which. It resumes through `last`, so a
damaged `last.ckpt` is refused exactly as `last` refuses it.

Strategies: the module optimises manually and calls its policy directly (generation, log-probs,
clipping), outside any wrapper, and it shards nothing. Under ModelParallelStrategy every rank trains
its own copy and nothing synchronises the gradients (the ranks end with different weights, exit 0);
FSDP and DeepSpeed wrap a module it then bypasses, and DeepSpeed saves checkpoint folders that our
checkpoint IO and resume checks do not read. DDP keeps a full copy per GPU and averages gradients.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["UNSUPPORTED_STRATEGIES", "check_strategy", "checkpoint_dirs", "resolve_auto_ckpt_path"]

log = logging.getLogger(__name__)

# Strategy classes (and their subclasses) refused by name until the module applies FSDP2 itself
UNSUPPORTED_STRATEGIES = ("ModelParallelStrategy", "FSDPStrategy", "DeepSpeedStrategy")


def _strategy_classes(strategy: Any) -> tuple[str, list[str]]:
    """(how `trainer.strategy` was given, the class names of the Strategy it means and its bases).

    It arrives as a registry alias ("fsdp", "deepspeed_stage_2"), a class path or bare class name
    (a string: jsonargparse does not resolve them), {class_path: ...}, or an instance from Python.
    """
    if hasattr(strategy, "get") and strategy.get("class_path"):
        name = str(strategy.get("class_path"))
    elif isinstance(strategy, str):
        name = strategy
    else:
        return type(strategy).__name__, [c.__name__ for c in type(strategy).__mro__]
    from lightning.pytorch.strategies import StrategyRegistry

    if name.lower() in StrategyRegistry:
        cls = StrategyRegistry[name.lower()]["strategy"]
        return name, [c.__name__ for c in cls.__mro__]
    module, _, attr = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "lightning.pytorch.strategies"), attr)
        return name, [c.__name__ for c in cls.__mro__]
    except (ImportError, AttributeError, TypeError, ValueError):
        return name, [attr]  # Lightning names what it cannot resolve


def check_strategy(strategy: Any) -> None:
    """Raise a one-line ValueError when `trainer.strategy` is one the module does not support."""
    if strategy is None:
        return
    given, names = _strategy_classes(strategy)
    refused = next((n for n in names if n in UNSUPPORTED_STRATEGIES), None)
    if refused is None:
        return
    named = given if given.rsplit(".", 1)[-1] == refused else f"{given} ({refused})"
    raise ValueError(
        f"trainer.strategy={named} is not supported: GRPOModule does not shard its model (FSDP2 support "
        "is planned); use --trainer.strategy=ddp (a full copy per GPU, gradients averaged)"
    )


def checkpoint_dirs(trainer: Any) -> list[Path]:
    """The `dirpath` of every checkpoint callback in the trainer config section: where `last` looks."""
    dirs = []
    for entry in (trainer.get("callbacks") if trainer is not None else None) or []:
        if hasattr(entry, "get") and str(entry.get("class_path", "")).endswith("Checkpoint"):
            dirpath = (entry.get("init_args") or {}).get("dirpath")
            if dirpath:
                dirs.append(Path(str(dirpath)))
    return dirs


def _last_files(folder: Path) -> list[Path]:
    """Files Lightning's `ModelCheckpoint` takes for `last` (stem starting "last", ".ckpt"), last.ckpt first."""
    if not folder.is_dir():
        return []
    names = [n for n in os.listdir(folder) if n.startswith("last") and n.endswith(".ckpt")]
    return [folder / n for n in sorted(names, key=lambda n: (n != "last.ckpt", n))]


def resolve_auto_ckpt_path(subcommand: str, config: Any) -> Any:
    """The subcommand's `ckpt_path`, with "auto" resolved: "last" when this run's checkpoint folder
    holds a last.ckpt, else None (a fresh start), one log line saying which. Other values pass."""
    given = config.get("ckpt_path")
    if given is None or str(given) != "auto":
        return given
    if subcommand != "fit":
        raise ValueError(
            f"--ckpt_path auto is for fit (resume if this run has a checkpoint, else start); {subcommand} "
            "needs a checkpoint: pass its file, or last"
        )
    dirs = checkpoint_dirs(config.get("trainer"))
    if not dirs:
        raise ValueError(
            "--ckpt_path auto needs a checkpoint callback with a dirpath in trainer.callbacks (as in "
            "configs/demo.yaml): without one, a restart cannot find this run's last.ckpt and would start over"
        )
    found = [p for d in dirs for p in _last_files(d)]
    if found:
        log.info("--ckpt_path auto: resuming from %s", found[0])
        return "last"
    log.info("--ckpt_path auto: no last.ckpt in %s yet; starting a fresh run", ", ".join(map(str, dirs)))
    return None
