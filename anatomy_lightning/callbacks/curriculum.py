"""`CurriculumCallback`: Anatomical Similarity Curriculum Learning (ASCL) inside `Trainer.fit`.

Training starts on stage 0 (questions whose options are least alike) and is promoted one stage at a
time when accuracy on the current stage reaches `promote_at`, stops improving for `patience`
validations, or the stage has run `max_steps_per_stage` steps. The accuracy read is validation
accuracy (`pacing: adaptive`, the design card's rule) or the training groups' own accuracy on the
current stage (`pacing: signal`: every step's G completions per question, not 96 validation
questions). The callback talks to the DataModule only through `set_active_stages(...)`; the sampler
does the rest.

Modes: `cumulative` trains on stages 0..s; `exclusive` on stage s plus a replay share of earlier
ones; `soft` is cumulative plus a `floor` share of draws from every later stage, so no stage is
ever starved and the mix shifts towards harder stages, ending on the full distribution.

The promotion rule is plain Python (`PromotionRule` + `CurriculumState`) so it can be tested with
scripted metric sequences, without a trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from anatomy_lightning.callbacks.group_signal import gather_groups, scheduled_groups
from anatomy_lightning.data.schema import Question

__all__ = ["CurriculumCallback", "CurriculumState", "PromotionRule", "active_stages"]

log = logging.getLogger(__name__)

MODES = ("cumulative", "exclusive", "soft")
PACINGS = ("adaptive", "fixed", "signal")


@dataclass
class CurriculumState:
    """Where the curriculum is: everything a resumed run needs to continue identically."""

    stage: int = 0
    stage_start_step: int = 0
    best: float | None = None  # best current-stage accuracy seen since the stage began
    stale: int = 0  # validations in a row without improving `best`
    history: list[dict[str, Any]] = field(default_factory=list)
    window: list[float] = field(default_factory=list)  # signal pacing: current-stage accuracy of recent groups

    def promote(self, step: int, reason: str) -> dict[str, Any]:
        """Move to the next stage and reset the per-stage counters; returns the history entry."""
        entry = {"step": step, "from": self.stage, "to": self.stage + 1, "reason": reason}
        self.history.append(entry)
        self.stage, self.stage_start_step, self.best, self.stale = self.stage + 1, step, None, 0
        self.window = []
        return entry

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CurriculumState:
        return cls(**{**state, "history": [dict(h) for h in state.get("history", [])],
                      "window": [float(v) for v in state.get("window", [])]})


@dataclass(frozen=True)
class PromotionRule:
    """When to leave the current stage. `None` switches a criterion off.

    Adaptive pacing promotes on validation (threshold, then patience) or on steps (max_steps);
    signal pacing promotes when the current stage's training accuracy over the last
    `signal_window` groups reaches `promote_at` (or on max_steps); fixed pacing ignores accuracy and
    promotes every `fixed_steps` steps (an ablation baseline). No promotion happens before
    `min_steps_per_stage` steps in a stage, nor from the last stage.
    """

    num_stages: int
    promote_at: float | None = 0.6
    patience: int | None = 2
    max_steps_per_stage: int | None = None
    min_steps_per_stage: int = 0
    pacing: str = "adaptive"
    fixed_steps: int = 100
    signal_window: int = 64

    def observe_groups(self, state: CurriculumState, step: int, stages: list[int], accuracy: list[float]) -> str | None:
        """Signal pacing: record the training groups' accuracy (share of correct completions per
        group) of the current stage; returns the promotion reason or None."""
        if self.pacing != "signal":
            return None
        state.window = (state.window + [a for s, a in zip(stages, accuracy) if s == state.stage])[-self.signal_window :]
        if not self._may_promote(state, step):
            return None
        full = len(state.window) >= self.signal_window
        if full and self.promote_at is not None and sum(state.window) / len(state.window) >= self.promote_at:
            return "signal"
        return self.check_steps(state, step)

    def observe_validation(self, state: CurriculumState, step: int, metric: float | None) -> str | None:
        """Record a validation of the current stage; returns the promotion reason or None.

        A missing metric (no validation questions in this stage) counts as no improvement, so
        patience still moves the curriculum on.
        """
        if self.pacing != "adaptive":
            return None
        improved = metric is not None and (state.best is None or metric > state.best)
        if improved:
            state.best, state.stale = metric, 0
        else:
            state.stale += 1
        if not self._may_promote(state, step):
            return None
        if self.promote_at is not None and metric is not None and metric >= self.promote_at:
            return "threshold"
        if self.patience is not None and state.stale >= self.patience:
            return "patience"
        return self.check_steps(state, step)

    def check_steps(self, state: CurriculumState, step: int) -> str | None:
        """The step-based criteria: `fixed` pacing, or `max_steps_per_stage` under adaptive pacing."""
        if not self._may_promote(state, step):
            return None
        in_stage = step - state.stage_start_step
        if self.pacing == "fixed":
            return "fixed" if in_stage >= self.fixed_steps else None
        if self.max_steps_per_stage is not None and in_stage >= self.max_steps_per_stage:
            return "max_steps"
        return None

    def _may_promote(self, state: CurriculumState, step: int) -> bool:
        return state.stage < self.num_stages - 1 and step - state.stage_start_step >= self.min_steps_per_stage


def active_stages(
    stage: int, mode: str, replay: float, num_stages: int | None = None, floor: float = 0.0
) -> tuple[list[int], list[int], float]:
    """The `set_active_stages` arguments for a stage: (stages, replay_stages, replay_fraction).

    `soft` draws `floor` of the batch from each stage after `stage` (the sampler's replay pool,
    proportional to their sizes), so the later stages are seen from the first step on.
    """
    if mode == "cumulative":
        return list(range(stage + 1)), [], 0.0
    if mode == "soft":
        later = list(range(stage + 1, num_stages or stage + 1))
        return list(range(stage + 1)), later, (min(0.9, floor * len(later)) if later else 0.0)
    earlier = list(range(stage))
    return [stage], earlier, (replay if earlier else 0.0)


class CurriculumCallback(Callback):
    """Anatomical Similarity Curriculum: promotes difficulty stages on validation accuracy.

    Args:
        enabled: False makes every stage active from the start and nothing else (plain GRPO).
        promote_at: current-stage validation accuracy that promotes (None: off).
        patience: validations without improvement of current-stage accuracy that promote (None: off).
        max_steps_per_stage: steps after which a stage is left regardless of accuracy (None: off).
        min_steps_per_stage: no promotion before this many steps in a stage.
        mode: "cumulative" trains on stages 0..s; "exclusive" on stage s plus a replay share of 0..s-1;
            "soft" on stages 0..s plus a `floor` share of each later stage.
        replay: fraction of each epoch's draws taken from earlier stages (exclusive mode only).
        floor: soft mode: share of draws from each stage not yet reached (0.1 with 3 stages: stage 0
            starts at 80% of the batch, stages 1 and 2 at 10% each).
        pacing: "adaptive" (validation accuracy, the rules above), "signal" (the training groups'
            accuracy on the current stage) or "fixed" (promote every `fixed_steps` steps).
        fixed_steps: steps per stage under fixed pacing.
        signal_window: signal pacing: current-stage groups whose mean accuracy is compared with promote_at.
        correct_reward: signal pacing: a completion with total reward >= this is correct (accuracy
            worth 1 plus a smaller format reward: 1.0).
        monitor: the logged metric read at validation end; `{stage}` is the current stage.
    """

    def __init__(
        self,
        enabled: bool = True,
        promote_at: float | None = 0.6,
        patience: int | None = 2,
        max_steps_per_stage: int | None = None,
        min_steps_per_stage: int = 0,
        mode: str = "cumulative",
        replay: float = 0.1,
        pacing: str = "adaptive",
        fixed_steps: int = 100,
        monitor: str = "val/acc_stage_{stage}",
        floor: float = 0.1,
        signal_window: int = 64,
        correct_reward: float = 1.0,
    ) -> None:
        _validate(
            promote_at, patience, max_steps_per_stage, min_steps_per_stage, mode, replay, pacing, fixed_steps, monitor
        )
        problems = []
        if not 0.0 <= floor < 1.0:
            problems.append(f"floor={floor}: use a share in [0, 1)")
        if signal_window < 1:
            problems.append(f"signal_window={signal_window}: use >= 1")
        if problems:
            raise ValueError("CurriculumCallback: " + "; ".join(problems))
        self.enabled, self.mode, self.replay, self.monitor = enabled, mode, replay, monitor
        self.floor, self.correct_reward = floor, correct_reward
        self._rule_args: dict[str, Any] = {
            "promote_at": promote_at,
            "patience": patience,
            "max_steps_per_stage": max_steps_per_stage,
            "min_steps_per_stage": min_steps_per_stage,
            "pacing": pacing,
            "fixed_steps": fixed_steps,
            "signal_window": signal_window,
        }
        self.state = CurriculumState()
        self.rule: PromotionRule | None = None  # needs the DataModule's num_stages: built in setup
        self._trainer: L.Trainer | None = None

    @property
    def stage(self) -> int:
        return self.state.stage

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.state.history

    # -- wiring --------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING.value:
            return
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not callable(getattr(dm, "set_active_stages", None)) or not hasattr(dm, "num_stages"):
            if not self.enabled:
                return  # nothing to switch on or off
            raise ValueError(
                "CurriculumCallback needs a DataModule with `num_stages` and `set_active_stages(...)` "
                f"(got {type(dm).__name__}); pass datamodule=AnatomyVQADataModule(...) to fit, "
                "or set enabled: false"
            )
        self._trainer = trainer
        self.rule = PromotionRule(num_stages=int(dm.num_stages), **self._rule_args)
        if self.state.stage >= self.rule.num_stages:
            log.warning(
                "curriculum: stage %d from the checkpoint is past data.num_stages=%d; using the last stage",
                self.state.stage,
                self.rule.num_stages,
            )
            self.state.stage = self.rule.num_stages - 1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning restores callback state before on_fit_start for most strategies and after it for
        # some (restore_checkpoint_after_setup); applying here and in load_state_dict covers both
        self._apply()
        if self.enabled:
            log.info("curriculum: training on stage %d of %d (%s)", self.stage, self._num_stages(), self.mode)

    def _num_stages(self) -> int:
        assert self.rule is not None, "CurriculumCallback.setup has not run"
        return self.rule.num_stages

    def _apply(self) -> None:
        if self._trainer is None or self.rule is None:
            return
        k = self._num_stages()
        if self.enabled:
            stages, replay_stages, fraction = active_stages(self.stage, self.mode, self.replay, k, self.floor)
        else:
            stages, replay_stages, fraction = list(range(k)), [], 0.0
        self._trainer.datamodule.set_active_stages(stages, replay_stages, fraction)

    # -- decisions -----------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        trained = outputs.get("questions") if isinstance(outputs, Mapping) else None  # dynamic sampling
        self._log_batch(pl_module, trained if trained is not None else batch)
        if not self.enabled or self.rule is None:
            return
        stages, accuracy = self._group_accuracy(outputs)
        self._log_stage_accuracy(pl_module, stages, accuracy)
        # global_step is identical on every rank and the groups are gathered, so no broadcast is needed
        if self.rule.pacing == "signal":
            reason = self.rule.observe_groups(self.state, trainer.global_step, stages, accuracy)
        else:
            reason = self.rule.check_steps(self.state, trainer.global_step)
        if reason is not None:
            self._promote(trainer, reason, None)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or self.rule is None or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        key = self.monitor.format(stage=self.stage)
        value = trainer.callback_metrics.get(key)
        metric = None if value is None else float(value)
        # the module already reduces across ranks; broadcasting rank 0's value makes the state and
        # the decision identical on every rank even if a metric was logged rank-locally
        metric = trainer.strategy.broadcast(metric, src=0)
        if metric is None and self.rule.pacing == "adaptive":
            log.warning(
                "curriculum: %r was not logged (no validation questions in stage %d?); counting it as no improvement",
                key,
                self.stage,
            )
        reason = self.rule.observe_validation(self.state, trainer.global_step, metric)
        if reason is not None:
            self._promote(trainer, reason, metric)

    def _promote(self, trainer: L.Trainer, reason: str, metric: float | None) -> None:
        entry = self.state.promote(trainer.global_step, reason)
        self._apply()
        detail = f", {self.monitor.format(stage=entry['from'])}={metric:.3f}" if metric is not None else ""
        line = f"curriculum: stage {entry['from']} -> {entry['to']} at step {entry['step']} ({reason}{detail})"
        if trainer.is_global_zero:
            log.info(line)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text("curriculum/promotion", line, global_step=entry["step"])

    def _group_accuracy(self, outputs: Any) -> tuple[list[int], list[float]]:
        """(stage, share of correct completions) of every group the data scheduled, all ranks."""
        if not isinstance(outputs, Mapping):
            return [], []
        questions, rewards = scheduled_groups(outputs)
        if not isinstance(rewards, Tensor) or not isinstance(questions, (list, tuple)) or len(questions) != len(rewards):
            return [], []
        questions, rewards = gather_groups(list(questions), rewards.detach().float().cpu())
        correct = (rewards >= self.correct_reward - 1e-6).float().mean(dim=1).tolist()
        return [int(q.stage or 0) for q in questions], [float(a) for a in correct]

    def _log_stage_accuracy(self, pl_module: L.LightningModule, stages: list[int], accuracy: list[float]) -> None:
        by_stage: dict[int, list[float]] = {}
        for s, a in zip(stages, accuracy):
            by_stage.setdefault(s, []).append(a)
        for s, values in sorted(by_stage.items()):  # identical on every rank (gathered)
            pl_module.log(f"curriculum/train_acc_stage_{s}", sum(values) / len(values), on_step=True,
                          on_epoch=False, batch_size=len(values))
        if self.rule is not None and self.rule.pacing == "signal" and self.state.window:
            pl_module.log("curriculum/signal_window_acc", sum(self.state.window) / len(self.state.window),
                          on_step=True, on_epoch=False, batch_size=len(self.state.window))

    def _log_batch(self, pl_module: L.LightningModule, batch: Any) -> None:
        questions = _questions(batch)
        if self.enabled:
            pl_module.log(
                "curriculum/stage", float(self.stage), on_step=True, on_epoch=False, batch_size=max(1, len(questions))
            )
        sims = [q.similarity for q in questions if q.similarity is not None]
        if sims:
            # this rank's batch (rank 0's is what gets written): no sync_dist, because a collective
            # here would hang if one rank's batch happened to hold no scored questions
            pl_module.log(
                "curriculum/batch_similarity", sum(sims) / len(sims), on_step=True, on_epoch=False, batch_size=len(sims)
            )

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = CurriculumState.from_state_dict(state_dict["state"])
        if self.rule is not None and self.state.stage >= self.rule.num_stages:
            self.state.stage = self.rule.num_stages - 1
        self._apply()  # a no-op until setup has run; on_fit_start applies it again


def _questions(batch: Any) -> list[Question]:
    """The Questions of a training batch (list[Question], or a (questions, ...) pair)."""
    if isinstance(batch, (tuple, list)) and batch and not isinstance(batch[0], Question) and isinstance(batch[0], list):
        batch = batch[0]
    if isinstance(batch, (list, tuple)):
        return [q for q in batch if isinstance(q, Question)]
    return []


def _validate(
    promote_at: float | None,
    patience: int | None,
    max_steps_per_stage: int | None,
    min_steps_per_stage: int,
    mode: str,
    replay: float,
    pacing: str,
    fixed_steps: int,
    monitor: str,
) -> None:
    """Collect every bad setting and raise once, naming each."""
    problems: list[str] = []
    if promote_at is not None and monitor.startswith("val/acc") and not 0.0 <= promote_at <= 1.0:
        problems.append(
            f"promote_at={promote_at}: use an accuracy in [0, 1] (not a percentage), or null to switch it off"
        )
    if patience is not None and patience < 1:
        problems.append(f"patience={patience}: use >= 1, or null to switch it off")
    if max_steps_per_stage is not None and max_steps_per_stage < 1:
        problems.append(f"max_steps_per_stage={max_steps_per_stage}: use >= 1, or null for no limit")
    if min_steps_per_stage < 0:
        problems.append(f"min_steps_per_stage={min_steps_per_stage}: use >= 0")
    if mode not in MODES:
        problems.append(f"mode={mode!r}: use one of {list(MODES)}")
    if not 0.0 <= replay < 1.0:
        problems.append(f"replay={replay}: use a fraction in [0, 1)")
    if pacing not in PACINGS:
        problems.append(f"pacing={pacing!r}: use one of {list(PACINGS)}")
    if fixed_steps < 1:
        problems.append(f"fixed_steps={fixed_steps}: use >= 1")
    if "{stage}" not in monitor:
        problems.append(f"monitor={monitor!r}: include '{{stage}}', e.g. 'val/acc_stage_{{stage}}'")
    if problems:
        raise ValueError("CurriculumCallback: " + "; ".join(problems))
