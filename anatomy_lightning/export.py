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
(`AnatomyCLI` parses them; no trainer, data or model is built for that).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class ExportResult:
    out: Path
    kind: str  # "merged" | "adapter" | "full"
    dtype: str
    base: str  # the base model (folder or hub id) the weights were applied to


def model_settings(configs: list[str], ckpt_path: str) -> dict[str, Any]:
    """`model.*` as `test --config ... --ckpt_path ...` would build it (the checkpoint's
    hyperparameters over the config files), parsed without instantiating anything."""
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
    args = ["test", *(a for c in configs for a in ("--config", str(c))), f"--ckpt_path={ckpt_path}"]
    cli = _ParseOnly(GRPOModule, AnatomyVQADataModule, parser_kwargs={"parser_mode": "omegaconf+"},
                     parser_class=SuggestingParser, save_config_callback=None, args=args)
    return cli.config["test"]["model"].as_dict()


def _trainable_weights(ckpt_path: str) -> dict[str, torch.Tensor]:
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path!r} is not a file; pass a checkpoint written by `fit` "
                                "(e.g. checkpoints/<run_name>/last.ckpt)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
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
    return get_peft_model(base, LoraSettings.coerce(hp["lora"]).to_peft(family)), processor


def export(configs: list[str], ckpt_path: str, out: str | os.PathLike[str], merge: bool = False,
           dtype: str | None = None, dequantize: bool = False) -> ExportResult:
    """Write the checkpoint's policy as a Hugging Face folder `out`; see the module docstring."""
    from anatomy_lightning.models.loading import has_adapter, load_policy

    hp = model_settings(configs, ckpt_path)
    state = _trainable_weights(ckpt_path)
    weights_dtype = next(iter(state.values())).dtype
    dtype = dtype or _DTYPE_NAMES.get(weights_dtype, "float32")
    lora = hp.get("lora")
    if lora is None and not merge and hp.get("quantization"):
        raise ValueError("model.quantization is set without model.lora: there is no trained weight to export")
    if dequantize and not (merge and lora is not None and hp.get("quantization")):
        raise ValueError("--dequantize applies to --merge of a QLoRA run (model.quantization and model.lora set)")
    # Unquantised on purpose: merging into 4-bit weights would re-quantise the merged sum, and a
    # Hugging Face folder with bitsandbytes weights does not load everywhere.
    if dequantize:
        policy, processor = _dequantised_policy(hp, dtype)
    else:
        policy, processor = load_policy(hp["model"], dtype=dtype, quantization=None, lora=lora,
                                        min_pixels=hp.get("min_pixels"), max_pixels=hp.get("max_pixels"))
    base = getattr(policy, "name_or_path", None) or getattr(policy.config, "_name_or_path", hp["model"])
    missing, unexpected = policy.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{ckpt_path}: {len(unexpected)} checkpoint weights do not fit model {hp['model']!r} with "
                         f"model.lora={lora} (e.g. {unexpected[:3]}); pass the config the checkpoint was trained with")
    loaded = set(state)
    expected = {n for n, p in policy.named_parameters() if p.requires_grad}
    if expected - loaded:
        raise ValueError(f"{ckpt_path}: {len(expected - loaded)} trainable weights are not in the checkpoint "
                         f"(e.g. {sorted(expected - loaded)[:3]}); pass the config the checkpoint was trained with")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if has_adapter(policy) and merge:
        kind, model = "merged", policy.merge_and_unload()
    elif has_adapter(policy):
        kind, model = "adapter", policy
    else:
        kind, model = "full", policy
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if kind == "adapter":
        base = policy.peft_config["default"].base_model_name_or_path
    log.info("exported %s model (%s) to %s", kind, dtype, out)
    return ExportResult(out, kind, dtype, str(base))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m anatomy_lightning export",
        description="Write a trained checkpoint as a Hugging Face folder (model + processor).",
    )
    p.add_argument("--config", action="append", required=True,
                   help="the config file(s) the run was trained with (repeatable, later ones override)")
    p.add_argument("--ckpt_path", required=True, help="a checkpoint written by fit (e.g. checkpoints/run/last.ckpt)")
    p.add_argument("--out", required=True, help="folder to write (created; existing files are overwritten)")
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
    args = build_parser().parse_args(argv)
    try:
        result = export(args.config, args.ckpt_path, args.out, merge=args.merge, dtype=args.dtype,
                        dequantize=args.dequantize)
    except (DataError, FileNotFoundError, RuntimeError, ValueError) as err:
        if os.environ.get("ANATOMY_LIGHTNING_DEBUG") or not raised_by_project(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    how = {"merged": "LoRA merged into the " + ("dequantised 4-bit base" if args.dequantize else "base"), "adapter": f"LoRA adapter only (base: {result.base})",
           "full": "full fine-tune"}[result.kind]
    print(f"exported {how}, {result.dtype}, to {result.out}: "
          f"AutoModelForImageTextToText.from_pretrained({str(result.out)!r}) and AutoProcessor load it")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
