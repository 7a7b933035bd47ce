"""A TensorBoard page that opens on the method: the custom-scalars layout written when `fit` starts.

TensorBoard's Scalars tab sorts sections alphabetically, so `augment/` comes before the reward and
the curriculum. The Custom Scalars tab (`http://localhost:6006/#custom_scalars`) shows this
layout instead, in this order: reward and its spread; validation and test accuracy, overall and per stage;
the curriculum's stage, batch S(q) and per-stage training accuracy; the groups without signal,
all wrong and all right; KL; the augmentation's share and queue. Tags are regular expressions, so
a chart stays empty (not wrong) in a run without the curriculum or the augmentation.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

Chart = list[Any]  # ["Multiline", [tag regex, ...]]

METHOD_LAYOUT: dict[str, dict[str, Chart]] = {
    "1 reward": {
        "reward and its spread within groups": ["Multiline", [r"^train/reward$", r"^train/reward_std$"]],
        "reward per function": ["Multiline", [r"^train/rewards/.*/mean$"]],
    },
    "2 held-out accuracy": {
        "validation, overall and per difficulty stage": ["Multiline", [r"^val/acc$", r"^val/acc_stage_\d+$"]],
        "test runs (one point each), overall and per stage": ["Multiline", [r"^test/acc$", r"^test/acc_stage_\d+$"]],
    },
    "3 curriculum": {
        "stage in play": ["Multiline", [r"^curriculum/stage$"]],
        "batch S(q) (option similarity)": ["Multiline", [r"^curriculum/batch_similarity$"]],
        "training accuracy per stage": ["Multiline", [r"^curriculum/train_acc_stage_\d+$", r"^curriculum/signal_window_acc$"]],
    },
    "4 groups without signal": {
        "share of groups: all wrong / all right": [
            "Multiline", [r"^train/invalid_gradient_ratio$", r"^(signal|train)/invalid_all_(wrong|right)$"],
        ],
        "same-step GDQA: before / after replacement": ["Multiline", [r"^augment/invalid_(before|after)$"]],
    },
    "5 KL": {"KL to the reference": ["Multiline", [r"^train/kl$"]]},
    "6 augmentation": {
        "share of the trained batch that is rewrites": ["Multiline", [r"^augment/batch_share$", r"^augment/replaced$"]],
        "rewrite queue: size, used, dropped": ["Multiline", [r"^augment/(queue_size|used|dropped)$"]],
    },
}


class DashboardLayout(Callback):
    """Writes `METHOD_LAYOUT` to the TensorBoard run when `fit` starts (rank 0; other loggers: nothing)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_custom_scalars(METHOD_LAYOUT)
