"""`GroupSignalLogger` (the invalid ratio of every run, split into all-wrong and all-right groups)
and `CompletionBudget` (stop on sampled completions) as callbacks, on scripted module outputs."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from anatomy_lightning.callbacks.budget import CompletionBudget
from anatomy_lightning.callbacks.group_signal import GroupSignalLogger
from anatomy_lightning.data.schema import Question


class _Module:
    def __init__(self, completions_total: int = 0) -> None:
        self.logged: dict[str, float] = {}
        self.completions_total = completions_total

    def log_dict(self, metrics: dict[str, float], **kwargs: Any) -> None:
        self.logged.update(metrics)


def _questions(*golds: str) -> list[Question]:
    return [Question(id=f"q{i}", question="?", options=[g, "Other"], answer_index=0) for i, g in enumerate(golds)]


def test_signal_logger_splits_no_signal_groups_and_reads_the_scheduled_batch() -> None:
    trained = _questions("Liver", "Gut")
    scheduled = _questions("Liver", "Gut", "Gut")
    outputs = {
        "group_rewards": torch.tensor([[0.0, 1.2], [1.2, 0.0]]),  # what was trained on: all with signal
        "questions": trained,
        # dynamic sampling replaced two no-signal groups: one all wrong (Liver), one all right (Gut)
        "sampled_group_rewards": torch.tensor([[0.2, 0.2], [1.2, 1.2], [0.0, 1.2]]),
        "sampled_questions": scheduled,
    }
    module = _Module()
    GroupSignalLogger().on_train_batch_end(None, module, outputs, trained, 0)
    assert module.logged == pytest.approx({
        "signal/invalid_gradient_ratio": 2 / 3, "signal/invalid_gradient_ratio/Gut": 1 / 2,
        "signal/invalid_gradient_ratio/Liver": 1.0,
        "signal/invalid_all_wrong": 1 / 3, "signal/invalid_all_wrong/Gut": 0.0, "signal/invalid_all_wrong/Liver": 1.0,
        "signal/invalid_all_right": 1 / 3, "signal/invalid_all_right/Gut": 1 / 2,
        "signal/invalid_all_right/Liver": 0.0,
    })
    module = _Module()  # without dynamic sampling: the trained batch itself
    GroupSignalLogger().on_train_batch_end(None, module, {k: outputs[k] for k in ("group_rewards", "questions")},
                                           trained, 0)
    assert module.logged["signal/invalid_gradient_ratio"] == 0.0
    GroupSignalLogger().on_train_batch_end(None, module := _Module(), None, trained, 0)  # a skipped step
    assert module.logged == {}


def test_completion_budget_stops_once_reached() -> None:
    trainer = SimpleNamespace(should_stop=False, is_global_zero=True, global_step=3)
    CompletionBudget(100).on_train_batch_end(trainer, _Module(99), None, None, 0)
    assert trainer.should_stop is False
    CompletionBudget(100).on_train_batch_end(trainer, _Module(100), None, None, 0)
    assert trainer.should_stop is True
    trainer.should_stop = False
    CompletionBudget(None).on_train_batch_end(trainer, _Module(10**9), None, None, 0)
    assert trainer.should_stop is False
    with pytest.raises(ValueError, match="max_completions must be >= 1"):
        CompletionBudget(0)
