"""The offline demo, end to end: format warm start -> test (before) -> GRPO fit -> test (after).

`python -m anatomy_lightning.demo` runs on any CPU in minutes with the built-in tiny Qwen2.5-VL
and the synthetic surgical scenes. Every step goes through the same `LightningCLI` a real run uses
(`configs/demo.yaml`); only the model path is swapped for the warm-started folder.

Why a warm start: a randomly initialised policy never writes `<answer>...</answer>`, so all rewards
are 0 and GRPO has no signal. The warm start teaches the answer *format* with an option name drawn
at random (see `warm_start.py`): it carries no information about the gold option, so whatever the
policy gets right beyond guessing afterwards is GRPO's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

log = logging.getLogger("anatomy_lightning.demo")


def _cli(args: list[str]) -> Any:
    from anatomy_lightning.cli import main

    return main(args)


def synthetic_questions(config: dict[str, Any]) -> list[Any]:
    """The train split of the synthetic dataset `config["data"]["synthetic"]` describes, written to its out_dir."""
    from anatomy_lightning.data.loader import load_questions
    from anatomy_lightning.data.synthetic import write_synthetic_dataset

    s = dict(config["data"]["synthetic"])
    files = write_synthetic_dataset(
        s.pop("out_dir"), s.pop("n_train"), s.pop("n_val"), s.pop("n_test"), seed=s.pop("seed", 0), **s
    )
    return load_questions(str(files["train"]), check_images=True).questions


def _run_name(extra: list[str]) -> str | None:
    """The `--run_name` given on the command line (it renames the output and checkpoint folders)."""
    for i, arg in enumerate(extra):
        if arg.startswith("--run_name="):
            return arg.split("=", 1)[1]
        if arg == "--run_name" and i + 1 < len(extra):
            return extra[i + 1]
    return None


def run_demo(
    config: str = "configs/demo.yaml",
    max_steps: int | None = None,
    warm_start_steps: int = 300,
    answer_form: str = "text",
    extra: list[str] | None = None,
) -> dict[str, Any]:
    """Run the four phases and return the before/after figures (also written to `summary.json`)."""
    t0 = time.perf_counter()
    cfg = OmegaConf.to_container(OmegaConf.load(config), resolve=False)
    extra = list(extra or [])
    run_name = _run_name(extra) or str(cfg.get("run_name", "demo"))
    out = Path("outputs") / run_name
    if max_steps is not None:
        extra.append(f"--trainer.max_steps={max_steps}")

    from anatomy_lightning.grpo.prompts import DEFAULT_PROMPT_TEMPLATE
    from anatomy_lightning.warm_start import cache_dir, format_warm_start

    log.info("[1/4] format warm start (answers carry no information about the gold option)")
    model, seed = str(cfg["model"]["model"]), int(cfg.get("seed_everything", 0) or 0)
    template = str(cfg["model"].get("prompt_template") or DEFAULT_PROMPT_TEMPLATE)
    warm = format_warm_start(
        model, synthetic_questions(cfg),
        cache_dir(out, model, cfg["data"]["synthetic"], template, seed, steps=warm_start_steps, answer_form=answer_form),
        steps=warm_start_steps, seed=seed, answer_form=answer_form, template=template,
    )
    common = ["--config", config, f"--model.model={warm}", *extra]
    # TensorBoard runs named after what they hold, in the order they ran; a fresh demo replaces them
    runs = {phase: f"{i}_{phase}" for i, phase in enumerate(("test_warm_start", "fit_grpo", "test_after_grpo"), start=1)}
    save_dir = ((cfg.get("trainer") or {}).get("logger") or {}).get("init_args", {}).get("save_dir")
    for version in runs.values() if save_dir else ():
        shutil.rmtree(Path(str(save_dir)) / run_name / version, ignore_errors=True)

    log.info("[2/4] test the warm-started policy (the GRPO starting point)")
    before = _cli(["test", *common, f"--trainer.logger.init_args.version={runs['test_warm_start']}",
                   f"--evaluation.predictions_file={out / 'predictions_before.jsonl'}"]).model.test_results

    log.info("[3/4] GRPO fit with the curriculum and the augmentation")
    ckpt_dir = Path("checkpoints") / run_name
    for stale in ckpt_dir.glob("*.ckpt"):  # a fresh demo run, not a resume of an older one
        stale.unlink()
    _cli(["fit", *common, f"--trainer.logger.init_args.version={runs['fit_grpo']}"])

    log.info("[4/4] test the GRPO policy")
    after = _cli(
        ["test", *common, f"--ckpt_path={ckpt_dir / 'last.ckpt'}", f"--trainer.logger.init_args.version={runs['test_after_grpo']}",
         f"--evaluation.predictions_file={out / 'predictions_after.jsonl'}"]
    ).model.test_results

    summary = {
        "before_acc": before["acc"],
        "after_acc": after["acc"],
        "gain_points": 100 * (after["acc"] - before["acc"]),
        "test_questions": after["n"],
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "tensorboard": "tensorboard --logdir outputs/tensorboard",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"\nheld-out accuracy: before GRPO {before['acc']:.3f}  after GRPO {after['acc']:.3f}  "
        f"({summary['gain_points']:+.1f} points, {after['n']} questions)  wall {summary['wall_seconds']:.0f} s"
    )
    print(f"summary: {out / 'summary.json'}   curves: tensorboard --logdir outputs/tensorboard, then "
          "http://localhost:6006/#custom_scalars")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--max-steps", type=int, default=None, help="override trainer.max_steps")
    parser.add_argument("--warm-start-steps", type=int, default=300)
    parser.add_argument("--answer-form", choices=("letter", "text"), default="text",
                        help="what the warm start teaches inside <answer> (a random option either way)")
    args, extra = parser.parse_known_args()
    from anatomy_lightning.logs import setup_logging

    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_demo(args.config, args.max_steps, args.warm_start_steps, args.answer_form, extra)


if __name__ == "__main__":
    main()
