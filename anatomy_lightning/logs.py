"""Log lines a person can read: our INFO lines on stderr, library noise that does not apply filtered out.

No heavy imports here, so that a command's `--help` or an input error prints before torch loads.
"""

from __future__ import annotations

import logging
import sys
import warnings


def setup_logging(level: int = logging.INFO) -> None:
    """Our INFO lines on stderr. Not `basicConfig`: Lightning has its own handler, and a root
    handler would print each of its lines twice."""
    logger = logging.getLogger("anatomy_lightning")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


# Lightning warnings that do not apply to this module's design, silenced so real ones stand out:
# the policy is kept in eval mode on purpose (no dropout in rollouts or in the ratio), and with
# manual optimisation a checkpoint holding the post-step weights is exactly what resuming needs.
QUIET_WARNINGS = (
    r".*module\(s\) in eval mode at the start of training.*",
    r".*Using ModelCheckpoint with manual optimization.*",
    r".*overridden `transfer_batch_to_device`.*",
    # noise of libraries, not of this run: torch's pytree deprecation inside Lightning, and the
    # LightningCLI note on `args` that the demo and the ablation (CLI called from Python) trigger
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*LightningCLI's args parameter is intended to run from within Python.*",
)
# log records that advertise or apologise rather than inform: Lightning's litlogger/litmodels
# tips, and bitsandbytes' note that an optional CPU kernel package is not installed (the 4-bit
# layers then use their built-in CPU path)
QUIET_LOG_LINES = ("Tip: For seamless cloud", "Failed to load CPU gemm_4bit_forward")


class _QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(text in message for text in QUIET_LOG_LINES)


def quiet_library_noise() -> None:
    """Warnings filters and log filters for QUIET_WARNINGS / QUIET_LOG_LINES (idempotent)."""
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if not sys.stdout.isatty():  # no terminal: Hugging Face's weight-loading bars print as garbage
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "bitsandbytes.backends.cpu.ops"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietFilter) for f in logger.filters):
            logger.addFilter(_QuietFilter())
        for handler in logger.handlers:
            if not any(isinstance(f, _QuietFilter) for f in handler.filters):
                handler.addFilter(_QuietFilter())
