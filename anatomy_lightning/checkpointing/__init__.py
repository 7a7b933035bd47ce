"""Checkpoints that survive a SIGKILL and resume a run exactly where it stopped.

Wired into the shipped configs as two pieces: `AtomicCheckpointIO` (a `trainer.plugins` entry,
`io`) writes checkpoints that a kill or a full disk cannot tear, and `ResumableCheckpoint` (in
place of `ModelCheckpoint`, `callback`) saves and checks what a resumed run needs to continue
like an uninterrupted one. The checks it relies on stand alone: damaged files (`files`), the
run fingerprint (`fingerprint`), random streams (`rng`) and stop signals (`preemption`). Every
checkpoint is read as data, never as a program (`safe_load`), and keeps only the weights that
train (`weights`).
"""

from anatomy_lightning.checkpointing.callback import ResumableCheckpoint
from anatomy_lightning.checkpointing.files import (
    STEP_FILE,
    check_checkpoint_file,
    checkpoint_problem,
    newest_readable_step_checkpoint,
)
from anatomy_lightning.checkpointing.fingerprint import (
    FINGERPRINT_ENV,
    check_weights_fit,
    fingerprint_differences,
    run_fingerprint,
)
from anatomy_lightning.checkpointing.io import AtomicCheckpointIO, CheckpointSaveError
from anatomy_lightning.checkpointing.preemption import Preempted
from anatomy_lightning.checkpointing.rng import get_rng_state, set_rng_state
from anatomy_lightning.checkpointing.safe_load import CHECKPOINT_GLOBALS, UnsafeCheckpointError, load_checkpoint_data

__all__ = [
    "CHECKPOINT_GLOBALS",
    "FINGERPRINT_ENV",
    "STEP_FILE",
    "AtomicCheckpointIO",
    "CheckpointSaveError",
    "Preempted",
    "ResumableCheckpoint",
    "UnsafeCheckpointError",
    "check_checkpoint_file",
    "check_weights_fit",
    "checkpoint_problem",
    "fingerprint_differences",
    "get_rng_state",
    "load_checkpoint_data",
    "newest_readable_step_checkpoint",
    "run_fingerprint",
    "set_rng_state",
]
