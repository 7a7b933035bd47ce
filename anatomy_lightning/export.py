"""`python -m anatomy_lightning export --config ... --ckpt_path ... --out DIR [--merge]`.

A Lightning checkpoint holds only the trainable weights (the LoRA adapter, or every weight of a
full fine-tune). `export` turns it into a Hugging Face folder (model plus processor) that loads
without this project:

- LoRA with `--merge`: the base reloaded unquantised (a QLoRA base is loaded from its original
  weights, not the 4-bit ones, in the adapter's dtype), the adapter applied and merged
  (`merge_and_unload`): `AutoModelForImageTextToText.from_pretrained(DIR)`. With `--dequantize`
  a QLoRA adapter is merged into the dequantised nf4 weights it was trained against instead,
  which reproduces the trained policy's outputs (the original weights differ by the nf4 rounding);
- LoRA without `--merge`: the adapter alone (peft format, pointing at the base model), which
  `AutoModelForImageTextToText.from_pretrained(DIR)` loads with peft installed, or
  `PeftModel.from_pretrained(base, DIR)`;
- a full fine-tune: the whole model.

The model settings come from the same config files and checkpoint hyperparameters as `test`
(`AnatomyCLI` parses them; no trainer, data or model is built for that); `--section.key=value`
flags are taken as by `fit`, and an explicit `--model.*` flag wins over the checkpoint (with a log
line), so a moved base model can be named.

An export cannot destroy: it is written into a hidden sibling folder and renamed into place only
when complete (a kill leaves no folder that looks finished); `--out` may not hold the base model,
the checkpoint, a config file or the working directory, nor replace a folder this command did not
write (marked by `MARKER`) without `--overwrite`; unusable paths are named before the model loads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import torch

from anatomy_lightning.checkpointing import load_checkpoint_data
from anatomy_lightning.checkpointing.files import error_in_one_line
from anatomy_lightning.checkpointing.io import fsync_dir

log = logging.getLogger(__name__)

MARKER = "anatomy_lightning_export.json"  # in every finished export: a folder we may replace

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class ExportResult:
    out: Path
    kind: str  # "merged" | "adapter" | "full"
    dtype: str
    base: str  # the base model (folder or hub id) the weights were applied to


def model_settings(configs: Sequence[str], ckpt_path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """`model.*` as `test --config ... --ckpt_path ...` would build it (the checkpoint's
    hyperparameters over the config files), parsed without instantiating anything; the settings
    named by `overrides` (`--model.model=...`, as `fit` takes them) win over the checkpoint, with a
    log line where they differ from it, so an explicit flag is never silently ignored."""
    hp = _parsed_model(configs, [f"--ckpt_path={ckpt_path}"])
    if not overrides:
        return hp
    # parsed apart from the checkpoint: jsonargparse cannot merge `--model.lora.r=8` into the
    # checkpoint's `lora` (as `test` cannot either)
    given = _parsed_model(configs, overrides)
    named = {tok.removeprefix("--model.").split("=", 1)[0].split(".", 1)[0]
             for tok in overrides if tok.startswith("--model.")}
    if any(tok == "--model" or tok.startswith("--model=") for tok in overrides):
        named = set(given)  # a whole model section
    for key in sorted(named & set(given)):
        if given[key] != hp.get(key):
            log.warning("model.%s=%r from the command line, over %r from the checkpoint", key, given[key], hp.get(key))
        hp[key] = given[key]
    return hp


def _parsed_model(configs: Sequence[str], extra: Sequence[str]) -> dict[str, Any]:
    """The `model` section of `test --config ... EXTRA`, parsed by `AnatomyCLI` without building anything."""
    from jsonargparse import set_parsing_settings

    from anatomy_lightning.cli import AnatomyCLI, SuggestingParser
    from anatomy_lightning.data.datamodule import AnatomyVQADataModule
    from anatomy_lightning.module import GRPOModule

    class _ParseOnly(AnatomyCLI):
        def _set_seed(self) -> None:  # parsing must not reseed the caller's random streams
            pass

        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

        def _run_subcommand(self, subcommand: str) -> None:
            pass

    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    args = ["test", *(a for c in configs for a in ("--config", str(c))), *extra]
    try:
        with warnings.catch_warnings():  # "args and sys.argv both given": argv is `export ...`, parsed above
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli = _ParseOnly(GRPOModule, AnatomyVQADataModule, parser_class=SuggestingParser, save_config_callback=None,
                             parser_kwargs={"parser_mode": "omegaconf+", "exit_on_error": False}, args=args)
    except argparse.ArgumentError as err:  # one line, not the `test` subcommand's usage
        raise ValueError(f"export: {' '.join(str(err).split())}") from None
    return cli.config["test"]["model"].as_dict()


def _trainable_weights(ckpt_path: str) -> dict[str, torch.Tensor]:
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path!r} is not a file; pass a checkpoint written by `fit` "
                                "(e.g. checkpoints/<run_name>/last.ckpt)")
    ckpt = load_checkpoint_data(path, map_location="cpu")  # weights_only: a checkpoint is data, not a program
    state = {k.removeprefix("policy."): v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("policy.")}
    if not state:
        raise ValueError(f"{ckpt_path}: the checkpoint holds no policy weights (nothing was trainable); "
                         "a quantised model without lora cannot be fine-tuned or exported")
    return state


def _dequantised_policy(hp: dict[str, Any], dtype: str) -> tuple[Any, Any]:
    """The base loaded quantised exactly as training loaded it, dequantised (plain Linear weights
    holding the nf4 values), with the run's LoRA adapter on top (untrained until the state loads)."""
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from anatomy_lightning.models.families import family_for_type
    from anatomy_lightning.models.loading import (
        LoraSettings,
        bnb_quantization_config,
        load_model_config,
        resolve_model_path,
    )

    path = resolve_model_path(hp["model"])
    family = family_for_type(load_model_config(path, hp["model"]).model_type, str(hp["model"]))
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype),
                              "quantization_config": bnb_quantization_config(hp["quantization"], False, family)}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}  # bitsandbytes quantises while placing
    base = AutoModelForImageTextToText.from_pretrained(path, **kwargs).dequantize()
    processor = AutoProcessor.from_pretrained(path)
    family.set_pixel_bounds(processor, hp.get("min_pixels"), hp.get("max_pixels"))
    lora = LoraSettings.coerce(hp["lora"]).to_peft(family, base, **_freeze_settings(hp))
    return get_peft_model(base, lora), processor


def _freeze_settings(hp: dict[str, Any]) -> dict[str, Any]:
    """The run's `freeze_vit` / `freeze_aligner` / `freeze_llm` (absent in older checkpoints: defaults)."""
    return {"freeze_vit": hp.get("freeze_vit"), "freeze_aligner": hp.get("freeze_aligner"),
            "freeze_llm": hp.get("freeze_llm", False)}


def _protected_paths(hp: dict[str, Any], ckpt_path: str, configs: Sequence[str]) -> dict[str, Path]:
    """What replacing `--out` must never delete: the export's own inputs, and where the user stands."""
    from anatomy_lightning.models.loading import resolve_model_path

    protected = {"the checkpoint being exported": Path(ckpt_path), "the working directory": Path.cwd()}
    base = Path(resolve_model_path(hp["model"]))
    if not base.is_dir():  # a hub id: its snapshot folder in the Hugging Face cache, if cached
        with contextlib.suppress(Exception):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(hp["model"]), "config.json")
            base = Path(cached).parent if isinstance(cached, str) else base
    if base.is_dir():
        protected["the base model"] = base
    protected.update({f"the config file {c}": Path(c) for c in configs})
    return protected


def check_out(out: str | os.PathLike[str], protected: dict[str, Path], overwrite: bool = False) -> Path:
    """`out` as an absolute path, or a one-line ValueError saying why it cannot be written or replaced.

    Always refused: a file, a path below a file, a folder that cannot be created, a folder holding
    any of `protected`. Refused without `overwrite`: a non-empty folder without our `MARKER`.
    """
    target = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    if target.exists() and not target.is_dir():
        raise ValueError(f"--out {out} is an existing file; an export is a folder: name a new folder")
    existing = target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, so no folder can be made below it; name another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable; name a folder you can write to")
    real = target.resolve()
    for what, path in protected.items():
        held = path.expanduser().resolve()
        if held == real or real in held.parents:
            raise ValueError(f"--out {out} holds {what} ({path}); an export replaces its folder whole, so it "
                             "would delete it: name another folder")
    if target.is_dir() and not (target / MARKER).is_file():
        found = sorted(p.name for p in target.iterdir())
        if found and not overwrite:
            shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
            raise ValueError(f"--out {out} already holds files this command did not write ({shown}); "
                             "name a new folder, or pass --overwrite to replace it")
    return target


def _hidden(target: Path, what: str) -> Path:
    """A hidden sibling of `target` for one stage of one export: `.NAME.export-partial-PID-XXXXXXXX`."""
    return target.parent / f".{target.name}.export-{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove_stale(target: Path) -> None:
    """Clear up after exports to `target` that were killed (their process is gone): a partial folder
    is deleted; a previous export moved aside just before the kill goes back to `target`."""
    prefix = f".{target.name}.export-"
    for stale in sorted(target.parent.glob(f"{glob_escape(prefix)}*")):
        fields = stale.name[len(prefix):].split("-")
        if len(fields) != 3 or not fields[1].isdigit() or _alive(int(fields[1])):
            continue
        if fields[0] == "replaced" and not target.exists():
            os.rename(stale, target)
        else:
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def write_atomically(target: Path, write: Callable[[Path], None], marker: dict[str, Any]) -> None:
    """`write(folder)` into a hidden sibling, add `MARKER`, fsync, then rename it to `target`
    (an existing `target` is moved aside first and deleted last). A kill at any point leaves
    `target` as it was (or, between the two renames, absent), never a half-written folder under its name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    partial = _hidden(target, "partial")
    partial.mkdir()
    try:
        write(partial)
        (partial / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        for file in partial.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(str(partial))
        old = _hidden(target, "replaced") if target.exists() else None
        if old is not None:
            os.rename(target, old)
        try:
            os.rename(partial, target)
        except BaseException:
            if old is not None:
                os.rename(old, target)
            raise
        fsync_dir(str(target.parent))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(configs: Sequence[str], ckpt_path: str, out: str | os.PathLike[str], merge: bool = False,
           dtype: str | None = None, dequantize: bool = False, overwrite: bool = False,
           overrides: Sequence[str] = ()) -> ExportResult:
    """Write the checkpoint's policy as a Hugging Face folder `out`; see the module docstring."""
    from anatomy_lightning.models.loading import has_adapter, load_policy

    hp = model_settings(configs, ckpt_path, overrides)
    state = _trainable_weights(ckpt_path)
    weights_dtype = next(iter(state.values())).dtype
    dtype = dtype or _DTYPE_NAMES.get(weights_dtype, "float32")
    lora = hp.get("lora")
    if lora is None and not merge and hp.get("quantization"):
        raise ValueError("model.quantization is set without model.lora: there is no trained weight to export")
    if dequantize and not (merge and lora is not None and hp.get("quantization")):
        raise ValueError("--dequantize applies to --merge of a QLoRA run (model.quantization and model.lora set)")
    target = check_out(out, _protected_paths(hp, ckpt_path, configs), overwrite)  # before the model loads
    # Unquantised on purpose: merging into 4-bit weights would re-quantise the merged sum, and a
    # Hugging Face folder with bitsandbytes weights does not load everywhere.
    if dequantize:
        policy, processor = _dequantised_policy(hp, dtype)
    else:
        policy, processor = load_policy(hp["model"], dtype=dtype, quantization=None, lora=lora,
                                        min_pixels=hp.get("min_pixels"), max_pixels=hp.get("max_pixels"),
                                        **_freeze_settings(hp))
    base = getattr(policy, "name_or_path", None) or getattr(policy.config, "_name_or_path", hp["model"])
    try:
        missing, unexpected = policy.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape differs (another LoRA rank, say): torch lists every weight
        first = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), error_in_one_line(err))
        raise ValueError(f"{ckpt_path}: checkpoint weights do not fit model {hp['model']!r} with model.lora={lora} "
                         f"({first}); pass the settings the checkpoint was trained with") from None
    if unexpected:
        raise ValueError(f"{ckpt_path}: {len(unexpected)} checkpoint weights do not fit model {hp['model']!r} with "
                         f"model.lora={lora} (e.g. {unexpected[:3]}); pass the config the checkpoint was trained with")
    loaded = set(state)
    expected = {n for n, p in policy.named_parameters() if p.requires_grad}
    if expected - loaded:
        raise ValueError(f"{ckpt_path}: {len(expected - loaded)} trainable weights are not in the checkpoint "
                         f"(e.g. {sorted(expected - loaded)[:3]}); pass the config the checkpoint was trained with")
    if has_adapter(policy) and merge:
        kind, model = "merged", policy.merge_and_unload()
    elif has_adapter(policy):
        kind, model = "adapter", policy
    else:
        kind, model = "full", policy
    if kind == "adapter":
        base = policy.peft_config["default"].base_model_name_or_path

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    marker = {"written_by": "python -m anatomy_lightning export", "checkpoint": os.path.abspath(ckpt_path),
              "kind": kind, "dtype": dtype, "base": str(base)}
    write_atomically(target, write, marker)
    log.info("exported %s model (%s) to %s", kind, dtype, out)
    return ExportResult(Path(out), kind, dtype, str(base))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m anatomy_lightning export",
        description="Write a trained checkpoint as a Hugging Face folder (model + processor). Also takes "
                    "--section.key=value flags as fit does (e.g. --model.model=/moved/base).",
        allow_abbrev=False,  # `--model.*` flags pass through untouched
    )
    p.add_argument("--config", action="append", default=[],
                   help="the config file(s) the run was trained with (repeatable, later ones override)")
    p.add_argument("--ckpt_path", required=True, help="a checkpoint written by fit (e.g. checkpoints/run/last.ckpt)")
    p.add_argument("--out", required=True,
                   help="folder to write; written beside it and renamed into place when complete. An existing "
                        "folder is replaced only if an earlier export wrote it (or with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder that this command did not write (never one holding the "
                        "base model, the checkpoint, a config file or the working directory)")
    p.add_argument("--merge", action="store_true",
                   help="LoRA: merge the adapter into the (unquantised) base; without it only the adapter is written")
    p.add_argument("--dequantize", action="store_true",
                   help="QLoRA with --merge: merge into the dequantised 4-bit weights the adapter was trained "
                        "against (reproduces the trained policy) instead of the original weights")
    p.add_argument("--dtype", choices=sorted(set(_DTYPE_NAMES.values())), default=None,
                   help="weights dtype of the export (default: that of the trained weights)")
    return p


def main(argv: list[str] | None = None) -> ExportResult:
    from anatomy_lightning.cli import raised_by_project
    from anatomy_lightning.logs import setup_logging
    from anatomy_lightning.data.schema import DataError

    setup_logging()
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)  # the rest goes to the config parser, as for `fit`
    try:
        result = export(args.config, args.ckpt_path, args.out, merge=args.merge, dtype=args.dtype,
                        dequantize=args.dequantize, overwrite=args.overwrite, overrides=overrides)
    except (DataError, FileNotFoundError, RuntimeError, ValueError) as err:
        if os.environ.get("ANATOMY_LIGHTNING_DEBUG") or not raised_by_project(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    how = {"merged": "LoRA merged into the " + ("dequantised 4-bit base" if args.dequantize else "base"),
           "adapter": f"LoRA adapter only (base: {result.base})", "full": "full fine-tune"}[result.kind]
    print(f"exported {how}, {result.dtype}, to {result.out}: "
          f"AutoModelForImageTextToText.from_pretrained({str(result.out)!r}) and AutoProcessor load it")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
