"""Benchmark v2 property check: per-stage held-out accuracy after plain GRPO, and Spearman(S(q), error).

    python docs/benchmark_v2/property_check.py outputs/bv2_c [--plot docs/benchmark_v2/stages.png]

Reads the ablation runner's per-question predictions (`<out>/predictions/ablation_grpo_s<seed>.jsonl`,
each row with `stage`, `similarity` and `correct`) and the warm-start baseline. Spearman is computed
with numpy (average ranks for ties, then Pearson on the ranks): scipy is not a dependency.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get their average rank (as scipy.stats.rankdata's default)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    r = np.empty(len(x), float)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        r[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary(rows: list[dict]) -> dict:
    stages = sorted({int(r["stage"]) for r in rows})
    acc = {k: float(np.mean([r["correct"] for r in rows if int(r["stage"]) == k])) for k in stages}
    n = {k: sum(int(r["stage"]) == k for r in rows) for k in stages}
    s = np.array([r["similarity"] for r in rows], float)
    err = np.array([0.0 if r["correct"] else 1.0 for r in rows])
    return {"overall": float(1 - err.mean()), "stage": acc, "stage_n": n, "spearman_sq_error": spearman(s, err)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--arm", default="grpo")
    parser.add_argument("--plot", type=Path, default=None, help="also draw per-stage accuracy (PNG)")
    args = parser.parse_args()
    pred = args.out / "predictions"
    runs = {}
    for path in sorted(pred.glob(f"ablation_{args.arm}_s*.jsonl")):
        runs[int(re.search(r"_s(\d+)\.jsonl$", path.name).group(1))] = read(path)
    base = summary(read(pred / "baseline.jsonl")) if (pred / "baseline.jsonl").exists() else None
    per_seed = {seed: summary(rows) for seed, rows in sorted(runs.items())}
    stages = sorted({k for s in per_seed.values() for k in s["stage"]})
    header = " | ".join(f"stage {k}" for k in stages)
    lines = [f"| run | overall | {header} | stage 0 - last | Spearman S(q) vs error |",
             "|---|---|" + "---|" * len(stages) + "---|---|"]

    def row(name: str, s: dict) -> str:
        cells = " | ".join(f"{s['stage'][k]:.3f}" for k in stages)
        gap = 100 * (s["stage"][stages[0]] - s["stage"][stages[-1]])
        return f"| {name} | {s['overall']:.3f} | {cells} | {gap:+.1f} pts | {s['spearman_sq_error']:+.3f} |"

    if base:
        lines.append(row("warm start (before GRPO)", base))
    for seed, s in per_seed.items():
        lines.append(row(f"plain GRPO, seed {seed}", s))
    k = len(per_seed)

    def mse(vals: list[float]) -> str:
        m = float(np.mean(vals))
        se = float(np.std(vals, ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else 0.0
        return f"{m:.3f} ± {se:.3f}"

    if k:
        cells = " | ".join(mse([s["stage"][st] for s in per_seed.values()]) for st in stages)
        gaps = [100 * (s["stage"][stages[0]] - s["stage"][stages[-1]]) for s in per_seed.values()]
        gm = float(np.mean(gaps))
        gse = float(np.std(gaps, ddof=1) / math.sqrt(k)) if k > 1 else 0.0
        lines.append(
            f"| **mean ± SE ({k} seeds)** | {mse([s['overall'] for s in per_seed.values()])} | {cells} | "
            f"{gm:+.1f} ± {gse:.1f} pts | {mse([s['spearman_sq_error'] for s in per_seed.values()])} |"
        )
        pooled = [r for rows in runs.values() for r in rows]
        sq = np.array([r["similarity"] for r in pooled])
        err = np.array([0.0 if r["correct"] else 1.0 for r in pooled])
        means = [float(np.mean([s["stage"][st] for s in per_seed.values()])) for st in stages]
        mono_mean = all(a > b for a, b in zip(means, means[1:]))
        steps = list(zip(stages, stages[1:]))
        mono_seeds = sum(all(s["stage"][a] > s["stage"][b] for a, b in steps) for s in per_seed.values())
        lines += [
            "",
            f"- Spearman S(q) vs error, all {len(pooled)} (seed, question) pairs pooled: {spearman(sq, err):+.3f}",
            f"- mean accuracy falls monotonically stage 0 -> {stages[-1]}: {mono_mean}; in {mono_seeds} of {k} seeds",
            f"- stage 0 minus last stage (mean over seeds): {100 * (means[0] - means[-1]):+.1f} points (needs >= 20)",
            f"- questions per stage: {per_seed[next(iter(per_seed))]['stage_n']}",
        ]
    print("\n".join(lines))
    if args.plot and per_seed:
        plot(per_seed, base, stages, args.plot)


def plot(per_seed: dict, base: dict | None, stages: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.0), dpi=90)
    vals = np.array([[s["stage"][k] for k in stages] for s in per_seed.values()])
    se = vals.std(0, ddof=1) / math.sqrt(len(vals)) if len(vals) > 1 else np.zeros(len(stages))
    label = f"plain GRPO, mean ± SE ({len(vals)} seeds)"
    ax.bar(stages, vals.mean(0), yerr=se, color="#7fa7d9", capsize=4, label=label)
    for seed, row in zip(per_seed, vals):
        ax.plot(stages, row, "o-", ms=3, lw=0.8, alpha=0.7, label=f"seed {seed}")
    if base:
        ax.plot(stages, [base["stage"][k] for k in stages], "k--", lw=1, label="warm start")
    ax.set_xticks(stages)
    ax.set_xlabel("S(q) stage (0 = least alike options)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
