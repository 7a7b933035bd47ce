"""Greedy evaluation: one row per question, the accuracy report `test` prints, predictions JSONL.

The settings here are a section of their own (`evaluation:`), not model hyperparameters: what a
user asks of this evaluation wins over whatever the checkpoint was trained with.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anatomy_lightning.data.schema import Question
from anatomy_lightning.grpo.rewards import extract_choice
from anatomy_lightning.settings import Rule, SettingsError, plain_dict, range_problems


EVALUATION_RULES: tuple[Rule, ...] = (  # also in the CLI's up-front check (settings_check)
    ("max_new_tokens", lambda v: v >= 1, "an integer >= 1, or null for model.max_new_tokens"),
    ("sample_every_n_steps", lambda v: v >= 0, "an integer >= 0 (0 = no samples)"),
    ("sample_prompts", lambda v: v >= 1, "an integer >= 1"),
)


@dataclass
class EvaluationSettings:
    """What evaluation writes and how long it lets the model answer.

    Args:
        predictions_file: where `test` / `predict` write their JSONL (default: <log dir>/predictions.jsonl).
        max_new_tokens: completion budget for greedy evaluation (null: model.max_new_tokens).
        sample_every_n_steps: this often during training, TensorBoard gets samples (0: none): the
            question with its image(s) and all G completions with rewards and advantages.
        sample_prompts: prompts (groups) per sample.
    """

    predictions_file: str | None = None
    max_new_tokens: int | None = None
    sample_every_n_steps: int = 50
    sample_prompts: int = 1

    def __post_init__(self) -> None:
        problems = range_problems("evaluation.", plain_dict(self), EVALUATION_RULES)  # Python callers too
        if problems:
            raise SettingsError(f"{len(problems)} setting(s) out of range: " + "; ".join(problems))


def evaluation_rows(questions: list[Question], texts: list[str]) -> list[dict[str, Any]]:
    """One row per question: what was asked, the gold letter, the greedy answer and whether it is right
    (gold and correct None for an unlabelled `predict` question: there is nothing to compare with)."""
    rows = []
    for q, text in zip(questions, texts):
        pred = extract_choice(text, q.options)
        rows.append({
            "id": q.id,
            "uid": q.uid,
            "question": q.question,
            "images": list(q.images),  # every image the prompt showed, in order
            "options": q.options,
            "gold": q.answer_letter,
            "prediction": None if pred is None else "ABCDEF"[pred],
            "correct": None if q.answer_index is None else pred == q.answer_index,
            "anatomy": q.anatomy,
            "stage": q.stage,
            "similarity": q.similarity,
            "completion": text,
        })
    return rows


def accuracy_by(rows: list[dict[str, Any]]) -> dict[str, dict[Any, list[bool]]]:
    """Correctness grouped by anatomy (gold option) and by difficulty stage."""
    by: dict[str, dict[Any, list[bool]]] = {"anatomy": defaultdict(list), "stage": defaultdict(list)}
    for r in rows:
        by["anatomy"][r["anatomy"]].append(r["correct"])
        by["stage"][r["stage"]].append(r["correct"])
    return by


def format_report(rows: list[dict[str, Any]], by: dict[str, dict[Any, list[bool]]]) -> str:
    """The summary table `test` prints: accuracy overall, per anatomy and per difficulty stage."""
    n = len(rows)
    acc = sum(r["correct"] for r in rows) / max(1, n)
    lines = [f"{'':<32}{'n':>6}{'accuracy':>10}", f"{'overall':<32}{n:>6}{acc:>10.3f}", "per anatomy (gold option):"]
    for name, vals in sorted(by["anatomy"].items(), key=lambda kv: str(kv[0])):
        lines.append(f"  {str(name)[:30]:<30}{len(vals):>6}{sum(vals) / len(vals):>10.3f}")
    lines.append("per difficulty stage (S(q) quantile):")
    for k, vals in sorted(by["stage"].items(), key=lambda kv: (kv[0] is None, kv[0])):
        lines.append(f"  stage {k!s:<24}{len(vals):>6}{sum(vals) / len(vals):>10.3f}")
    return "\n".join(lines)


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> Path:
    """One JSON row per question."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def test_banner(trainer: Any, model: str, global_step: int) -> str:
    """One line naming the split `test` scores and the weights it scores."""
    dm = getattr(trainer, "datamodule", None)
    split = dm.describe_test_split() if hasattr(dm, "describe_test_split") else "the test questions"
    if trainer.ckpt_path:
        weights = f"checkpoint {trainer.ckpt_path}"
    elif global_step > 0:
        weights = f"the policy in memory after {global_step} steps"
    else:
        weights = f"the base model {model} (zero-shot: no --ckpt_path)"
    return f"test: scoring {split} | model: {weights}"


def tally_stage(sums: Any, row: dict[str, Any]) -> None:
    """Add one evaluation row to a (K, [correct, count]) tensor of per-stage sums."""
    k = min(int(row["stage"] or 0), sums.shape[0] - 1)
    sums[k, 0] += float(row["correct"])
    sums[k, 1] += 1
