"""Damaged-checkpoint checks: what is wrong with a checkpoint file (including holding objects that
are not data), and which `step=N.ckpt` to resume from instead, so a bad `--ckpt_path` is a
one-line error rather than a traceback."""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping

from anatomy_lightning.checkpointing.safe_load import UnsafeCheckpointError, load_checkpoint_data

__all__ = [
    "STEP_FILE",
    "check_checkpoint_file",
    "checkpoint_problem",
    "damaged_checkpoint_message",
    "error_in_one_line",
    "newest_readable_step_checkpoint",
]

STEP_FILE = re.compile(r"step=(\d+)(?:-v\d+)?\.ckpt$")


def error_in_one_line(err: BaseException) -> str:
    """The error as "Type: message" on one line (message cut to 200 characters), for one-line reports."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with a local checkpoint file ("is empty", "is a folder", "holds a <...> object,
    which is not data", ...), or None if it loads with `weights_only=True`.

    Reads the archive's index and the pickled metadata (tensors are memory-mapped, not read), so a
    multi-GB checkpoint is checked in well under a second.
    """
    problem = _problem(path)
    return problem.problem if isinstance(problem, UnsafeCheckpointError) else problem


def _problem(path: str | os.PathLike[str]) -> str | UnsafeCheckpointError | None:
    """`checkpoint_problem`, keeping a refusal as the error itself, for `check_checkpoint_file` to raise."""
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
        loaded = load_checkpoint_data(path, map_location="cpu", mmap=True)
    except UnsafeCheckpointError as err:  # intact, but loading it could run code
        return err
    except Exception as err:  # torch raises RuntimeError, pickle errors, EOFError... for damaged archives
        return f"cannot be read ({error_in_one_line(err)})"
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


def damaged_checkpoint_message(path: str, problem: str) -> str:
    """The one-line error for a damaged checkpoint, naming the newest readable one beside it."""
    found = newest_readable_step_checkpoint(os.path.dirname(os.path.abspath(path)))
    if found is None:
        return f"checkpoint {path} {problem}, and no readable step=N.ckpt is beside it; start without --ckpt_path"
    return (
        f"checkpoint {path} {problem}; the newest readable one is {found[0]} (step {found[1]}): "
        f"resume with --ckpt_path {found[0]}"
    )


def check_checkpoint_file(path: str | os.PathLike[str] | None) -> None:
    """Raise a one-line ValueError when `path` names a damaged checkpoint, or one that is not data
    (`UnsafeCheckpointError`); the special values ("last", "best", "hpc", registry names) and None
    pass (they are resolved later)."""
    if path is None or str(path) in ("last", "best", "hpc") or "://" in str(path):
        return
    problem = _problem(path)
    if problem == "does not exist":
        raise FileNotFoundError(f"--ckpt_path {path}: no such checkpoint file")
    if isinstance(problem, UnsafeCheckpointError):
        raise problem  # a planted file is refused as such, not offered an alternative like a damaged one
    if problem is not None:
        raise ValueError(damaged_checkpoint_message(os.fspath(path), problem))
