"""Checkpoints that survive a SIGKILL and resume a run exactly where it stopped.

Two pieces, both wired into the shipped configs:

* `AtomicCheckpointIO` (a `trainer.plugins` entry): every checkpoint is written to a temporary
  file in the target's own folder, fsynced, then renamed over the target with `os.replace`, so a
  kill (or power loss) during a save leaves the previous `last.ckpt` intact, never a torn file.
  Lightning's own writer is only atomic when `$TMPDIR` is on the same filesystem as the
  checkpoints: it writes to `tempfile.mkstemp()` and `shutil.move`s the file, which across
  filesystems is a copy straight into `last.ckpt`; it never fsyncs.
* `ResumableCheckpoint` (a `ModelCheckpoint` to use in its place) adds what a resumed run needs
  to continue like an uninterrupted one:
  - the random streams (torch, CUDA, numpy, Python) of every rank are saved and put back just
    before the first training batch after the resume, so completions are sampled as they would
    have been;
  - a step-triggered save that falls on a validation step waits for the end of that validation.
    `ModelCheckpoint` saves in `on_train_batch_end`, before validation runs, and Lightning does not
    repeat that validation on resume: a curriculum promotion decided there would be lost;
  - no misleading "manual optimization ... pre-optimization state" warning on every save: the
    GRPO module steps its optimizer inside `training_step`, so the state after the step is the one
    `global_step` describes;
  - `save_on_exception` does not overwrite `last.ckpt` with a half-done training step (an exception
    inside a batch); between steps and in validation it saves as `ModelCheckpoint` does.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import random
import uuid
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

__all__ = ["AtomicCheckpointIO", "ResumableCheckpoint", "get_rng_state", "set_rng_state"]

log = logging.getLogger(__name__)


# -- atomic writes -------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to `.<name>.<unique>.tmp` next to the target, fsync, `os.replace`, fsync the folder.

    Remote paths ("s3://...") are left to Lightning's fsspec writer. Temporary files of a save
    that was killed are removed by the next save of the same checkpoint.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options; got {storage_options!r}")
        target = os.fspath(path)
        if "://" in target and not target.startswith("file://"):
            return super().save_checkpoint(checkpoint, path)
        target = os.path.abspath(target.removeprefix("file://"))
        folder, name = os.path.split(target)
        os.makedirs(folder, exist_ok=True)
        for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
            with contextlib.suppress(OSError):
                os.remove(stale)
        tmp = os.path.join(folder, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            # O_EXCL: never write through a file someone else created; 0o666 & umask like a plain open()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- random streams ------------------------------------------------------------------------------
def get_rng_state() -> dict[str, Any]:
    """This process's global random streams as tensors, lists and numbers (loads with weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `get_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _from_every_rank(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (a one-element list outside distributed runs)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


# -- the callback --------------------------------------------------------------------------------
class ResumableCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose checkpoints resume a run exactly; takes the same arguments.

    See the module docstring for what it adds. Time-based saving (`train_time_interval`) keeps
    Lightning's behaviour.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rng_to_restore: list[dict[str, Any]] | None = None
        self._deferred_step: int | None = None

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key: checkpoints written with either class resume with the other (the extra
        # "rng" entry is ignored by ModelCheckpoint), and `last.ckpt` keeps its name across the switch
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    # -- when to save ----------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._train_time_interval is not None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
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
        if (
            deferred == trainer.global_step
            and not trainer.sanity_checking
            and trainer.state.fn == TrainerFn.FITTING
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            self._save_now(trainer)  # after the other callbacks' on_validation_end (checkpoints run last)
            return
        super().on_validation_end(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        if progress.ready > progress.completed:
            # inside a training batch: the sampler has counted it, the optimizer may have stepped, the
            # callbacks have not seen it. A checkpoint of that state would not resume exactly, so keep
            # the last consistent one (at most every_n_train_steps behind).
            log.warning(
                "%s during training step %d: no checkpoint on exception (the step is half done); "
                "resume from %s",
                type(exception).__name__,
                trainer.global_step,
                self.last_model_path or self.dirpath,
            )
            return
        super().on_exception(trainer, pl_module, exception)

    def _save_now(self, trainer: L.Trainer) -> None:
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    # -- random streams --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # called on every rank while a checkpoint is assembled, so the gather cannot strand a rank
        return {**super().state_dict(), "rng": _from_every_rank(get_rng_state())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._rng_to_restore = state_dict.get("rng")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
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


def _validation_follows(trainer: L.Trainer) -> bool:
    """True when Lightning will run validation right after the current training batch."""
    loop = trainer.fit_loop.epoch_loop
    try:
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher)) and not loop._skip_next_val
    except AttributeError:  # a Lightning without these internals: save at once, as ModelCheckpoint does
        return False
