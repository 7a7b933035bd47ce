"""The report's figures, in the style of the paper's: training curves against completions sampled
(mean over seeds, shaded ± SE), and held-out accuracy per arm and per stage (mean ± SE, seeds as dots)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from anatomy_lightning.experiments.ablation.arms import ALL_RIGHT, ALL_WRONG, COMPLETIONS
from anatomy_lightning.experiments.ablation.stats import aggregate_curve, against_completions, runs_of

ARM_COLOURS = {
    "grpo": "tab:gray", "curriculum": "tab:blue", "augmentation": "tab:orange", "both": "tab:green",
    "curriculum_v2": "tab:brown",
    "dynamic": "tab:purple",
}
ARM_STYLES = {"both": "--", "dynamic": "-."}  # arms whose curves may lie on another's stay visible
SIGNAL_ARMS = ("grpo", "augmentation", "dynamic", "both")  # the arms of the invalid-ratio figure
X_LABEL = "completions sampled"


def plot_band(ax: Any, runs: Sequence[Mapping[str, Any]], arm: str, tag: str) -> bool:
    """One arm's curve for `tag` against completions: mean over seeds, ± SE band; False when no run logged it."""
    agg = aggregate_curve([against_completions(r["curves"].get(tag, []), r) for r in runs_of(runs, arm)])
    if agg is None:
        return False
    colour = ARM_COLOURS.get(arm)
    marker = "o" if len(agg["x"]) < 8 else None  # a one- or two-point curve would be invisible
    ax.plot(agg["x"], agg["mean"], color=colour, ls=ARM_STYLES.get(arm, "-"), label=arm, lw=1.6, marker=marker, ms=4)
    if agg["seeds"] > 1:
        lo = [m - s for m, s in zip(agg["mean"], agg["se"])]
        hi = [m + s for m, s in zip(agg["mean"], agg["se"])]
        ax.fill_between(agg["x"], lo, hi, color=colour, alpha=0.2, lw=0)
    return True


def x_end(runs: Sequence[Mapping[str, Any]]) -> float:
    """The x-axis end shared by every panel: the most completions any run sampled."""
    ends = [r["curves"][COMPLETIONS][-1][1] for r in runs if r["curves"].get(COMPLETIONS)]
    ends += [float(r["completions"]) for r in runs if r.get("completions")]
    return max([1.0, *ends])


def _style(ax: Any, title: str, xmax: float) -> None:
    from matplotlib.ticker import EngFormatter

    if not ax.get_lines():
        ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="gray")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(-0.02 * xmax, 1.02 * xmax)
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel(X_LABEL)
    ax.grid(alpha=0.3)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curriculum(runs: Sequence[Mapping[str, Any]], arms: Sequence[str], path: Path) -> Path:
    """Figure 1: mean reward, batch S(q) and curriculum stage against completions, every arm."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = (
        ("train/reward", "mean training reward"),
        ("curriculum/batch_similarity", "batch mean S(q)"),
        ("curriculum/stage", "curriculum stage"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    xmax = x_end(runs)
    for ax, (tag, title) in zip(axes, panels):
        for arm in arms:
            plot_band(ax, runs, arm, tag)
        _style(ax, title, xmax)
    axes[2].yaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, fontsize=8)
    fig.suptitle("Reward, batch S(q) and curriculum stage (mean over seeds, shaded ± SE, moving average)")
    return _save(fig, path)


def plot_invalid_ratio(runs: Sequence[Mapping[str, Any]], classes: Sequence[str], path: Path) -> Path:
    """Figure 2: invalid gradient ratio per anatomy class against completions; top row all-wrong
    groups (no signal on a hard question), bottom row all-right groups; grpo vs augmentation,
    dynamic sampling and both."""
    import matplotlib.pyplot as plt

    arms = [a for a in SIGNAL_ARMS if runs_of(runs, a)]
    rows = ((ALL_WRONG, "all wrong"), (ALL_RIGHT, "all right"))
    columns = [None, *classes]
    fig, axes = plt.subplots(
        len(rows), len(columns), figsize=(3.3 * len(columns), 3.0 * len(rows)), squeeze=False, sharey=True
    )
    xmax = x_end(runs)
    for i, (prefix, split) in enumerate(rows):
        for j, cls in enumerate(columns):
            ax = axes[i][j]
            for arm in arms:
                plot_band(ax, runs, arm, prefix if cls is None else f"{prefix}/{cls}")
            _style(ax, f"{'all classes' if cls is None else cls}: {split}", xmax)
            ax.set_ylim(-0.02, 1.02)
        axes[i][0].set_ylabel(f"invalid ratio ({split})")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][0].legend(handles, labels, fontsize=8)
    fig.suptitle(
        "Share of groups with zero reward spread, per anatomy class: all completions wrong (top) or all right (bottom)"
    )
    return _save(fig, path)


def _bar(ax: Any, x: float, cell: Mapping[str, Any], arm: str, width: float, label: str | None = None) -> None:
    """A bar at the mean of `cell` (a `describe` result) with its ± SE, and the seeds as dots across it."""
    se = 0.0 if math.isnan(cell["se"]) else cell["se"]  # one seed: no error bar
    ax.bar(x, cell["mean"], width, yerr=se, capsize=3, color=ARM_COLOURS.get(arm), alpha=0.75, label=label)
    values = cell["values"]
    offsets = [width * 0.5 * (i / max(1, len(values) - 1) - 0.5) for i in range(len(values))]
    ax.scatter([x + o for o in offsets], values, color="black", s=9, zorder=3)


def plot_accuracy(table: Mapping[str, Any], baseline: Mapping[str, Any], path: Path) -> Path:
    """Held-out accuracy: per arm (left) and per arm within each stage (right); bars are the mean over
    seeds with ± SE, dots the seeds, dashed lines the warm start."""
    import matplotlib.pyplot as plt

    arms = list(table)
    stages = sorted({k for row in table.values() for k in row["stage"]})
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(5 + 1.6 * max(1, len(stages)) * max(1, len(arms)) / 3, 3.8),
        gridspec_kw={"width_ratios": [max(1, len(arms)), max(1, len(arms) * len(stages))]},
    )
    for i, arm in enumerate(arms):
        _bar(left, i, {"mean": table[arm]["mean"], "se": table[arm]["se"], "values": table[arm]["overall"]}, arm, 0.7)
    left.axhline(baseline["overall"], color="red", ls="--", lw=1, label=f"warm start {baseline['overall']:.3f}")
    left.set_xticks(range(len(arms)), arms, rotation=20)
    left.set_title("overall", fontsize=10)
    left.set_ylabel("held-out accuracy")
    left.legend(fontsize=8)
    width = 0.8 / max(1, len(arms))
    for s, k in enumerate(stages):
        for i, arm in enumerate(arms):
            cell = table[arm]["stage"].get(k)
            if cell:
                _bar(right, s + (i - (len(arms) - 1) / 2) * width, cell, arm, width, label=arm if s == 0 else None)
        if k in baseline["stage"]:
            right.hlines(baseline["stage"][k], s - 0.45, s + 0.45, color="red", ls="--", lw=1)
    right.set_xticks(range(len(stages)), [f"stage {k}" for k in stages])
    right.set_title("per difficulty stage (dashed: warm start)", fontsize=10)
    right.legend(fontsize=7, ncol=2)
    for ax in (left, right):
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Held-out accuracy: mean over seeds ± SE, dots = seeds")
    return _save(fig, path)
