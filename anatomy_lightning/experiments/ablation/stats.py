"""Statistics of the ablation: mean ± standard error over seeds, paired differences against plain
GRPO (same seed; overall and per difficulty stage), compute per arm, and training curves put on a
shared x-axis (completions sampled) and aggregated over seeds.

SE here is the sample standard deviation over seeds / sqrt(seeds); undefined (nan) for one seed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from anatomy_lightning.experiments.ablation.arms import COMPLETIONS, INVALID

REFERENCE = "grpo"  # the arm every other one is compared with, seed by seed


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def describe(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample sd, standard error of the mean (sd / sqrt(n); nan under two values), n and the values."""
    mean, std = mean_std(values)
    se = std / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": mean, "std": std, "se": se, "n": len(values), "values": list(values)}


def runs_of(runs: Sequence[Mapping[str, Any]], arm: str) -> list[Mapping[str, Any]]:
    return [r for r in runs if r["arm"] == arm]


# -- accuracy --------------------------------------------------------------------------------------
def difference_noise(diff_std: float, k: int, p: float, n: int) -> float:
    """Standard error of a mean paired accuracy difference over k seeds: the seeds' spread plus the
    binomial noise of n test questions (two runs' worth). Differences under 2x this are not read
    as an effect."""
    seed_part = (diff_std**2) / k if k > 1 else 0.0
    test_part = 2 * p * (1 - p) / max(1, n) / max(1, k)
    return math.sqrt(seed_part + test_part)


def effect_of(mean_diff: float, noise: float) -> str:
    """How a mean paired difference reads under the noise rule: "helps", "hurts" or "no effect"."""
    if mean_diff > 2 * noise:
        return "helps"
    if mean_diff < -2 * noise:
        return "hurts"
    return "no effect"


def paired_difference(
    values: Mapping[int, float], reference: Mapping[int, float], n_test: int
) -> dict[str, Any] | None:
    """Per-seed differences `values[seed] - reference[seed]` over the seeds both have, their mean ± SE,
    the noise of that mean (`difference_noise` with `n_test` questions) and the effect it reads as."""
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    diffs = [values[s] - reference[s] for s in seeds]
    stats = describe(diffs)
    p = (sum(values[s] for s in seeds) + sum(reference[s] for s in seeds)) / (2 * len(seeds))
    noise = difference_noise(stats["std"], len(seeds), p, n_test)
    return {
        "seeds": seeds, "diffs": diffs, "mean": stats["mean"], "std": stats["std"], "se": stats["se"],
        "noise": noise, "effect": effect_of(stats["mean"], noise),
    }


def accuracy_table(
    runs: Sequence[Mapping[str, Any]], arms: Sequence[str], test_sizes: Mapping[str, int]
) -> dict[str, Any]:
    """Per arm: mean, sd, SE and per-seed accuracy overall and per stage; for every arm but grpo the
    paired difference to grpo (`vs_grpo`, with `vs_grpo["stage"][k]` per stage). `test_sizes`: test
    questions "overall" and per stage key, for the noise rule."""
    by_seed: dict[str, dict[str, dict[int, float]]] = {}  # arm -> scope ("overall" or stage) -> seed -> acc
    table: dict[str, Any] = {}
    for arm in arms:
        rs = sorted(runs_of(runs, arm), key=lambda r: r["seed"])
        scopes: dict[str, dict[int, float]] = defaultdict(dict)
        for r in rs:
            scopes["overall"][r["seed"]] = r["accuracy"]["overall"]
            for k, acc in r["accuracy"]["stage"].items():
                scopes[k][r["seed"]] = acc
        by_seed[arm] = scopes
        overall = describe(list(scopes["overall"].values()))
        row: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "overall": overall["values"]}
        row.update({key: overall[key] for key in ("mean", "std", "se")})
        row["stage"] = {
            k: {**describe(list(v.values())), "seeds": list(v)} for k, v in sorted(scopes.items()) if k != "overall"
        }
        table[arm] = row
    if REFERENCE not in table:
        return table
    ref = by_seed[REFERENCE]
    for arm in (a for a in table if a != REFERENCE):
        vs = paired_difference(by_seed[arm]["overall"], ref["overall"], test_sizes.get("overall", 0))
        stage = {}
        for k in table[arm]["stage"]:
            if k in ref:
                stage[k] = paired_difference(by_seed[arm][k], ref[k], test_sizes.get(k, 0))
        table[arm]["vs_grpo"] = {**(vs or {"seeds": [], "diffs": []}), "stage": {k: d for k, d in stage.items() if d}}
    return table


def compute_table(runs: Sequence[Mapping[str, Any]], arms: Sequence[str]) -> dict[str, Any]:
    """Per arm: completions sampled, optimizer steps and wall time of each seed, with their mean ± SE."""
    table = {}
    for arm in arms:
        rs = sorted(runs_of(runs, arm), key=lambda r: r["seed"])
        table[arm] = {"seeds": [r["seed"] for r in rs]}
        for key in ("completions", "steps", "wall_seconds"):
            table[arm][key] = describe([float(r[key]) for r in rs if r.get(key) is not None])
    return table


# -- curves ----------------------------------------------------------------------------------------
def against_completions(points: Sequence[Sequence[float]], run: Mapping[str, Any]) -> list[list[float]]:
    """A curve keyed by step, re-keyed by the completions the run had sampled by that step (its
    `train/completions` curve, interpolated; held at its ends outside it), so arms that sample more
    per step (dynamic sampling) line up with the others. A run without that curve is taken to have
    sampled at its average rate (completions / steps); one without either keeps its steps."""
    if not points:
        return []
    mapping = run.get("curves", {}).get(COMPLETIONS)
    if mapping:
        steps, done = [p[0] for p in mapping], [p[1] for p in mapping]
        xs = np.interp([p[0] for p in points], steps, done).tolist()
    elif run.get("completions") and run.get("steps"):
        rate = run["completions"] / run["steps"]
        xs = [(p[0] + 1) * rate for p in points]  # step 0 is logged after the first rollout
    else:
        xs = [p[0] for p in points]
    return [[float(x), float(p[1])] for x, p in zip(xs, points)]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` points (the first points average what exists)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def smoothing_window(n_points: int) -> int:
    return max(1, min(15, n_points // 8))


def aggregate_curve(series: Sequence[Sequence[Sequence[float]]]) -> dict[str, list[float]] | None:
    """Mean, SE and min-max over seeds of smoothed curves ([[x, value], ...] each), on the x all seeds cover.

    Each seed's curve is smoothed on its own points, then interpolated onto the union of x values
    inside the range every seed covers (per-class curves have gaps where a class is absent).
    """
    series = [s for s in series if len(s) > 0]
    if not series:
        return None
    lo = max(s[0][0] for s in series)
    hi = min(s[-1][0] for s in series)
    grid = sorted({p[0] for s in series for p in s if lo <= p[0] <= hi})
    if not grid:
        return None
    stacked = []
    for s in series:
        smooth = moving_average([p[1] for p in s], smoothing_window(len(s)))
        stacked.append(np.interp(grid, [p[0] for p in s], smooth))
    arr = np.vstack(stacked)
    se = arr.std(0, ddof=1) / math.sqrt(len(series)) if len(series) > 1 else np.full(len(grid), np.nan)
    return {
        "x": list(grid), "mean": arr.mean(0).tolist(), "se": se.tolist(), "min": arr.min(0).tolist(),
        "max": arr.max(0).tolist(), "seeds": len(series),
    }


def start_end(points: Sequence[Sequence[float]], fraction: float = 0.2) -> tuple[float, float] | None:
    """Mean value over the first and the last `fraction` of a run's points (raw, not smoothed)."""
    if not points:
        return None
    k = max(1, round(len(points) * fraction))
    head, tail = [p[1] for p in points[:k]], [p[1] for p in points[-k:]]
    return sum(head) / len(head), sum(tail) / len(tail)


def curve_summary(runs: Sequence[Mapping[str, Any]], arm: str, tag: str) -> dict[str, Any] | None:
    """Start and end value of a tag (first and last 20% of each run's points), mean ± SE over the
    arm's seeds, with the per-seed values."""
    pairs = {r["seed"]: start_end(r["curves"].get(tag, [])) for r in runs_of(runs, arm)}
    pairs = {s: p for s, p in sorted(pairs.items()) if p is not None}
    if not pairs:
        return None
    start, end = describe([p[0] for p in pairs.values()]), describe([p[1] for p in pairs.values()])
    return {
        "start": start["mean"], "start_std": start["std"], "start_se": start["se"],
        "end": end["mean"], "end_std": end["std"], "end_se": end["se"],
        "seeds": len(pairs), "per_seed": {s: {"start": p[0], "end": p[1]} for s, p in pairs.items()},
    }


def end_difference(runs: Sequence[Mapping[str, Any]], arm: str, tag: str) -> dict[str, Any] | None:
    """Paired (same seed) difference of a tag's end value (last 20% of points) to grpo: per seed, mean ± SE."""
    mine, ref = curve_summary(runs, arm, tag), curve_summary(runs, REFERENCE, tag)
    if mine is None or ref is None:
        return None
    seeds = sorted(set(mine["per_seed"]) & set(ref["per_seed"]))
    if not seeds:
        return None
    stats = describe([mine["per_seed"][s]["end"] - ref["per_seed"][s]["end"] for s in seeds])
    return {"seeds": seeds, "diffs": stats["values"], "mean": stats["mean"], "std": stats["std"], "se": stats["se"]}


def frequent_classes(runs: Sequence[Mapping[str, Any]], arms: Sequence[str], k: int = 4) -> list[str]:
    """The k anatomy classes with the most logged batches (per-class invalid-ratio points) in `arms`' runs."""
    counts: dict[str, int] = defaultdict(int)
    for r in runs:
        if r["arm"] in arms:
            for tag, points in r["curves"].items():
                if tag.startswith(INVALID + "/"):
                    counts[tag[len(INVALID) + 1 :]] += len(points)
    return sorted(counts, key=lambda c: (-counts[c], c))[:k]
