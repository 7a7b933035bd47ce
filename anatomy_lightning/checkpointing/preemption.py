"""Stopping on SIGTERM (what schedulers send on preemption) or SIGINT (Ctrl+C): the exit that
carries 128 + the signal, and installing / restoring the handlers around training."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["STOP_SIGNALS", "Preempted", "install_stop_handlers", "restore_handlers"]

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGINT", None)) if s is not None)


class Preempted(SystemExit):
    """Raised after the checkpoint of a SIGTERM/SIGINT stop is written; exits 128 + the signal."""


def install_stop_handlers(handler: Callable[[int, FrameType | None], Any]) -> dict[int, Any]:
    """Route `STOP_SIGNALS` to `handler`; the handlers it replaced, by signal (none off the main
    thread, where Python cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}


def restore_handlers(previous: dict[int, Any]) -> None:
    """Put back the handlers in `previous` and empty it; a no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, handler in previous.items():
        with contextlib.suppress(TypeError, ValueError):
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    previous.clear()
