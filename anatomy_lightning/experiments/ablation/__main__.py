"""`python -m anatomy_lightning.experiments.ablation ...`: the command line of the ablation (see the package)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from anatomy_lightning.experiments.ablation.arms import ARMS, Settings
from anatomy_lightning.experiments.ablation.runs import run_ablation


def parse_args(argv: list[str] | None = None) -> Settings:
    """Settings from the command line; arguments it does not know go to every fit/test call."""
    parser = argparse.ArgumentParser(
        prog="python -m anatomy_lightning.experiments.ablation",
        description="Ablation of the Anatomy-R1 ideas on the synthetic benchmark.",
    )
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default="outputs/ablation")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (0 with --quick)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--max-steps", type=int, default=None, help="override trainer.max_steps (every arm)")
    parser.add_argument("--warm-start-steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed: a smoke test of the pipeline")
    parser.add_argument("--force", action="store_true", help="rerun runs whose results are already in --out")
    parser.add_argument("--no-test", action="store_true", help="fit only, no test (tuning on validation)")
    parser.add_argument("--pacing", nargs="+", default=[], metavar="KEY=VALUE",
                        help="curriculum settings for the arms with the curriculum on (curriculum, both), "
                             "e.g. --pacing promote_at=0.7 patience=4 max_steps_per_stage=120")
    args, extra = parser.parse_known_args(argv)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    return Settings(
        config=Path(args.config),
        out=Path(args.out),
        seeds=seeds,
        arms=args.arms,
        max_steps=args.max_steps,
        warm_start_steps=args.warm_start_steps,
        quick=args.quick,
        force=args.force,
        test=not args.no_test,
        pacing=parse_pacing(parser, args.pacing),
        extra=extra,
    )


def parse_pacing(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, Any]:
    """--pacing KEY=VALUE pairs, each VALUE read as YAML (0.7 -> float, null -> None)."""
    import yaml

    pacing = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--pacing {item!r}: expected KEY=VALUE, e.g. max_steps_per_stage=120")
        pacing[key] = yaml.safe_load(value)
    return pacing


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from anatomy_lightning.logs import setup_logging

    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return run_ablation(parse_args(argv))


if __name__ == "__main__":
    main()
