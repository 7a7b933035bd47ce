"""`ResumableCheckpoint`: a `ModelCheckpoint` (use it in its place) whose checkpoints resume a run
like an uninterrupted one:

- the random streams (torch, CUDA, numpy, Python) of every rank are saved and put back just
  before the first training batch after the resume, so completions are sampled as they would
  have been;
- a step-triggered save that falls on a validation step waits for the end of that validation.
  `ModelCheckpoint` saves in `on_train_batch_end`, before validation runs, and Lightning does not
  repeat that validation on resume: a curriculum promotion decided there would be lost;
- no misleading "manual optimization ... pre-optimization state" warning on every save: the
  GRPO module steps its optimizer inside `training_step`, so the state after the step is the one
  `global_step` describes;
- `save_on_exception` saves only a consistent state: not after an exception inside a training
  batch (half a step), nor inside a validation that was cut short (the curriculum has not decided
  yet), nor before training started (a failed resume must not overwrite `last.ckpt`);
- SIGTERM (what schedulers send on preemption) and SIGINT (Ctrl+C) finish the current step (with
  `trainer.accumulate_grad_batches` > 1, every rollout of its window) and its validation, save there, print how to resume and exit 128 + the signal (143, 130); a second
  signal stops at once, keeping the last consistent checkpoint;
- a fingerprint of the run (data files by size and content hash, synthetic settings, stages,
  group size, model and LoRA shape): resuming a different run stops with the differences listed,
  unless `allow_fingerprint_change` (or $ANATOMY_LIGHTNING_ALLOW_FINGERPRINT_CHANGE=1) is set;
- `--ckpt_path last` that finds nothing, or finds a damaged `last.ckpt`, is an error in one line
  naming the newest readable `step=N.ckpt`, not a fresh start or a traceback; one that holds
  objects beyond data is refused in one line naming the type (see `safe_load`);
- `last.ckpt` is always the newest: never a `last-v1.ckpt` beside a stale one.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Mapping
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from anatomy_lightning.checkpointing.files import check_checkpoint_file, error_in_one_line
from anatomy_lightning.checkpointing.fingerprint import FINGERPRINT_ENV, fingerprint_differences, run_fingerprint
from anatomy_lightning.checkpointing.io import CheckpointSaveError
from anatomy_lightning.checkpointing.preemption import Preempted, install_stop_handlers, restore_handlers
from anatomy_lightning.checkpointing.rng import get_rng_state, set_rng_state
from anatomy_lightning.distributed import gather_objects

__all__ = ["ResumableCheckpoint"]

log = logging.getLogger(__name__)


class ResumableCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose checkpoints resume a run exactly; takes the same arguments, plus:

    Args:
        allow_fingerprint_change: resume even when the data, stages, group size, model or LoRA shape
            differ from the checkpoint's run (a warning lists the differences). Also set by
            $ANATOMY_LIGHTNING_ALLOW_FINGERPRINT_CHANGE=1.
        stop_on_signal: SIGTERM/SIGINT finish the current step (and its validation), save, and exit
            with 143/130. False leaves Lightning's own handling (which may stop mid-validation).

    See the module docstring for what it adds. Time-based saving (`train_time_interval`) keeps
    Lightning's behaviour.
    """

    def __init__(
        self, *args: Any, allow_fingerprint_change: bool = False, stop_on_signal: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.allow_fingerprint_change, self.stop_on_signal = allow_fingerprint_change, stop_on_signal
        self._rng_to_restore: list[dict[str, Any]] | None = None
        self._deferred_step: int | None = None
        self._trainer: L.Trainer | None = None
        self._fingerprint: dict[str, Any] | None = None
        self._training_started = False
        self._signal: int | None = None  # the signal received and not yet acted on
        self._previous_handlers: dict[int, Any] = {}

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key: checkpoints written with either class resume with the other (the extra
        # "rng" entry is ignored by ModelCheckpoint), and `last.ckpt` keeps its name across the switch
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer, self._training_started = trainer, False
        if stage == "fit":  # before the checkpoint is restored, so load_state_dict can compare
            self._fingerprint = run_fingerprint(trainer.datamodule, pl_module)

    # -- which checkpoint `--ckpt_path last` means -----------------------------------------------
    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        found = super()._find_last_checkpoints(trainer)
        last = {p for p in found if os.path.basename(p) == self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION}
        folder = os.fspath(self.dirpath) if self.dirpath else trainer.default_root_dir
        if not found:
            raise FileNotFoundError(
                f"--ckpt_path last: no {self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION} in {os.path.abspath(folder)}; "
                "check --run_name and the checkpoint dirpath, or leave out --ckpt_path to start a fresh run"
            )
        chosen = last or found  # last.ckpt is the newest by construction; last-vN only from older versions
        for path in chosen:
            check_checkpoint_file(path)  # damaged: names a readable step=N.ckpt; not data: refused
        return chosen

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        # never "last-v1.ckpt": the file is written atomically over the old one, so `last.ckpt` is the newest
        counter, self._enable_version_counter = self._enable_version_counter, False
        try:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        finally:
            self._enable_version_counter = counter

    # -- when to save ----------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._training_started = True
        # after Lightning's own handlers (registered just before the run starts), which would stop
        # at the next validation batch, before the curriculum has decided
        if self.stop_on_signal:
            self._previous_handlers.update(install_stop_handlers(self._on_signal))

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._signal is not None:  # a second signal: stop now, keep the last consistent checkpoint
            self._restore_handlers()
            print(
                f"{signal.Signals(signum).name} again: stopping at once; resume with --ckpt_path last "
                f"(the last consistent checkpoint, {self.last_model_path or self.dirpath})",
                file=sys.stderr,
                flush=True,
            )
            raise Preempted(128 + signum)
        self._signal = signum
        trainer = self._trainer
        if trainer is None:
            doing = "the current step"
        elif trainer.validating:
            doing = f"the validation after step {trainer.global_step}"
        else:
            doing = f"step {trainer.global_step + 1} (and its validation, if one follows)"
        print(
            f"{signal.Signals(signum).name} received: finishing {doing}, then saving and stopping "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def _restore_handlers(self) -> None:
        restore_handlers(self._previous_handlers)

    def _signalled(self, trainer: L.Trainer) -> bool:
        """Whether any rank received a stop signal (every rank calls this at the same points)."""
        if not self.stop_on_signal:
            return False
        return bool(trainer.strategy.reduce_boolean_decision(self._signal is not None, all=False))

    def _stop(self, trainer: L.Trainer) -> None:
        """Save this consistent point (unless already saved), say how to resume, exit 128 + signal."""
        signum = self._signal or signal.SIGTERM
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_now(trainer)
        self._restore_handlers()
        if trainer.is_global_zero:
            where = self.last_model_path or self._last_checkpoint_saved or "none (save_last and save_top_k are off)"
            print(
                f"{signal.Signals(signum).name}: stopped after step {trainer.global_step}; checkpoint {where}. "
                "To continue, run the same command again with --ckpt_path last",
                file=sys.stderr,
                flush=True,
            )
        raise Preempted(128 + signum)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._train_time_interval is not None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        else:
            self._save_on_schedule(trainer)
        if _mid_window(trainer):
            return  # the step's other rollouts come first: their gradients are in no checkpoint
        if not _validation_follows(trainer) and self._signalled(trainer):
            self._stop(trainer)  # with a validation to come, on_validation_end stops after it

    def _save_on_schedule(self, trainer: L.Trainer) -> None:
        if self._deferred_step is not None:  # the validation it waited for never ran (no val batches)
            self._deferred_step = None
            self._save_now(trainer)
        if self._every_n_train_steps < 1 or trainer.global_step % self._every_n_train_steps:
            return
        if self._should_skip_saving_checkpoint(trainer):
            return
        missing_metric = self.monitor is not None and self.monitor not in self._monitor_candidates(trainer)
        if missing_metric or _validation_follows(trainer):
            self._deferred_step = trainer.global_step
            return
        self._save_now(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        deferred, self._deferred_step = self._deferred_step, None
        fitting = not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING
        if deferred == trainer.global_step and fitting and not self._should_skip_saving_checkpoint(trainer):
            self._save_now(trainer)  # after the other callbacks' on_validation_end (checkpoints run last)
        else:
            super().on_validation_end(trainer, pl_module)
        if fitting and self._training_started and not _mid_window(trainer) and self._signalled(trainer):
            self._stop(trainer)  # mid-window, the batch end that completes the step stops

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        super().on_train_end(trainer, pl_module)
        # ended between scheduled saves (max_steps not a multiple of every_n_train_steps, a CompletionBudget,
        # early stopping): the final weights still reach last.ckpt, so nothing trained is lost and
        # `test --ckpt_path last` scores the end of the run
        if self.save_last and not _mid_window(trainer) and not self._should_skip_saving_checkpoint(trainer):
            self._save_now(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()
        super().teardown(trainer, pl_module, stage)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if isinstance(exception, SIGTERMException) and not exception.code:
            exception.code = 128 + signal.SIGTERM  # Lightning's own SIGTERM stop (before training) exits 0
        reason = self._inconsistent(trainer, exception)
        if reason is None:
            super().on_exception(trainer, pl_module, exception)
        elif reason:
            log.warning(
                "%s %s: no checkpoint on exception (%s); resume from %s",
                type(exception).__name__,
                error_in_one_line(exception).split(": ", 1)[-1][:120],
                reason,
                self.last_model_path or self.dirpath,
            )

    def _inconsistent(self, trainer: L.Trainer, exception: BaseException) -> str | None:
        """Why the state at `exception` would not resume exactly ("" = say nothing); None if it would."""
        if isinstance(exception, (Preempted, CheckpointSaveError)):
            return ""  # already saved and reported, or saving is what failed
        if not self._training_started:
            return ""  # training had not started (e.g. a failed resume): last.ckpt must stay as it is
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        if progress.ready > progress.completed:
            # inside a training batch: the sampler has counted it, the optimizer may have stepped, the
            # callbacks have not seen it
            return f"training step {trainer.global_step + 1} is half done"
        if _mid_window(trainer):
            return f"training step {trainer.global_step + 1} has accumulated gradients no checkpoint holds"
        if trainer.validating or trainer.sanity_checking:
            return f"the validation after step {trainer.global_step} was cut short, before the curriculum decided"
        return None

    def _save_now(self, trainer: L.Trainer) -> None:
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    # -- state: random streams and the run's fingerprint -----------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # called on every rank while a checkpoint is assembled, so the gather cannot strand a rank
        state = {**super().state_dict(), "rng": gather_objects(get_rng_state())}
        if self._fingerprint is not None:
            state["fingerprint"] = self._fingerprint
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_fingerprint(state_dict.get("fingerprint"))
        super().load_state_dict(state_dict)
        self._rng_to_restore = state_dict.get("rng")

    def _check_fingerprint(self, saved: Mapping[str, Any] | None) -> None:
        if self._fingerprint is None:  # not fitting (setup was not called for fit)
            return
        where = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
        if saved is None:
            log.warning("%s has no run fingerprint (an older version wrote it): resuming unchecked", where)
            return
        differences = fingerprint_differences(saved, self._fingerprint)
        if not differences:
            return
        listed = "; ".join(differences)
        if self.allow_fingerprint_change or os.environ.get(FINGERPRINT_ENV, "") not in ("", "0"):
            log.warning("resuming %s from another run's settings (allowed): %s", where, listed)
            return
        raise ValueError(
            f"{where} was written by a different run ({listed}); start a fresh run without --ckpt_path, or, "
            "to continue on purpose, set allow_fingerprint_change: true on ResumableCheckpoint "
            f"(or {FINGERPRINT_ENV}=1)"
        )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # restored here, not in load_state_dict: resuming draws from the global streams on its way
        # to the first batch, which the uninterrupted run did not do at this point
        states, self._rng_to_restore = self._rng_to_restore, None
        if not states:
            return
        if len(states) != trainer.world_size:
            log.warning(
                "checkpoint holds random streams of %d processes, this run has %d: continuing with fresh streams, "
                "so sampled completions will differ from the interrupted run",
                len(states),
                trainer.world_size,
            )
            return
        set_rng_state(states[trainer.global_rank])


def _mid_window(trainer: L.Trainer) -> bool:
    """True between the rollouts of one accumulated optimiser step (the same on every rank)."""
    return bool(getattr(trainer.lightning_module, "accumulating", False))


def _validation_follows(trainer: L.Trainer) -> bool:
    """True when Lightning will run validation right after the current training batch."""
    loop = trainer.fit_loop.epoch_loop
    try:
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher)) and not loop._skip_next_val
    except AttributeError:  # a Lightning without these internals: save at once, as ModelCheckpoint does
        return False
