"""Checkpoints are data, not programs: every checkpoint this project reads is unpickled with
`weights_only=True`, so a crafted file (a colleague's, a download) cannot run code when loaded.

A full unpickler calls whatever a file names (`os.system`, `eval`, any class), so loading an
untrusted checkpoint with it is running a program. torch's weights-only unpickler rebuilds only
tensors, storages, dtypes, devices, `OrderedDict` and plain containers, numbers and strings, plus
the types in `CHECKPOINT_GLOBALS`. A file that needs anything else is refused, in one line naming
the type.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["CHECKPOINT_GLOBALS", "UnsafeCheckpointError", "load_checkpoint_data", "refusing_unsafe"]

# Types beyond torch's own weights-only set that our checkpoints hold: none. Surveyed: what `fit`
# writes with full fine-tuning and LoRA, `--optimizer`/`--lr_scheduler`, EarlyStopping and a
# monitoring ModelCheckpoint, bitsandbytes 8-bit optimizer state, dynamic sampling with gradient
# accumulation, and the project's 58 stored checkpoints: every one loads with torch's set alone,
# because our state_dicts are plain data by design (`rng`, the augmenter, the sampler, the
# curriculum; `lora` is stored as a dict) and Lightning stores hyperparameters as a plain dict.
# Add a type only if rebuilding it cannot run code (a dataclass of plain fields, say), and prefer
# saving plain data instead. Registered process-wide, so Lightning's own weights-only reads (the
# CLI's hyperparameters of `--ckpt_path`) accept the same types as ours.
CHECKPOINT_GLOBALS: tuple[Any, ...] = ()
torch.serialization.add_safe_globals(list(CHECKPOINT_GLOBALS))

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds an object that is not data (unpickling it could run code); nothing was run."""

    def __init__(self, path: str, type_name: str) -> None:
        self.path, self.type_name = path, type_name
        super().__init__(f"checkpoint {path} {self.problem}")

    @property
    def problem(self) -> str:
        return (
            f"holds a <{self.type_name}> object, which is not data; refusing to load it "
            "(a checkpoint can run code when unpickled)"
        )


def _first_unsafe_global(source: Any, err: BaseException) -> str | None:
    """The type a weights-only load refused: read from the archive's pickle opcodes (nothing is
    executed) for a local file, else from torch's message; None if neither names one (a damaged file)."""
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
        with contextlib.suppress(Exception):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(source)
            if names:
                return names[0]
    found = _GLOBAL.search(str(err))
    return found[1] if found else None


@contextlib.contextmanager
def refusing_unsafe(path: Any) -> Iterator[None]:
    """Turn torch's weights-only refusal inside the block into an `UnsafeCheckpointError` for `path`."""
    try:
        yield
    except pickle.UnpicklingError as err:
        name = _first_unsafe_global(path, err) if "Weights only load failed" in str(err) else None
        if name is None:
            raise
        raise UnsafeCheckpointError(os.fspath(path) if isinstance(path, os.PathLike) else str(path), name) from None


def load_checkpoint_data(path: str | os.PathLike[str], map_location: Any = None, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` (`CHECKPOINT_GLOBALS` allowed); a file that needs
    more raises `UnsafeCheckpointError` (one line naming the type) and runs nothing."""
    with refusing_unsafe(path):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
