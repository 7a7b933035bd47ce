"""Refusals and resolutions made before anything is built: `--ckpt_path auto`, and Trainer
strategies `GRPOModule` cannot train under.

`--ckpt_path auto`: a requeue loop (SLURM, preemptible VMs) runs one command for the first start
and for every restart. `--ckpt_path last` stays strict (no checkpoint is an error, so a mistyped
run name never silently starts over); `auto` resumes when this run's checkpoint folder holds a
`last.ckpt` and starts fresh when it does not, and says which. It resumes through `last`, so a
damaged `last.ckpt` is refused exactly as `last` refuses it.

Strategies: the module optimises manually and calls its policy directly (generation, log-probs,
clipping), outside any wrapper. DDP keeps a full copy per GPU and averages gradients. Under
Lightning's ModelParallelStrategy the module shards the policy itself with FSDP2 (`sharding`), over
the data-parallel dimension only (tensor_parallel_size 1), and its checkpoints must be single files
(save_distributed_checkpoint false: rank 0 writes the trainable weights, gathered), which our
checkpoint IO, `--ckpt_path last`, resume checks, `test` and `export` read; Lightning's defaults
(tensor parallel "auto", distributed checkpoint folders) are refused, naming the flags. FSDP (FSDP1)
and DeepSpeed wrap a module the module then bypasses, and DeepSpeed saves checkpoint folders: refused.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["UNSUPPORTED_STRATEGIES", "check_strategy", "checkpoint_dirs", "is_model_parallel", "resolve_auto_ckpt_path"]

log = logging.getLogger(__name__)

# Strategy classes (and their subclasses) refused by name -> why
UNSUPPORTED_STRATEGIES = {
    "FSDPStrategy": "it wraps the model in FSDP1, whose forward GRPOModule bypasses (it calls its policy directly "
                    "for generation and log-probs)",
    "DeepSpeedStrategy": "it wraps the model in an engine GRPOModule bypasses (it calls its policy directly for "
                         "generation and log-probs), and saves checkpoint folders our resume checks do not read",
}
MODEL_PARALLEL = "ModelParallelStrategy"
USE_INSTEAD = ("use --trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy (FSDP2 sharding, applied by "
               "the module; see the README) or --trainer.strategy=ddp (a full copy per GPU, gradients averaged)")


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


def _strategy_setting(strategy: Any, name: str, default: Any) -> Any:
    """A ModelParallelStrategy argument as given: from a config's init_args, an instance, or the default
    (a bare class name or path carries none)."""
    if hasattr(strategy, "get") and strategy.get("class_path"):
        init = strategy.get("init_args") or {}
        value = init.get(name, default) if hasattr(init, "get") else default
        return default if value is None else value
    if isinstance(strategy, str):
        return default
    return getattr(strategy, f"_{name}", default)


def _model_parallel_problems(strategy: Any) -> list[str]:
    """What keeps a ModelParallelStrategy from training GRPOModule: tensor parallelism (the module shards
    with FSDP2 over data-parallel ranks only) and distributed checkpoint folders (our checkpoints are files)."""
    problems = []
    tp = _strategy_setting(strategy, "tensor_parallel_size", "auto")
    if str(tp) != "1":
        problems.append(f"tensor_parallel_size={tp} (GRPOModule has no tensor parallelism: pass "
                        "--trainer.strategy.tensor_parallel_size=1 "
                        "--trainer.strategy.data_parallel_size=<devices x nodes>)")
    if str(_strategy_setting(strategy, "save_distributed_checkpoint", True)).lower() not in ("false", "0"):
        problems.append("save_distributed_checkpoint=true (checkpoint folders, which resume, test and export do not "
                        "read: pass --trainer.strategy.save_distributed_checkpoint=false, one file written by rank 0)")
    return problems


def is_model_parallel(strategy: Any) -> bool:
    """True when `trainer.strategy` is Lightning's ModelParallelStrategy (or a subclass): the module shards."""
    return strategy is not None and MODEL_PARALLEL in _strategy_classes(strategy)[1]


def check_strategy(strategy: Any) -> None:
    """Raise a one-line ValueError when `trainer.strategy` is one the module does not support, or a
    ModelParallelStrategy set up in a way it cannot train under (naming the flags that fix it)."""
    if strategy is None:
        return
    given, names = _strategy_classes(strategy)
    if MODEL_PARALLEL in names:
        problems = _model_parallel_problems(strategy)
        if problems:
            raise ValueError(f"trainer.strategy={given}: " + "; ".join(problems))
        return
    refused = next((n for n in names if n in UNSUPPORTED_STRATEGIES), None)
    if refused is None:
        return
    named = given if given.rsplit(".", 1)[-1] == refused else f"{given} ({refused})"
    raise ValueError(f"trainer.strategy={named} is not supported: {UNSUPPORTED_STRATEGIES[refused]}; {USE_INSTEAD}")


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
