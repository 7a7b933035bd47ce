"""`python -m anatomy_lightning fit|validate|test --config configs/X.yaml`.

A thin `LightningCLI`: the model is always `GRPOModule`, the data always `AnatomyVQADataModule`;
callbacks (curriculum, augmentation, checkpoints) come from the YAML. Configs are parsed in
omegaconf mode, so `${run_name}`-style interpolation works. Two additions for users: an unknown
config key is answered with the nearest valid key, and our own input errors (bad data, a model
path that does not exist, 4-bit on hardware that cannot do it) end in one clear line, not a
traceback (set ANATOMY_LIGHTNING_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from anatomy_lightning.callbacks.checkpoint import check_checkpoint_file
from anatomy_lightning.data.datamodule import AnatomyVQADataModule
from anatomy_lightning.data.schema import DataError
from anatomy_lightning.models.families import family_for_type
from anatomy_lightning.models.loading import check_quantization_supported, resolve_model_path
from anatomy_lightning.module import GRPOModule
from anatomy_lightning.settings_check import check_settings

_UNKNOWN = re.compile(r"(Group|Key|Subcommand) '([\w.]+)' does not accept (?:option|nested key) '([\w.]+)'")


def nearest_keys(parser: Any, group: str, key: str) -> list[str]:
    """Valid keys of `group` (e.g. "model") close to the misspelt `key`."""
    prefix = f"{group}." if group else ""
    valid = list(dict.fromkeys(d[len(prefix):] for d in _all_dests(parser) if d.startswith(prefix)))
    return difflib.get_close_matches(key, valid, n=3, cutoff=0.6)


def _all_dests(parser: Any) -> list[str]:
    """Every option name of a parser and of its subcommand parsers (the error may come from either)."""
    dests = []
    for action in parser._actions:
        dests.append(action.dest)
        for sub in (getattr(action, "_name_parser_map", None) or {}).values():
            dests.extend(_all_dests(sub))
    return dests


class SuggestingParser(LightningArgumentParser):
    """Adds 'did you mean ...' to jsonargparse's unknown-key errors."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        for kind, group, key in _UNKNOWN.findall(message):
            if kind == "Subcommand":  # the key is already dotted: "model.num_generation"
                group, _, key = key.rpartition(".")
            close = nearest_keys(self, group, key)
            if close:
                message += f" (did you mean {' or '.join(f'{group}.{c}' for c in close)}?)"
                break
        super().error(message, ex)


class AnatomyCLI(LightningCLI):
    """LightningCLI with the project's model and data classes fixed."""

    # Evaluation-only knobs: what the user passes now wins over what the checkpoint was trained with.
    EVAL_KEYS = ("predictions_file", "eval_max_new_tokens", "sample_every_n_steps")

    def _parse_ckpt_path(self) -> None:
        """Lightning fills `model.*` from the checkpoint's hyperparameters; keep explicit eval knobs."""
        sub = self.config.get("subcommand")
        given = {k: self.config[sub]["model"].get(k) for k in self.EVAL_KEYS} if sub else {}
        check_checkpoint_file(self.config[sub].get("ckpt_path") if sub else None)  # damaged file: one line
        super()._parse_ckpt_path()
        for key, value in given.items():
            if value is not None:
                self.config[sub]["model"][key] = value

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
        # a name the YAML interpolates into checkpoint and TensorBoard folders: ${run_name}
        parser.add_argument("--run_name", type=str, default="run", help="Names this run's output folders.")

    def before_instantiate_classes(self) -> None:
        """Check the model path and the quantisation before any data is read or model is built.

        `load_policy` checks both again; here they fail in a second instead of after data loading.
        """
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        model = config.get("model") if config is not None else None
        if model is None:
            return
        check_settings(model, config.get("data"))  # every numeric range, all problems in one error
        check_quantization_supported(model.get("quantization"))
        path = resolve_model_path(model.get("model"))
        if Path(path).is_dir():  # an unsupported architecture fails here, naming the supported families
            family_for_type(json.loads((Path(path) / "config.json").read_text()).get("model_type", "?"), path)


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
)


def main(args: list[str] | None = None) -> AnatomyCLI:
    setup_logging()
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # interpolate after every config file and flag is merged, so `--run_name=x` renames the folders
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    try:
        return AnatomyCLI(
            GRPOModule,
            AnatomyVQADataModule,
            parser_kwargs={"parser_mode": "omegaconf+"},
            parser_class=SuggestingParser,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except (DataError, FileNotFoundError, RuntimeError, ValueError) as err:
        if os.environ.get("ANATOMY_LIGHTNING_DEBUG") or not _ours(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _ours(err: BaseException) -> bool:
    """True when the error was raised by this project's code (a user-facing message), not a library bug."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "anatomy_lightning" in tb.tb_frame.f_code.co_filename


if __name__ == "__main__":
    main(sys.argv[1:])
