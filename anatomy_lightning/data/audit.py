"""Is the curriculum sound? A class x stage audit of scored, staged questions.

Two ways a difficulty curriculum goes wrong without anyone noticing:

- class-confounded: the stages are (nearly) a partition of the gold classes, so "stage 0" really
  means "the Omentum questions" and promotion is learning new answers, not harder ones;
- a text shortcut: on some stage, "pick the option least like the others" (it reads no image)
  answers far more than chance, so the policy can be rewarded for reading the option list.

`curriculum_audit` measures both and words a warning for each problem; `format_audit` prints it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from anatomy_lightning.data.schema import Question
from anatomy_lightning.data.similarity import SimilarityScorer

__all__ = ["CLASS_TOLERANCE", "SHORTCUT_MARGIN", "SHORTCUT_LIMIT", "curriculum_audit", "format_audit"]

CLASS_TOLERANCE = 0.15  # a class's share of questions in a stage may differ from 1/K by this much
SHORTCUT_LIMIT = 0.40  # the text-only shortcut may answer this share of a stage ...
SHORTCUT_MARGIN = 0.15  # ... or chance plus this, whichever is higher
CLASSES_SHOWN = 20  # rows of the class table in `format_audit`


def curriculum_audit(questions: Sequence[Question], scorer: SimilarityScorer, num_stages: int) -> dict[str, Any]:
    """Per-stage counts, class x stage table, text-shortcut accuracy and chance, and warnings.

    `questions` are scored and staged already (the training set); `scorer` supplies the option
    embeddings for the shortcut. Stage keys are strings, so the result is JSON as it stands.
    A class is judged only when it has at least 3*K questions (fewer are noise).
    """
    k = num_stages
    stages = [str(s) for s in range(k)]
    unstaged = [q.id for q in questions if q.stage is None]
    if unstaged:
        raise ValueError(f"{len(unstaged)} questions have no stage (e.g. {unstaged[:3]}); assign stages first")
    picks = scorer.shortcut_choices(questions) if questions else []
    counts: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    chance: defaultdict[str, float] = defaultdict(float)
    by_class: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for q, pick in zip(questions, picks):
        s = str(q.stage)
        counts[s] += 1
        hits[s] += int(pick == q.answer_index)
        chance[s] += 1 / len(q.options)
        by_class[q.answer_text][s] += 1

    classes: dict[str, dict[str, Any]] = {}
    for name, row in sorted(by_class.items(), key=lambda kv: (-sum(kv[1].values()), kv[0])):
        n = sum(row.values())
        classes[name] = {
            "count": n,
            "stages": {s: row.get(s, 0) for s in stages},
            "share": {s: round(row.get(s, 0) / n, 4) for s in stages},
        }
    shortcut = {s: round(hits[s] / counts[s], 4) if counts[s] else None for s in stages}
    chance_of = {s: round(chance[s] / counts[s], 4) if counts[s] else None for s in stages}

    warnings: list[str] = []
    judged = {c: e for c, e in classes.items() if e["count"] >= 3 * k}
    deviation = 0.0
    for name, e in judged.items():
        s, share = max(e["share"].items(), key=lambda kv: abs(kv[1] - 1 / k))
        deviation = max(deviation, abs(share - 1 / k))
        if abs(share - 1 / k) > CLASS_TOLERANCE:
            warnings.append(
                f"class-confounded: class {name!r} ({e['count']} questions) has {share:.0%} of its questions in "
                f"stage {s} (an even spread is {1 / k:.0%}); use data.similarity.stages: per_class"
            )
    for s in stages:
        if shortcut[s] is None:
            continue
        limit = max(SHORTCUT_LIMIT, chance_of[s] + SHORTCUT_MARGIN)
        if shortcut[s] > limit:
            warnings.append(
                f"stage {s} leaks a text shortcut: picking the option least like the others (no image) answers "
                f"{shortcut[s]:.0%} of its {counts[s]} questions (chance {chance_of[s]:.0%}, limit {limit:.0%}); "
                "use data.similarity.aggregation: all_pairs with stages: per_class"
            )
    return {
        "num_stages": k,
        "questions": len(questions),
        "stage_counts": {s: counts.get(s, 0) for s in stages},
        "classes": classes,
        "classes_judged": len(judged),
        "max_class_deviation": round(deviation, 4),
        "shortcut_accuracy": shortcut,
        "chance": chance_of,
        "warnings": warnings,
    }


def format_audit(audit: dict[str, Any], max_classes: int = CLASSES_SHOWN) -> str:
    """The audit as a table: one row per class (share of its questions in each stage, and count),
    then the stage totals, the shortcut and chance rows, and the warnings."""
    stages = list(audit["stage_counts"])
    classes = list(audit["classes"].items())
    width = max([len("text shortcut acc"), *(len(c) for c, _ in classes[:max_classes])])
    head = "".join(f"  stage {s:>3}" for s in stages)
    lines = [f"curriculum audit ({audit['questions']} questions, {audit['num_stages']} stages; "
             "class rows: share of the class's questions per stage)",
             f"  {'class'.ljust(width)}{head}  questions"]
    for name, e in classes[:max_classes]:
        cells = "".join(f"  {e['share'][s]:>9.2f}" for s in stages)
        lines.append(f"  {name.ljust(width)}{cells}  {e['count']:>9}")
    if len(classes) > max_classes:
        lines.append(f"  ... {len(classes) - max_classes} more classes")

    def row(title: str, values: dict[str, Any], fmt: str) -> str:
        cells = "".join(f"  {'-' if values[s] is None else format(values[s], fmt):>9}" for s in stages)
        return f"  {title.ljust(width)}{cells}"

    lines.append(row("questions", audit["stage_counts"], "d"))
    lines.append(row("text shortcut acc", audit["shortcut_accuracy"], ".2f"))
    lines.append(row("chance", audit["chance"], ".2f"))
    lines.append(f"  max class deviation from 1/K: {audit['max_class_deviation']:.2f} "
                 f"({audit['classes_judged']} classes with >= 3K questions)")
    lines += [f"  WARNING {w}" for w in audit["warnings"]] or ["  no warnings"]
    return "\n".join(lines)
