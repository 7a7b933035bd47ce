"""`CompletionBudget`: stop training after a number of sampled completions, not of steps.

Compute in GRPO is mostly generation. Arms that sample more per step (dynamic sampling resamples
prompts whose group had no signal) are only comparable with the others at the same number of
generated completions; this callback ends `fit` once the module's `completions_total` (every
rank, every resampling round) reaches the budget. Set `trainer.max_steps` above the steps that
budget needs; the step at which it stopped is logged.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

__all__ = ["CompletionBudget"]

log = logging.getLogger(__name__)


class CompletionBudget(Callback):
    """Stops `fit` when `max_completions` completions have been generated (None: no budget)."""

    def __init__(self, max_completions: int | None = None) -> None:
        if max_completions is not None and max_completions < 1:
            raise ValueError(f"CompletionBudget: max_completions must be >= 1, got {max_completions}")
        self.max_completions = max_completions

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        done = int(getattr(pl_module, "completions_total", 0))
        if self.max_completions is None or done < self.max_completions or trainer.should_stop:
            return
        trainer.should_stop = True
        if trainer.is_global_zero:
            log.info("completion budget reached: %d >= %d at step %d; stopping", done, self.max_completions,
                     trainer.global_step)
