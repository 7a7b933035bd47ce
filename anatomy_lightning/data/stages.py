"""Curriculum stages from S(q): quantiles over every question (`global`) or within each gold class
(`per_class`, the default), and the stage of a question scored later (validation, test, predict).

Why per class: with global quantiles, a dataset whose distractors are drawn per gold class gets
stages that are a partition of gold classes; within each class, every class is in every stage.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from anatomy_lightning.data.schema import Question

__all__ = ["STAGINGS", "StageThresholds", "Thresholds", "assign_stages", "describe_thresholds", "stage_against", "stage_for"]

STAGINGS = ("per_class", "global")  # assign_stages(by=...)


@dataclass
class StageThresholds:
    """Per-class stage thresholds: each gold class (the gold option's text) has its own K-1 S(q)
    quantiles; classes with fewer than K training questions, and classes never seen in training,
    use `global_` (the quantiles over every question). Plain lists and dicts, so it serialises."""

    global_: list[float]
    per_class: dict[str, list[float]]

    def for_class(self, answer_text: str) -> list[float]:
        return self.per_class.get(answer_text, self.global_)

    def to_dict(self) -> dict[str, Any]:
        return {"by": "per_class", "global": list(self.global_), "per_class": {k: list(v) for k, v in self.per_class.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageThresholds:
        return cls(list(data["global"]), {k: list(v) for k, v in data["per_class"].items()})


Thresholds = Union[Sequence[float], StageThresholds]


def stage_for(question: Question | tuple[float, str], thresholds: Thresholds | Mapping[str, Any]) -> int:
    """Stage of a scored question (or an `(S(q), gold option text)` pair) under thresholds from
    `assign_stages`: a plain list is global; a `StageThresholds` (or its `to_dict()`) uses the
    question's class thresholds, else the global ones."""
    if isinstance(question, Question):
        similarity, answer = question.similarity, question.answer_text
    else:
        similarity, answer = question
    if isinstance(thresholds, Mapping):
        thresholds = StageThresholds.from_dict(thresholds)
    cut = thresholds.for_class(answer) if isinstance(thresholds, StageThresholds) else thresholds
    return sum(1 for t in cut if (similarity or 0.0) > t)


def assign_stages(
    questions: Iterable[Question], num_stages: int = 3, by: str = "global"
) -> list[float] | StageThresholds:
    """Split scored questions into `num_stages` S(q) quantile stages and set each `q.stage`.

    by="global": one set of quantiles over every question; returns the K-1 thresholds.
    by="per_class": quantiles within each gold class (`q.answer_text`), so every class with at
    least K distinct S(q) values is spread over every stage; classes with fewer than K questions
    use the global thresholds. Returns a `StageThresholds`. The questions given are staged by their
    rank within the class (ties split by a stable hash of the uid), so each class splits evenly even
    when a small option vocabulary makes many S(q) values equal; questions staged later (validation,
    test, predict) use their class's thresholds (`stage_for`).

    A question's stage is `sum(S(q) > t for t in thresholds)` (`stage_for`), so stage 0 is the least
    alike options. Thresholds are the quantile values moved to distinct S(q) values where ties would
    otherwise leave a stage empty: with at least K distinct values every stage gets questions; with
    fewer, the earliest stages are filled and the last ones stay empty.
    """
    questions = list(questions)
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if by not in STAGINGS:
        raise ValueError(f"stages by {by!r} is not supported; use one of {list(STAGINGS)}")
    unscored = [q.id for q in questions if q.similarity is None]
    if unscored:
        raise ValueError(
            f"{len(unscored)} questions have no S(q) (e.g. {unscored[:3]}); call SimilarityScorer.score first"
        )
    values = np.array([q.similarity for q in questions], np.float64)
    thresholds = _thresholds(values, num_stages)
    if by == "global":
        for q, s in zip(questions, values.tolist()):
            q.stage = sum(1 for t in thresholds if s > t)
        return thresholds
    members: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        members[q.answer_text].append(i)
    staged = StageThresholds(
        thresholds, {c: _thresholds(values[idx], num_stages) for c, idx in members.items() if len(idx) >= num_stages}
    )
    for q in questions:
        q.stage = stage_for(q, staged)
    for c, idx in members.items():  # training questions: by rank, so ties cannot crowd one stage
        if len(idx) < num_stages:
            continue
        order = sorted(idx, key=lambda i: (values[i], hashlib.sha1(questions[i].uid.encode("utf-8")).hexdigest()))
        for rank, i in enumerate(order):
            questions[i].stage = rank * num_stages // len(order)
    return staged


def stage_against(
    reference: list[Question], everything: Iterable[Question], num_stages: int, by: str
) -> list[float] | StageThresholds:
    """Stage `reference` by its own S(q) quantiles (`assign_stages`) and every other question of
    `everything` by the thresholds that gives: the training set sets the cuts, so validation and
    test accuracy per stage use the same ones. Returns the thresholds."""
    thresholds = assign_stages(reference, num_stages, by=by)
    in_reference = {id(q) for q in reference}
    for q in everything:
        if id(q) not in in_reference:
            q.stage = stage_for(q, thresholds)
    return thresholds


def describe_thresholds(thresholds: Thresholds) -> Any:
    """Thresholds for a log line: global ones as they are, per-class ones summarised."""
    if isinstance(thresholds, StageThresholds):
        return f"per class ({len(thresholds.per_class)} classes; global {[round(t, 4) for t in thresholds.global_]})"
    return thresholds


def _thresholds(values: np.ndarray, k: int) -> list[float]:
    if k == 1 or len(values) == 0:  # nothing to split
        return []
    ordered, distinct = np.sort(values), np.unique(values)
    n, u = len(ordered), len(distinct)
    picks: list[int] = []  # indices into `distinct`
    for j in range(1, k):
        if u < k:  # not enough distinct values for K non-empty stages: fill the earliest ones
            picks.append(min(j - 1, u - 1))
            continue
        quantile = ordered[max(0, math.ceil(j * n / k) - 1)]  # the largest value of stage j-1
        at = int(np.searchsorted(distinct, quantile))
        lo = picks[-1] + 1 if picks else 0
        hi = u - 1 - (k - j)  # leave one distinct value above for each later stage
        picks.append(min(max(at, lo), hi))
    return [float(distinct[i]) for i in picks]
