"""Optimisation settings that are not GRPO maths: weight dtype against precision, the optimiser and
its learning-rate schedule (ours or the CLI's), and gradient clipping under manual optimisation."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from anatomy_lightning.models.loading import build_optimizer
from anatomy_lightning.settings import plain_dict

log = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "linear", "cosine")
# trainer.precision -> the weight dtype it implies ("-true": Lightning casts the module to it)
PRECISION_DTYPE = {"32-true": "float32", "bf16-true": "bfloat16", "16-true": "float16", "64-true": "float64"}


def weight_dtype(dtype: str, precision: str | None) -> str:
    """model.dtype checked against trainer.precision: "auto" takes a "-true" precision's dtype (else
    stays "auto": the checkpoint's own), an explicit dtype that a "-true" precision contradicts is refused."""
    implied = PRECISION_DTYPE.get(str(precision))
    if implied is None:
        return dtype
    if dtype == "auto":
        return implied
    if dtype != implied:
        raise ValueError(
            f"model.dtype={dtype} but trainer.precision={precision} casts the weights to {implied}; "
            "set one of them (model.dtype: auto follows trainer.precision)"
        )
    return dtype



def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int | None) -> float:
    """Multiplier of the base learning rate for optimiser step `step` (0-based).

    Warmup: (step + 1) / (warmup + 1) for the first `warmup_steps` steps (the first step already
    learns). Then "constant" stays at 1; "linear" and "cosine" decay to 0 at `total_steps`
    (trainer.max_steps) as Hugging Face's `get_linear_schedule_with_warmup` /
    `get_cosine_schedule_with_warmup` do.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if not total_steps or total_steps <= 0:
        raise ValueError(f"model.lr_schedule={schedule!r} decays to 0 at trainer.max_steps; set trainer.max_steps")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# parameter group name -> the model setting of its own learning rate (None: the optimiser's, model.learning_rate)
GROUP_LR = {"language_model": None, "vision_tower": "vit_lr", "projector": "aligner_lr"}


def parameter_groups(model: Any, vit_lr: float | None = None, aligner_lr: float | None = None) -> list[Any]:
    """The trainable parameters as the optimiser takes them.

    Neither vit_lr nor aligner_lr set: one plain list, one group (as before, so older checkpoints'
    optimiser states still fit). Either set: a named group per part that trains, the language model's
    first (it takes the optimiser's lr: model.learning_rate, or --optimizer's), then the vision tower
    (lr vit_lr) and the projector (lr aligner_lr; a None lr is the optimiser's). Weight decay is every
    group's, and our schedule multiplies each group's own base lr.
    """
    if vit_lr is None and aligner_lr is None:
        return [p for p in model.parameters() if p.requires_grad]
    from anatomy_lightning.models.families import family_of
    from anatomy_lightning.models.loading import has_adapter
    from anatomy_lightning.models.parts import trainable_by_part

    parts = trainable_by_part(model, family_of(model))
    lrs = {"vision_tower": vit_lr, "projector": aligner_lr}
    for part, lr in lrs.items():
        if lr is not None and not parts[part]:
            raise ValueError(
                f"model.{GROUP_LR[part]} = {lr:g}, but no weight of the {part.replace('_', ' ')} trains (frozen by "
                f"model.freeze_{'vit' if part == 'vision_tower' else 'aligner'}, the default with lora, or no "
                f"{'adapter' if has_adapter(model) else 'weight'} there); unfreeze it or drop {GROUP_LR[part]}"
            )
    groups = []
    for part, pairs in parts.items():
        if pairs:
            group: dict[str, Any] = {"params": [p for _, p in pairs], "name": part}
            if lrs.get(part) is not None:
                group["lr"] = lrs[part]
            groups.append(group)
    return groups


def configure_optimization(
    params: list[Any], *, optimizer: str, learning_rate: float, weight_decay: float,
    lr_schedule: str, warmup_steps: int, max_steps: int | None,
    cli_optimizer: dict[str, Any] | None = None, cli_lr_scheduler: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Lightning's optimiser dict: ours from the model settings, or the CLI's --optimizer /
    --lr_scheduler (which replace them, and the log says so); the schedule steps once per optimiser step.

    `params`: parameters, or the groups of `parameter_groups` (a group's own lr wins over both optimisers')."""
    from lightning.pytorch.cli import instantiate_class

    if cli_optimizer:
        if not params:
            raise ValueError("--optimizer got no parameters: nothing is trainable (set lora, or drop quantization)")
        opt = instantiate_class(params, plain_dict(cli_optimizer))
        log.info(
            "optimizer %s from --optimizer (lr %g); model.optimizer, model.learning_rate and "
            "model.weight_decay are not used%s", type(opt).__name__, opt.param_groups[0]["lr"], _group_lrs(opt),
        )
    else:
        opt = build_optimizer(optimizer, params, lr=learning_rate, weight_decay=weight_decay)
        if len(opt.param_groups) > 1:
            log.info("optimizer parameter groups: %s", _group_lrs(opt).removeprefix("; "))
    if cli_lr_scheduler:
        sched = instantiate_class(opt, plain_dict(cli_lr_scheduler))
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError(
                "--lr_scheduler ReduceLROnPlateau is not supported: the scheduler is stepped once per "
                "optimizer step, with no metric; use a step-based scheduler or model.lr_schedule"
            )
        log.info(
            "learning-rate schedule %s from --lr_scheduler, stepped once per optimizer step; "
            "model.lr_schedule and model.warmup_steps are not used", type(sched).__name__,
        )
    else:
        warmup = max(0, warmup_steps)
        lr_factor(warmup, lr_schedule, warmup, max_steps)  # refuse a decay without max_steps now, not at step N
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, lr_schedule, warmup, max_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _group_lrs(opt: torch.optim.Optimizer) -> str:
    """"; <group> lr <lr> (<n> tensors)" per named group (nothing for one unnamed group)."""
    named = [g for g in opt.param_groups if "name" in g]
    return "".join(f"; {g['name']} lr {g['lr']:g} ({len(g['params'])} tensors)" for g in named)


def clip_gradients(opt: torch.optim.Optimizer, clip_val: float | None, algorithm: str) -> float:
    """Total gradient norm (before clipping), clipped by trainer.gradient_clip_val / _algorithm."""
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if not params:
        return 0.0
    if algorithm == "value":
        norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
        if clip_val is not None:
            torch.nn.utils.clip_grad_value_(params, clip_val)
        return norm
    return float(torch.nn.utils.clip_grad_norm_(params, clip_val or float("inf")))


def gradient_settings(
    accumulate_grad_batches: int = 1, gradient_clip_val: float | None = 1.0, gradient_clip_algorithm: str | None = None,
    num_iterations: int = 1,
) -> tuple[int, float | None, str]:
    """(accumulation, clip value or None, clip algorithm) from the Trainer's knobs, checked.

    `gradient_clip_val` None or 0: no clipping, as in Lightning.
    """
    if int(accumulate_grad_batches) < 1:
        raise ValueError(f"trainer.accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
    if accumulate_grad_batches > 1 and num_iterations > 1:
        raise ValueError(
            f"trainer.accumulate_grad_batches={accumulate_grad_batches} with model.num_iterations="
            f"{num_iterations}: mu > 1 steps the optimiser several times on one rollout, "
            "accumulation waits for several rollouts; use one of them"
        )
    algorithm = gradient_clip_algorithm or "norm"
    if algorithm not in ("norm", "value"):
        raise ValueError(f"trainer.gradient_clip_algorithm={algorithm!r}; choose norm or value")
    if gradient_clip_val is not None and gradient_clip_val < 0:
        raise ValueError(f"trainer.gradient_clip_val must be >= 0, got {gradient_clip_val}")
    return int(accumulate_grad_batches), gradient_clip_val or None, algorithm


RESUMED_SETTINGS = ("optimizer", "learning_rate", "weight_decay", "lr_schedule", "warmup_steps", "vit_lr", "aligner_lr")


def apply_resumed_settings(checkpoint: dict[str, Any], hparams: Any, trainer: Any, cli_optimizers: Any = None) -> None:
    """A resume (`fit --ckpt_path`) whose model.learning_rate / weight_decay / lr_schedule / warmup_steps /
    vit_lr / aligner_lr differ from the checkpoint's applies the new values (each parameter group its own
    lr) and says so in one log line; a different model.optimizer is refused (its state cannot feed another
    optimiser class), and so is setting or clearing vit_lr / aligner_lr (the parameter groups would differ).

    Called from `on_load_checkpoint`, before Lightning loads the optimiser and scheduler state from this
    same dict: editing the dict is what makes the new values survive that load (it would otherwise
    silently put the checkpoint's rate back). With the CLI's --optimizer / --lr_scheduler these model
    settings are not used, so nothing is compared."""
    saved = checkpoint.get("hyper_parameters") or {}
    states = checkpoint.get("optimizer_states") or []
    fitting = trainer is not None and trainer.state.fn == "fit"  # test / predict restore no optimiser
    if not (fitting and states) or cli_optimizers:
        return
    changed = {k: (saved[k], hparams[k]) for k in RESUMED_SETTINGS if k in saved and saved[k] != hparams.get(k)}
    groups = states[0].get("param_groups", [])
    grouped = hparams.get("vit_lr") is not None or hparams.get("aligner_lr") is not None
    if grouped != any("name" in g for g in groups):  # see `parameter_groups`
        now = ", ".join(f"model.{k} = {_shown(hparams.get(k))}" for k in ("vit_lr", "aligner_lr"))
        raise ValueError(
            f"resume: {now}, but the checkpoint's optimizer state has "
            + ("one parameter group (vit_lr and aligner_lr were null); resume with both null" if grouped else
               "a group per part (vit_lr or aligner_lr was set); resume with it set")
            + ", or start a new run (without --ckpt_path)"
        )
    if not changed:
        return
    if "optimizer" in changed:
        old, new = changed["optimizer"]
        raise ValueError(
            f"resume: model.optimizer is {new} but the checkpoint's optimizer state is {old}'s; resume with "
            f"model.optimizer={old}, or start a new run (without --ckpt_path) to change the optimizer"
        )
    scheds = checkpoint.get("lr_schedulers") or [{}]
    step = int(scheds[0].get("last_epoch", 0))
    replaced = []
    if changed.keys() & {"learning_rate", "lr_schedule", "warmup_steps", "vit_lr", "aligner_lr"}:
        replaced.append("learning rate")
        old_lr, new_lr = float(saved.get("learning_rate", hparams["learning_rate"])), float(hparams["learning_rate"])
        factor = lr_factor(step, hparams["lr_schedule"], max(0, int(hparams["warmup_steps"])), trainer.max_steps)
        for group in groups:
            if group.get("name") in GROUP_LR:  # `parameter_groups`: its own lr (vit_lr, aligner_lr) or learning_rate
                own = GROUP_LR[group["name"]]
                base = float(hparams[own]) if own is not None and hparams.get(own) is not None else new_lr
            else:  # groups keep their ratios to model.learning_rate
                base = new_lr * (group.get("initial_lr", old_lr) / old_lr) if old_lr else new_lr
            group["initial_lr"], group["lr"] = base, base * factor
        if "base_lrs" in scheds[0]:  # LambdaLR recomputes lr = base_lr * factor(step) at each step
            scheds[0]["base_lrs"] = [g["initial_lr"] for g in groups]
            scheds[0]["_last_lr"] = [g["lr"] for g in groups]
    if "weight_decay" in changed:
        replaced.append("weight decay")
        for group in groups:  # a group without decay (0) stays without
            if group.get("weight_decay") == changed["weight_decay"][0]:
                group["weight_decay"] = changed["weight_decay"][1]
    what = ", ".join(f"model.{k} {_shown(old)} -> {_shown(new)}" for k, (old, new) in changed.items())
    lr_now = f"; learning rate {groups[0]['lr']:g} at step {step}" if groups and "learning rate" in replaced else ""
    log.info("resume: %s (the checkpoint's optimizer state is kept, its %s replaced%s)", what,
             " and ".join(replaced), lr_now)


def copy_param_group_settings(checkpoint: dict[str, Any], trainer: Any) -> None:
    """For strategies that load the optimiser state themselves, before `on_load_checkpoint` runs
    (ModelParallelStrategy): put the checkpoint's parameter group settings (lr, initial_lr,
    weight_decay..., as `apply_resumed_settings` left them) on the live optimisers, which the
    strategy filled from the same groups before they were edited. Elsewhere Lightning loads the
    edited dict after the hook, which is what this reproduces."""
    if trainer.state.fn != "fit":
        return
    for opt, state in zip(trainer.optimizers, checkpoint.get("optimizer_states") or []):
        for group, saved in zip(opt.param_groups, state.get("param_groups", [])):
            group.update({k: v for k, v in saved.items() if k != "params"})


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
