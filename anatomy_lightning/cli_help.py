"""`fit --help` in a blink, grouped by what a researcher tunes first.

Building the full LightningCLI parser means importing torch and Lightning (which pulls in
torchmetrics, transformers and torchvision) and introspecting the Trainer: seconds before the
first line, and about a thousand lines of help. So `python -m anatomy_lightning SUBCOMMAND --help`
prints a shipped text made from that full help: every model (LoRA included), data, curriculum,
augmentation and evaluation option, then the Trainer options used most. `--help-all` prints the
full help. The shipped text is regenerated with `python -m anatomy_lightning.cli_help --write`;
a test fails when it no longer matches what the parser prints.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
from pathlib import Path

SUBCOMMANDS = ("fit", "validate", "test", "predict")
HELP_FILE = Path(__file__).with_name("cli_help.json")
WIDTH = "100"  # columns the help is laid out for, so the text does not depend on the terminal

# (heading, option prefix) in the order shown; the Trainer gets only its most used options
SECTIONS = (
    ("model: the policy, LoRA / QLoRA, sampling, rewards and the GRPO loss", "--model."),
    ("data: question files, splits, S(q) similarity and stages", "--data."),
    ("curriculum: the Anatomical Similarity Curriculum", "--curriculum."),
    ("augmentation: Group Diversity Question Augmentation", "--augmentation."),
    ("evaluation: predictions, greedy budget, text samples", "--evaluation."),
)
GENERAL = ("--config", "--run_name", "--ckpt_path", "--seed_everything")
# options of one variant (a loss type's, a reward's, the reference sync's), listed by --help-all only:
# the short help names the switch (loss_type, rewards, sync_ref_model) and stays a screenful per section
VARIANT_KNOBS = ("--model.sapo_temperature_", "--model.vespo_", "--model.ref_model_", "--model.soft_",
                 "--model.min_pixels", "--data.similarity_", "--data.embedding_cache_dir",
                 "--augmentation.dynamic_sampling")
TRAINER = (
    "max_steps", "precision", "accelerator", "devices", "num_nodes", "strategy", "accumulate_grad_batches",
    "gradient_clip_val", "val_check_interval", "log_every_n_steps", "default_root_dir",
)
TOP_HELP = """usage: python -m anatomy_lightning {fit,validate,test,predict,export} [--config CONFIG.yaml ...] [options]

GRPO fine-tuning of vision-language models with the Anatomy-R1 curriculum and augmentation.

subcommands:
  fit        train (GRPO; curriculum and augmentation are sections of the config)
  validate   score the validation split
  test       score the test split, write predictions JSONL and the per-stage report
  predict    answer a question file (data.predict_file), labelled or not
  export     write a trained checkpoint as a Hugging Face folder (model + processor)

  python -m anatomy_lightning SUBCOMMAND --help       the options researchers tune first
  python -m anatomy_lightning SUBCOMMAND --help-all   every option
  example: python -m anatomy_lightning fit --config configs/demo.yaml --run_name=try1
"""
_OPTION = re.compile(r"^  (?:-\w \S+, )?(--[\w.]+)")


def full_help(subcommand: str) -> str:
    """What the LightningCLI parser prints for `SUBCOMMAND --help` (slow: builds the parser)."""
    from anatomy_lightning.cli import main

    out = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([subcommand, "--help"])
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return out.getvalue()


def option_blocks(text: str) -> list[tuple[str, str]]:
    """(option name, its lines) for every option of an argparse help text, in order."""
    blocks: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        match = _OPTION.match(line)
        if match:
            blocks.append((match.group(1), [line]))
        elif blocks and line.startswith("   ") and line.strip():
            blocks[-1][1].append(line)
        elif blocks and not line.startswith(" "):
            blocks.append(("", []))  # a heading ends the previous option
    return [(name, "\n".join(lines)) for name, lines in blocks if name]


def grouped_help(subcommand: str, text: str) -> str:
    """The short help: usage, general options, each section's options, the most used Trainer ones."""
    blocks = option_blocks(text)
    total = len(blocks)
    out = [
        f"usage: python -m anatomy_lightning {subcommand} [--config CONFIG.yaml ...] [--section.key=value ...]",
        "",
        f"The options researchers tune first, by section; all {total} options (every Trainer and",
        "callback argument, each loss type's and reward's own knobs, renamed keys; --optimizer /",
        "--lr_scheduler, any torch class):",
        f"python -m anatomy_lightning {subcommand} --help-all",
        "",
        "general:",
    ]
    out += [body for name, body in blocks if name in GENERAL]
    for heading, prefix in SECTIONS:
        chosen = [body for name, body in blocks if name.startswith(prefix) and not name.startswith(VARIANT_KNOBS)]
        if chosen:
            out += ["", f"{heading}:", *chosen]
    trainer = {name: body for name, body in blocks if name.startswith("--trainer.")}
    out += ["", "trainer (the most used; the rest with --help-all):"]
    out += [trainer[f"--trainer.{key}"] for key in TRAINER if f"--trainer.{key}" in trainer]
    return "\n".join(out) + "\n"


def print_help(subcommand: str) -> bool:
    """Print the shipped short help of `subcommand`; False when there is none (then build the parser)."""
    try:
        texts = json.loads(HELP_FILE.read_text())
    except (OSError, ValueError):
        return False
    if subcommand not in texts:
        return False
    sys.stdout.write(texts[subcommand])
    return True


def generate() -> dict[str, str]:
    return {sub: grouped_help(sub, full_help(sub)) for sub in SUBCOMMANDS}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    texts = generate()
    if args == ["--write"]:
        HELP_FILE.write_text(json.dumps(texts, indent=1, sort_keys=True) + "\n")
        print(f"wrote {HELP_FILE}")
        return 0
    if args == ["--check"]:
        shipped = json.loads(HELP_FILE.read_text()) if HELP_FILE.is_file() else {}
        stale = [sub for sub in SUBCOMMANDS if shipped.get(sub) != texts[sub]]
        print(f"stale: {stale}; run python -m anatomy_lightning.cli_help --write" if stale else "up to date")
        return 1 if stale else 0
    print(texts["fit"], end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
