"""Validation, test and predict for `GRPOModule`: greedy answers, accuracy overall and per
difficulty stage (the curriculum promotes on `val/acc_stage_<k>`), the `test` report and the
predictions JSONL. A mixin of Lightning hooks, so `module.py` keeps the training step and its order.

It reads from the module: `rollouts` (built in `configure_model`), `hparams` (sampling settings),
`evaluation` (`EvaluationSettings`), `val_acc`, and `_val_sums` / `_eval_rows` (set in `__init__`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from anatomy_lightning.data.schema import Question
from anatomy_lightning.distributed import gather_objects
from anatomy_lightning.grpo.evaluation import (
    accuracy_by,
    evaluation_rows,
    format_report,
    tally_stage,
    test_banner,
    write_predictions,
)

__all__ = ["GreedyEvaluation"]


class GreedyEvaluation:
    """The validation / test / predict hooks of `GRPOModule` (mixed in before `LightningModule`)."""

    def _evaluate(self, questions: list[Question]) -> list[dict[str, Any]]:
        hp = self.hparams
        ro = self.rollouts.sample(questions, 1, self.evaluation.max_new_tokens or hp.max_new_tokens, do_sample=False,
                                  temperature=hp.temperature, top_p=hp.top_p, top_k=hp.top_k, min_new_tokens=0)
        return evaluation_rows(questions, ro.texts)

    def on_validation_epoch_start(self) -> None:
        stages = int(getattr(getattr(self.trainer, "datamodule", None), "num_stages", 1) or 1)
        self._val_sums = torch.zeros(stages, 2, device=self.device)  # (K, [correct, count])

    def validation_step(self, batch: list[Question], batch_idx: int) -> None:
        for row in self._evaluate(batch):
            self.val_acc.update(float(row["correct"]))
            tally_stage(self._val_sums, row)

    def on_validation_epoch_end(self) -> None:
        self.log("val/acc", self.val_acc, prog_bar=True)  # torchmetrics syncs across ranks and resets
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")  # same numbers on every rank
        self.log_dict({f"val/acc_stage_{k}": sums[k, 0] / sums[k, 1] for k in range(len(sums)) if sums[k, 1] > 0})

    def on_test_epoch_start(self) -> None:
        self._eval_rows = []
        if self.global_rank == 0:
            print(test_banner(self.trainer, self.hparams.model, self.global_step))

    def test_step(self, batch: list[Question], batch_idx: int) -> None:
        self._eval_rows.extend(self._evaluate(batch))

    def on_test_epoch_end(self) -> None:
        rows = [r for part in gather_objects(self._eval_rows) for r in part]
        acc = sum(r["correct"] for r in rows) / max(1, len(rows))
        self.log("test/acc", acc, rank_zero_only=True)
        by = accuracy_by(rows)
        for k, vals in by["stage"].items():
            self.log(f"test/acc_stage_{k}", sum(vals) / len(vals), rank_zero_only=True)
        if self.global_rank == 0:
            path = write_predictions(self._predictions_path(), rows)
            print(format_report(rows, by))
            print(f"predictions: {path}")
        self.test_results = {"acc": acc, "n": len(rows)}

    def _predictions_path(self) -> Path:
        if self.evaluation.predictions_file:
            return Path(self.evaluation.predictions_file)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "predictions.jsonl"

    def on_predict_epoch_start(self) -> None:
        self._eval_rows = []

    def predict_step(self, batch: list[Question], batch_idx: int) -> list[dict[str, Any]]:
        rows = self._evaluate(batch)
        self._eval_rows.extend(rows)
        return rows

    def on_predict_epoch_end(self) -> None:
        rows = [r for part in gather_objects(self._eval_rows) for r in part]
        if self.global_rank == 0:
            print(f"predictions ({len(rows)} questions): {write_predictions(self._predictions_path(), rows)}")
