"""`python -m anatomy_lightning fit|validate|test --config configs/X.yaml`.

A thin `LightningCLI`: the model is always `GRPOModule`, the data always `AnatomyVQADataModule`;
the curriculum and the augmentation are top-level config sections (`curriculum:`,
`augmentation:`; `--curriculum.promote_at=0.7`), so is `evaluation:` (predictions file, greedy
budget, text samples: what a `test` asks for wins over the checkpoint), other callbacks (checkpoints) come from
`trainer.callbacks`. Configs are parsed in omegaconf mode, so `${run_name}`-style interpolation
works. Additions for users: an unknown config key is answered with the nearest valid key, and our
own input errors (bad data, a model path that does not exist, 4-bit on hardware that cannot do it)
end in one clear line, not a traceback (set ANATOMY_LIGHTNING_DEBUG=1 for the traceback).

Lightning's own knobs, although the module optimises manually (`GRPOModule` applies them):
  trainer.accumulate_grad_batches  N rollouts per optimiser step (gradients summed, each 1/N)
  trainer.gradient_clip_val        the one clipping setting (default 1.0; 0 or null = off)
  trainer.gradient_clip_algorithm  norm | value
  trainer.precision                "-true" precisions set the weight dtype (model.dtype: auto);
                                   unset, it follows an explicit model.dtype
  --optimizer / --lr_scheduler     any torch optimizer / scheduler; they replace model.optimizer,
                                   learning_rate, weight_decay / model.lr_schedule, warmup_steps
A resumed `fit --ckpt_path ...` writes into the TensorBoard version folder of the checkpoint's run;
`fit --ckpt_path auto` resumes from this run's last.ckpt if there is one, else starts fresh (requeue
loops). `--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy` shards the policy with
FSDP2 (`sharding`; tensor_parallel_size 1, save_distributed_checkpoint false, or a one-line refusal
naming the flags); FSDP (FSDP1) and DeepSpeed are refused by name.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from anatomy_lightning.callbacks.augmentation import GroupDiversityCallback
from anatomy_lightning.checkpointing import check_checkpoint_file, checkpoint_problem
from anatomy_lightning.callbacks.curriculum import CurriculumCallback
from anatomy_lightning.callbacks.dashboard import DashboardLayout
from anatomy_lightning.callbacks.progress import ProgressLog, StepProgressBar
from anatomy_lightning.data.datamodule import AnatomyVQADataModule
from anatomy_lightning.data.schema import DataError
from anatomy_lightning.logs import quiet_library_noise, setup_logging
from anatomy_lightning.models.families import family_for_type
from anatomy_lightning.models.loading import check_quantization_supported, load_model_config, resolve_model_path
from anatomy_lightning.grpo.evaluation import EvaluationSettings
from anatomy_lightning.guards import check_strategy, checkpoint_dirs, is_model_parallel, resolve_auto_ckpt_path
from anatomy_lightning.module import GRPOModule
from anatomy_lightning.optimization import PRECISION_DTYPE, RESUMED_SETTINGS, weight_dtype
from anatomy_lightning.settings_check import check_settings
from anatomy_lightning.sharding import check_shardable

log = logging.getLogger(__name__)
# weight dtype -> the "-true" precision that keeps it (an unset trainer.precision follows model.dtype)
_DTYPE_PRECISION = {dtype: precision for precision, dtype in PRECISION_DTYPE.items()}
# callbacks with their own top-level section: a trainer.callbacks entry would run them twice
_SECTIONS = {CurriculumCallback: "curriculum", GroupDiversityCallback: "augmentation"}
# the module's defaults for the optimisation settings a resume may change (see `_parse_ckpt_path`)
_DEFAULTS = {k: p.default for k, p in inspect.signature(GRPOModule).parameters.items() if k in RESUMED_SETTINGS}
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



def _unversioned_tensorboard(config: Any) -> Any | None:
    """The `init_args` of the config's TensorBoardLogger when its `version` is still unset, else None."""
    logger = config["trainer"].get("logger")
    if not (hasattr(logger, "get") and str(logger.get("class_path", "")).endswith("TensorBoardLogger")):
        return None
    init = logger.get("init_args")
    return init if init is not None and init.get("version") is None else None

class SuggestingParser(LightningArgumentParser):
    """Adds 'did you mean ...' to jsonargparse's unknown-key errors; drops retired model settings
    from the hyperparameters of older checkpoints (Lightning parses them with `parse_object`)."""

    # model settings that are gone -> where they live now
    RETIRED_KEYS = {
        "max_grad_norm": "trainer.gradient_clip_val",
        "predictions_file": "evaluation.predictions_file",
        "eval_max_new_tokens": "evaluation.max_new_tokens",
        "sample_every_n_steps": "evaluation.sample_every_n_steps",
    }

    def parse_object(self, cfg_obj: Any, *args: Any, **kwargs: Any) -> Any:
        for section in (cfg_obj.values() if isinstance(cfg_obj, dict) else ()):
            model = section.get("model") if isinstance(section, dict) else None
            for key, now in self.RETIRED_KEYS.items():
                if isinstance(model, dict) and key in model:
                    log.info("checkpoint hyperparameter model.%s=%s ignored: it is %s now", key, model.pop(key), now)
        return super().parse_object(cfg_obj, *args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        retired = [k for k in re.findall(r"--model\.(\w+)", message) if k in self.RETIRED_KEYS]
        if "unrecognized arguments" in message and retired:
            message = f"model.{retired[0]} is {self.RETIRED_KEYS[retired[0]]} now; move it there"
        for kind, group, key in _UNKNOWN.findall(message):
            if kind == "Subcommand":  # the key is already dotted: "model.num_generation"
                group, _, key = key.rpartition(".")
            if group.endswith("model") and key in self.RETIRED_KEYS:
                message = f"model.{key} is {self.RETIRED_KEYS[key]} now; move it there"
                break
            close = nearest_keys(self, group, key)
            if close:
                message += f" (did you mean {' or '.join(f'{group}.{c}' for c in close)}?)"
                break
        super().error(message, ex)


class AnatomyCLI(LightningCLI):
    """LightningCLI with the project's model and data classes fixed."""

    def _parse_ckpt_path(self) -> None:
        """`--ckpt_path auto` becomes "last" or a fresh start (see `guards`); Lightning fills `model.*`
        from the checkpoint's hyperparameters; a damaged file gets one line."""
        sub = self.config.get("subcommand")
        if sub:
            self.config[sub]["ckpt_path"] = resolve_auto_ckpt_path(sub, self.config[sub])
        check_checkpoint_file(self.config[sub].get("ckpt_path") if sub else None)
        model = self.config[sub].get("model") if sub == "fit" else None
        # Lightning lets the checkpoint's hyperparameters win over flags; optimisation settings the config
        # or a flag sets (not the default) win back, and the module applies them to the resumed optimiser
        given = {k: model[k] for k in RESUMED_SETTINGS if model is not None and model.get(k) != _DEFAULTS[k]}
        super()._parse_ckpt_path()
        for key, value in given.items():
            self.config[sub]["model"][key] = value

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        """`fit --help` names `--ckpt_path auto` (Lightning's text lists only its own keywords)."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        for action in parser._actions if subcommand == "fit" else ():
            if action.dest == "ckpt_path":
                action.help = ("a checkpoint file to resume from; last: this run's last.ckpt (an error if there is "
                               "none); auto: last.ckpt if there is one, else a fresh start (requeue loops)")
        return parser

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
        # a name the YAML interpolates into checkpoint and TensorBoard folders: ${run_name}
        parser.add_argument("--run_name", type=str, default="run", help="Names this run's output folders.")
        # the curriculum and the augmentation as sections of their own: `--curriculum.promote_at=0.7`;
        # Lightning adds the callbacks they build to the trainer's
        for cls, key in _SECTIONS.items():
            parser.add_lightning_class_args(cls, key)
        parser.add_class_arguments(EvaluationSettings, "evaluation")
        parser.set_defaults({"trainer.gradient_clip_val": 1.0})  # TRL's max_grad_norm default

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self.model.use_trainer_gradient_settings(**self._gradient_settings)
        self.model.evaluation = self._get(self.config_init, "evaluation")

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        """Hand --optimizer / --lr_scheduler to the model, which builds them on its trainable parameters
        once the policy exists (Lightning's version builds them now, on a model with no parameters yet,
        and ignores --lr_scheduler without --optimizer)."""
        parser = self._parser(subcommand)
        inits = {}
        for kind, register in (("optimizer", parser._optimizers), ("lr_scheduler", parser._lr_schedulers)):
            keys = [k for k, (_, link_to) in register.items() if link_to == "AUTOMATIC"]
            inits[kind] = self._get(self.config_init, keys[0]) if keys else None
        if inits["optimizer"] or inits["lr_scheduler"]:
            self.model.use_cli_optimizers(inits["optimizer"], inits["lr_scheduler"])

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        """Add the step-counting bar (terminals) and the plain progress lines (log files)."""
        given = list(config.get("callbacks") or []) + list(callbacks)
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks.append(StepProgressBar())
        if not any(isinstance(c, ProgressLog) for c in given):
            callbacks.append(ProgressLog())
        if not any(isinstance(c, DashboardLayout) for c in given):
            callbacks.append(DashboardLayout())
        return super()._instantiate_trainer(config, callbacks)

    def before_instantiate_classes(self) -> None:
        """Check the model path and the quantisation before any data is read or model is built.

        `load_policy` checks both again; here they fail in a second instead of after data loading.
        """
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        model = config.get("model") if config is not None else None
        if model is not None:  # every numeric range and every setting with fixed choices, in one error
            check_settings(model, config.get("data"), config.get("augmentation"), config.get("evaluation"),
                           curriculum=config.get("curriculum"))
        self._reconcile_settings()  # second: an invalid model.dtype is named above, not as a precision conflict
        if model is None:
            return
        check_quantization_supported(model.get("quantization"))
        path = resolve_model_path(model.get("model"))
        if Path(path).is_dir():  # an unsupported architecture fails here, naming the supported families
            family_for_type(json.loads((Path(path) / "config.json").read_text()).get("model_type", "?"), path)
        else:  # a hub id: neither cached nor reachable fails here in one line (see load_model_config)
            family_for_type(load_model_config(path, path).model_type, path)

    def _reconcile_settings(self) -> None:
        """Make every setting that exists in two places agree, or refuse the conflict (see the module doc)."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        trainer, model = config.get("trainer"), config.get("model")
        self._gradient_settings: dict[str, Any] = {}
        if trainer is None:
            return
        check_strategy(trainer.get("strategy"))  # FSDP, DeepSpeed: refused by name; ModelParallel's settings: now
        if model is not None and is_model_parallel(trainer.get("strategy")):  # what FSDP2 cannot shard
            check_shardable(model.get("quantization"), None if config.get("optimizer") else model.get("optimizer"))
        for entry in trainer.get("callbacks") or []:
            path = str(entry.get("class_path", "")) if hasattr(entry, "get") else ""
            for cls, key in _SECTIONS.items():
                if path.rsplit(".", 1)[-1] == cls.__name__:
                    raise ValueError(
                        f"trainer.callbacks has {cls.__name__}; it has its own section now: move its init_args "
                        f"to a top-level `{key}:` section (or --{key}.<option>=...), which also keeps it "
                        "when a later config replaces the trainer.callbacks list"
                    )
        # Lightning refuses these under manual optimisation: the module applies them (instantiate_classes)
        self._gradient_settings = {
            "accumulate_grad_batches": trainer.get("accumulate_grad_batches") or 1,
            "gradient_clip_val": trainer.get("gradient_clip_val"),
            "gradient_clip_algorithm": trainer.get("gradient_clip_algorithm"),
        }
        trainer["accumulate_grad_batches"], trainer["gradient_clip_val"] = 1, None
        trainer["gradient_clip_algorithm"] = None
        if model is not None:
            dtype = model.get("dtype")
            if trainer.get("precision") is None and dtype in _DTYPE_PRECISION:
                trainer["precision"] = _DTYPE_PRECISION[dtype]
                log.info("trainer.precision=%s, from model.dtype=%s", trainer["precision"], dtype)
            weight_dtype(dtype or "auto", trainer.get("precision"))  # a conflict fails now, not after data loading
        if self.subcommand == "fit" and config.get("ckpt_path"):
            self._continue_tensorboard_run(config)
        self._name_tensorboard_run(config)

    def _name_tensorboard_run(self, config: Any) -> None:
        """An unset TensorBoard `version` becomes `<subcommand>_<n>` (fit_0, test_0, ...): the run
        folder says what it holds. A resumed fit keeps its run's folder (set just before)."""
        init = _unversioned_tensorboard(config)
        if not self.subcommand or init is None:
            return
        root = Path(str(init.get("save_dir") or ".")) / str(init.get("name") or "lightning_logs")
        n = 0
        while (root / f"{self.subcommand}_{n}").exists():
            n += 1
        init["version"] = f"{self.subcommand}_{n}"

    def _continue_tensorboard_run(self, config: Any) -> None:
        """`fit --ckpt_path X`: log into the TensorBoard version folder the checkpoint's run wrote to."""
        init = _unversioned_tensorboard(config)
        if init is None:
            return
        path = Path(str(config["ckpt_path"]))
        if str(config["ckpt_path"]) == "last":
            dirs = checkpoint_dirs(config["trainer"])
            path = next((d / "last.ckpt" for d in dirs if (d / "last.ckpt").is_file()), path)
        if not path.is_file() or checkpoint_problem(path) is not None:
            return  # a damaged last.ckpt is refused in one line when fit resolves `last`
        from anatomy_lightning.checkpointing import load_checkpoint_data  # weights_only: a checkpoint is data

        version = load_checkpoint_data(path, map_location="cpu", mmap=True).get("tensorboard_version")
        if version is not None:
            init["version"] = version
            log.info("resuming: TensorBoard continues %s/%s", init.get("name"), version)


def main(args: list[str] | None = None, run: bool = True) -> AnatomyCLI:
    """The CLI (`run=False`: parse and build model, data and trainer without a subcommand, for tests)."""
    setup_logging()
    quiet_library_noise()
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
            run=run,
        )
    except (DataError, FileNotFoundError, RuntimeError, ValueError) as err:
        if os.environ.get("ANATOMY_LIGHTNING_DEBUG") or not raised_by_project(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def raised_by_project(err: BaseException) -> bool:
    """True when the error was raised by this project's code (a user-facing message), not a library bug."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "anatomy_lightning" in tb.tb_frame.f_code.co_filename


if __name__ == "__main__":
    main(sys.argv[1:])
