"""Progress a user can read: a step counter in a terminal, plain log lines without one.

`StepProgressBar` counts optimiser steps against `trainer.max_steps` ("step 12/400"), instead of
Lightning's epoch bar ("Epoch 0/-2", which means nothing when a run is measured in steps).
`ProgressLog` writes one plain line every `trainer.log_every_n_steps` optimiser steps when there
is no terminal (nohup, SLURM log files), where a bar would print nothing readable:

    step 20/400 | reward 0.412 | accuracy 0.375 | val/acc 0.350 | kl 0.0123 | 2.31 s/step | ETA 14m 37s

The CLI adds both by default.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

log = logging.getLogger(__name__)


def _isatty() -> bool:
    """Whether stdout (where tqdm draws) is a terminal."""
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"


def _metric(trainer: L.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar counting optimiser steps (`step 12/400`), without `v_num`.

    Only in a terminal: without one, tqdm's carriage returns make a log file unreadable, and
    `ProgressLog` prints plain lines instead.
    """

    @property
    def is_enabled(self) -> bool:
        return super().is_enabled and _isatty()

    def _total_steps(self, trainer: L.Trainer) -> float | None:
        return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        bar.reset(total=self._total_steps(trainer))
        bar.initial = 0
        bar.n = trainer.global_step  # a resumed run continues its count
        bar.set_description("step")
        bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable and bar.n != trainer.global_step:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class ProgressLog(Callback):
    """One plain line every `every_n_steps` optimiser steps: step/max, reward, accuracy (the accuracy
    reward's mean, and the last val/acc), KL, s/step, ETA.

    Args:
        every_n_steps: steps between lines (default: trainer.log_every_n_steps).
        when: "auto" (only without a terminal, or when the progress bar is off), "always" or "never".
    """

    def __init__(self, every_n_steps: int | None = None, when: str = "auto") -> None:
        if when not in ("auto", "always", "never"):
            raise ValueError(f"ProgressLog: when={when!r}; choose auto, always or never")
        self.every_n_steps, self.when = every_n_steps, when
        self._t0: float | None = None
        self._step0 = 0
        self._last_step = -1

    def _active(self, trainer: L.Trainer) -> bool:
        if self.when != "auto":
            return self.when == "always"
        bar = trainer.progress_bar_callback
        return not _isatty() or bar is None or not bar.is_enabled

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._step0, self._last_step = time.perf_counter(), trainer.global_step, trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        step = trainer.global_step
        every = self.every_n_steps or trainer.log_every_n_steps or 1
        if step == self._last_step or step % every or not trainer.is_global_zero or not self._active(trainer):
            return
        self._last_step = step
        print(self.line(trainer), file=sys.stderr, flush=True)

    def line(self, trainer: L.Trainer) -> str:
        step, total = trainer.global_step, trainer.max_steps
        parts = [f"step {step}/{total}" if total and total > 0 else f"step {step}"]
        for label, name, fmt in (
            ("reward", "train/reward", ".3f"),
            ("accuracy", "train/rewards/accuracy/mean", ".3f"),  # the accuracy reward, when it is one
            ("val/acc", "val/acc", ".3f"),  # the last validation
            ("kl", "train/kl", ".4f"),
        ):
            value = _metric(trainer, name)
            if value is not None:
                parts.append(f"{label} {value:{fmt}}")
        if self._t0 is not None and step > self._step0:
            per_step = (time.perf_counter() - self._t0) / (step - self._step0)
            parts.append(f"{per_step:.2f} s/step")
            if total and total > 0:
                parts.append(f"ETA {_duration(per_step * (total - step))}")
        return " | ".join(parts)
