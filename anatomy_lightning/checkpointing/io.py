"""Checkpoint writes that a SIGKILL or a full disk cannot tear.

`AtomicCheckpointIO` (a `trainer.plugins` entry) writes every checkpoint to a temporary file in the
target's own folder, fsyncs it, then renames it over the target with `os.replace`, so a kill (or
power loss) during a save leaves the previous `last.ckpt` intact, never a torn file. Lightning's
own writer is only atomic when `$TMPDIR` is on the same filesystem as the checkpoints: it writes to
`tempfile.mkstemp()` and `shutil.move`s the file, which across filesystems is a copy straight into
`last.ckpt`; it never fsyncs. It also reads every checkpoint with `weights_only=True` (see `safe_load`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from anatomy_lightning.checkpointing.files import check_checkpoint_file, damaged_checkpoint_message, error_in_one_line
from anatomy_lightning.checkpointing.safe_load import UnsafeCheckpointError, refusing_unsafe

__all__ = ["AtomicCheckpointIO", "CheckpointSaveError", "fsync_dir", "is_out_of_space", "mount_point"]


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
            if is_out_of_space(err, folder):
                kept = f"the previous {name} is kept" if os.path.isfile(target) else f"no {name} was written"
                raise CheckpointSaveError(
                    f"no space left on {mount_point(folder)} while saving checkpoint {target}; {kept}. "
                    "Free some space (or point the checkpoint dirpath elsewhere) and resume with --ckpt_path last"
                ) from err
            raise
        fsync_dir(folder)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loader, always with `weights_only=True` (a checkpoint is data, never a program,
        whatever the caller asks): a file holding anything else is refused in one line naming the
        type, a damaged local file in one line naming a readable alternative."""
        target = os.fspath(path)
        local = "://" not in target or target.startswith("file://")
        if local:
            check_checkpoint_file(target.removeprefix("file://"))
        try:
            with refusing_unsafe(target):
                return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except (OSError, RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
            if not local or isinstance(err, (FileNotFoundError, UnsafeCheckpointError)):
                raise
            problem = f"cannot be read ({error_in_one_line(err)})"
            raise ValueError(damaged_checkpoint_message(target.removeprefix("file://"), problem)) from err


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (no space left); the previous file of that name is intact."""


def is_out_of_space(err: BaseException, folder: str) -> bool:
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


def mount_point(folder: str) -> str:
    """The mount point holding `folder` (what `df` would name), for the 'no space left on ...' message."""
    path = Path(folder).resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return str(path)


def fsync_dir(folder: str) -> None:
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
