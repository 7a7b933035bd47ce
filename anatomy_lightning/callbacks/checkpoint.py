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
  - `save_on_exception` saves only a consistent state: not after an exception inside a training
    batch (half a step), nor inside a validation that was cut short (the curriculum has not decided
    yet), nor before training started (a failed resume must not overwrite `last.ckpt`);
  - SIGTERM (what schedulers send on preemption) and SIGINT (Ctrl+C) finish the current step and its
    validation, save there, print how to resume and exit 128 + the signal (143, 130); a second
    signal stops at once, keeping the last consistent checkpoint;
  - a fingerprint of the run (data files by size and content hash, synthetic settings, stages,
    group size, model and LoRA shape): resuming a different run stops with the differences listed,
    unless `allow_fingerprint_change` (or $ANATOMY_LIGHTNING_ALLOW_FINGERPRINT_CHANGE=1) is set;
  - `--ckpt_path last` that finds nothing, or finds a damaged `last.ckpt`, is an error in one line
    naming the newest readable `step=N.ckpt`, not a fresh start or a traceback;
  - `last.ckpt` is always the newest: never a `last-v1.ckpt` beside a stale one.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import threading
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = [
    "FINGERPRINT_ENV",
    "AtomicCheckpointIO",
    "CheckpointSaveError",
    "Preempted",
    "ResumableCheckpoint",
    "check_checkpoint_file",
    "check_weights_fit",
    "checkpoint_problem",
    "fingerprint_differences",
    "get_rng_state",
    "run_fingerprint",
    "set_rng_state",
]

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
        if os.path.isdir(target):
            raise CheckpointSaveError(
                f"cannot save checkpoint {target}: a folder of that name is in the way; move it elsewhere"
            )
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
        except BaseException as err:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            if _out_of_space(err, folder):
                kept = f"the previous {name} is kept" if os.path.isfile(target) else f"no {name} was written"
                raise CheckpointSaveError(
                    f"no space left on {_mount_point(folder)} while saving checkpoint {target}; {kept}. "
                    "Free some space (or point the checkpoint dirpath elsewhere) and resume with --ckpt_path last"
                ) from err
            raise
        _fsync_dir(folder)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loader; a damaged local file is reported in one line naming a readable alternative."""
        target = os.fspath(path)
        local = "://" not in target or target.startswith("file://")
        if local:
            check_checkpoint_file(target.removeprefix("file://"))
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (OSError, RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
            if not local or isinstance(err, FileNotFoundError):
                raise
            problem = f"cannot be read ({_one_line(err)})"
            raise ValueError(_damaged_message(target.removeprefix("file://"), problem)) from err


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (no space left); the previous file of that name is intact."""


def _out_of_space(err: BaseException, folder: str) -> bool:
    """True for ENOSPC/EDQUOT anywhere in the exception chain, or torch's writer failing on a full disk
    (it reports the failed write as a RuntimeError from inline_container.cc without the errno)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(err, RuntimeError) and "write" in str(err).lower():
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free < 16 * 2**20
    return False


def _mount_point(folder: str) -> str:
    """The mount point holding `folder` (what `df` would name), for the 'no space left on ...' message."""
    path = Path(folder).resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return str(path)


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


# -- damaged checkpoints -------------------------------------------------------------------------
STEP_FILE = re.compile(r"step=(\d+)(?:-v\d+)?\.ckpt$")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with a local checkpoint file ("is empty", "is a folder", ...), or None if it loads.

    Reads the archive's index and the pickled metadata (tensors are memory-mapped, not read), so a
    multi-GB checkpoint is checked in well under a second.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return "is a folder, not a checkpoint file (move it elsewhere: it also blocks the next save)"
    if not os.path.exists(path):
        return "does not exist"
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        return f"is truncated or not a checkpoint ({size} bytes, no complete archive)"
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises RuntimeError, pickle errors, EOFError... for damaged archives
        if "Weights only load failed" in str(err):  # intact, but holds objects beyond tensors and plain data
            return None
        return f"cannot be read ({_one_line(err)})"
    if not isinstance(loaded, Mapping) or "state_dict" not in loaded:
        return "is not a Lightning checkpoint (no state_dict)"
    return None


def newest_readable_step_checkpoint(folder: str | os.PathLike[str]) -> tuple[str, int] | None:
    """The readable `step=N.ckpt` in `folder` with the largest N, with N; None if there is none."""
    if not os.path.isdir(folder):
        return None
    steps = sorted(
        ((int(m[1]), name) for name in os.listdir(folder) if (m := STEP_FILE.fullmatch(name))), reverse=True
    )
    for step, name in steps:
        candidate = os.path.join(folder, name)
        if checkpoint_problem(candidate) is None:
            return candidate, step
    return None


def _damaged_message(path: str, problem: str) -> str:
    found = newest_readable_step_checkpoint(os.path.dirname(os.path.abspath(path)))
    if found is None:
        return f"checkpoint {path} {problem}, and no readable step=N.ckpt is beside it; start without --ckpt_path"
    return (
        f"checkpoint {path} {problem}; the newest readable one is {found[0]} (step {found[1]}): "
        f"resume with --ckpt_path {found[0]}"
    )


def check_checkpoint_file(path: str | os.PathLike[str] | None) -> None:
    """Raise a one-line ValueError when `path` names a damaged checkpoint; the special values
    ("last", "best", "hpc", registry names) and None pass (they are resolved later)."""
    if path is None or str(path) in ("last", "best", "hpc") or "://" in str(path):
        return
    problem = checkpoint_problem(path)
    if problem == "does not exist":
        raise FileNotFoundError(f"--ckpt_path {path}: no such checkpoint file")
    if problem is not None:
        raise ValueError(_damaged_message(os.fspath(path), problem))


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


# -- run fingerprint -----------------------------------------------------------------------------
FINGERPRINT_ENV = "ANATOMY_LIGHTNING_ALLOW_FINGERPRINT_CHANGE"
_DATA_KEYS = ("num_stages", "val_fraction", "max_val_questions", "seed")
_MODEL_KEYS = ("model", "quantization", "num_generations")
_LORA_KEYS = ("r", "alpha", "target_modules", "include_vision")
_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha1: each file hashed once


def _plain(obj: Any) -> Any:
    """`obj` as dicts/lists/strings/numbers (dataclasses and Namespaces included), loadable with weights_only."""
    if hasattr(obj, "__dataclass_fields__"):
        obj = {name: getattr(obj, name) for name in obj.__dataclass_fields__}
    elif hasattr(obj, "as_dict"):
        obj = obj.as_dict()
    return json.loads(json.dumps(obj, default=str))


def _file_identity(path: str) -> dict[str, Any]:
    """Name, size and content hash of a data file (a folder or a missing file: just the name)."""
    if not os.path.isfile(path):
        return {"name": os.path.basename(os.path.normpath(path)), "size": None, "sha1": None}
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return {"name": os.path.basename(path), "size": stat.st_size, "sha1": _HASHES[key]}


def run_fingerprint(datamodule: Any, module: Any) -> dict[str, Any]:
    """What makes a resume meaningful, as a flat {setting: value} dict.

    Data files enter by name, size and content hash (not by folder, so a moved run still matches);
    evaluation-only knobs and the test file stay out, so they can change between runs.
    """
    data = dict(getattr(datamodule, "hparams", None) or {})
    model = dict(getattr(module, "hparams", None) or {})
    fp: dict[str, Any] = {}
    for key in ("train_file", "val_file"):
        if data.get(key):
            fp[f"data.{key}"] = _file_identity(str(data[key]))
    if data.get("synthetic") is not None:
        fp["data.synthetic"] = {k: v for k, v in _plain(data["synthetic"]).items() if k != "out_dir"}
    fp.update({f"data.{k}": _plain(data[k]) for k in _DATA_KEYS if k in data})
    for key in _MODEL_KEYS:
        if key in model:
            value = model[key]
            # a local model folder enters by its name, so the run survives moving it
            moved_ok = key == "model" and os.path.isdir(str(value))
            fp[f"model.{key}"] = os.path.basename(os.path.normpath(value)) if moved_ok else _plain(value)
    if "lora" in model:
        lora = _plain(model["lora"])
        fp["model.lora"] = {k: lora.get(k) for k in _LORA_KEYS} if isinstance(lora, dict) else lora
    return fp


def _show(value: Any) -> str:
    if isinstance(value, dict) and set(value) == {"name", "size", "sha1"}:
        return f"{value['name']} ({value['size']} bytes, sha1 {str(value['sha1'])[:10]})"
    return json.dumps(value, sort_keys=True)


def fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """"setting: checkpoint value -> this run's value" for every setting that differs."""
    return [
        f"{key}: {_show(saved.get(key))} -> {_show(current.get(key))}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


def _describe_model(hparams: Mapping[str, Any]) -> str:
    lora = hparams.get("lora")
    lora = _plain(lora) if lora is not None else None
    shape = f"LoRA r={lora.get('r')}" if isinstance(lora, dict) else "no LoRA"
    return f"{hparams.get('model')!r} ({shape}, quantization {hparams.get('quantization')})"


def check_weights_fit(module: torch.nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Raise a one-line ValueError when the checkpoint's weights do not fit `module`, naming the
    model the checkpoint was trained for (from its hyperparameters) and the one built now.

    Called before the weights are loaded: otherwise a size mismatch is a long torch traceback, and
    a checkpoint of a LoRA run loaded into a full model (or the reverse) matches no name and, with
    non-strict loading, would be evaluated with untrained weights without a word.
    """
    saved = checkpoint.get("state_dict") or {}
    own = module.state_dict()
    unknown = [k for k in saved if k not in own]
    wrong = [k for k in saved if k in own and getattr(saved[k], "shape", None) != getattr(own[k], "shape", None)]
    if not unknown and not wrong:
        return
    if wrong:
        example = f"{wrong[0]} is {tuple(saved[wrong[0]].shape)} in the checkpoint, {tuple(own[wrong[0]].shape)} here"
    else:
        example = f"{unknown[0]} is not a weight of this model"
    trained = _describe_model(checkpoint.get("hyper_parameters") or {})
    here = _describe_model(dict(getattr(module, "hparams", None) or {}))
    raise ValueError(
        f"this checkpoint was trained for model {trained}; this run builds {here}: {len(wrong)} weights differ in "
        f"shape and {len(unknown)} are unknown here (e.g. {example}); use the checkpoint's model settings or a "
        "checkpoint of this model"
    )


class Preempted(SystemExit):
    """Raised after the checkpoint of a SIGTERM/SIGINT stop is written; exits 128 + the signal."""


_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGINT", None)) if s is not None)


# -- the callback --------------------------------------------------------------------------------
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
            problem = checkpoint_problem(path)
            if problem is not None:
                raise ValueError(_damaged_message(path, problem))
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
        if self.stop_on_signal and threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

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
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous_handlers.items():
            with contextlib.suppress(TypeError, ValueError):
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

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
        if fitting and self._training_started and self._signalled(trainer):
            self._stop(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        super().on_train_end(trainer, pl_module)
        # stopped between scheduled saves (a CompletionBudget, early stopping): the final weights
        # still reach last.ckpt, so nothing trained is lost and `test --ckpt_path` sees the end
        if trainer.should_stop and self.save_last and not self._should_skip_saving_checkpoint(trainer):
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
                _one_line(exception).split(": ", 1)[-1][:120],
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
        state = {**super().state_dict(), "rng": _from_every_rank(get_rng_state())}
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


def _validation_follows(trainer: L.Trainer) -> bool:
    """True when Lightning will run validation right after the current training batch."""
    loop = trainer.fit_loop.epoch_loop
    try:
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher)) and not loop._skip_next_val
    except AttributeError:  # a Lightning without these internals: save at once, as ModelCheckpoint does
        return False
