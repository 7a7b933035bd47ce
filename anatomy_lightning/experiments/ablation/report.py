"""The report: tables (markdown), findings in words, `REPORT.md` and `results.json`.

Every comparison is with plain GRPO on the same seed; an accuracy difference is read as an effect
only when it is over twice `stats.difference_noise` (seed spread plus binomial test noise).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from anatomy_lightning.experiments.ablation.arms import ALL_RIGHT, ALL_WRONG, INVALID
from anatomy_lightning.experiments.ablation.figures import (
    SIGNAL_ARMS,
    plot_accuracy,
    plot_curriculum,
    plot_invalid_ratio,
)
from anatomy_lightning.experiments.ablation.stats import (
    REFERENCE,
    accuracy_table,
    compute_table,
    curve_summary,
    end_difference,
    frequent_classes,
    paired_difference,
    runs_of,
)

COMPARED_ON_SIGNAL = ("augmentation", "dynamic", "both")  # the arms meant to change the no-signal share


# -- formatting ------------------------------------------------------------------------------------
def _pts(x: float) -> str:
    return f"{100 * x:+.1f} points"


def mean_se_text(mean: float, se: float, digits: int = 3, scale: float = 1.0, sign: bool = False) -> str:
    """Mean ± SE as text ("m ± se"), or just "m" where the SE is undefined (one seed; the report says so once)."""
    m = f"{scale * mean:{'+' if sign else ''}.{digits}f}"
    return m if math.isnan(se) else f"{m} ± {scale * se:.{digits}f}"


def _scope(k: str) -> str:
    return "overall" if k == "overall" else f"stage {k}"


def _scopes(vs: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(scope, paired difference) for overall then every stage."""
    return [("overall", vs), *sorted(vs.get("stage", {}).items())] if vs.get("diffs") else []


# -- tables ----------------------------------------------------------------------------------------
def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return "\n".join(["| " + " | ".join(row) + " |" for row in (head, ["---"] * len(head), *rows)])


def table_markdown(table: Mapping[str, Any], baseline: Mapping[str, Any]) -> str:
    """Held-out accuracy, mean ± SE over seeds, overall and per stage, with the warm start as first row."""
    stages = sorted({k for row in table.values() for k in row["stage"]} | set(baseline["stage"]))
    warm = [f"{baseline['stage'][k]:.3f}" if k in baseline["stage"] else "—" for k in stages]
    rows = [["warm start (before GRPO)", "—", f"{baseline['overall']:.3f}", *warm]]
    for arm, row in table.items():
        cells = [arm, str(len(row["seeds"])), mean_se_text(row["mean"], row["se"])]
        for k in stages:
            cell = row["stage"].get(k)
            cells.append(mean_se_text(cell["mean"], cell["se"]) if cell else "—")
        rows.append(cells)
    return markdown_table(["arm", "seeds", "overall", *(f"stage {k}" for k in stages)], rows)


def paired_markdown(table: Mapping[str, Any]) -> str:
    """Paired differences to grpo (points), per seed and mean ± SE, overall and per stage, with the reading."""
    rows = []
    for arm, row in table.items():
        for k, d in _scopes(row.get("vs_grpo", {})):
            per_seed = ", ".join(f"{100 * x:+.1f}" for x in d["diffs"])
            rows.append([
                arm, _scope(k), f"{per_seed} ({', '.join(map(str, d['seeds']))})",
                mean_se_text(d["mean"], d["se"], 1, 100, sign=True), f"{200 * d['noise']:.1f}", d["effect"],
            ])
    head = ["arm", "scope", "per-seed Δ, points (seeds)", "mean Δ ± SE", "2 × noise", "reading"]
    return markdown_table(head, rows) if rows else "(no arm to pair with grpo)"


def _span(d: Mapping[str, Any], scale: float = 1.0, digits: int = 0) -> str:
    """A `describe` result as "mean (min–max)"; just the mean when every seed has the same value."""
    if not d["values"]:
        return "—"
    mid, lo, hi = (f"{scale * v:.{digits}f}" for v in (d["mean"], min(d["values"]), max(d["values"])))
    return mid if lo == hi else f"{mid} ({lo}–{hi})"


def compute_markdown(compute: Mapping[str, Any]) -> str:
    """Completions sampled, optimizer steps and wall time per arm (mean over seeds, min-max)."""
    rows = []
    for arm, row in compute.items():
        c, s, w = row["completions"], row["steps"], row["wall_seconds"]
        rate = f"{c['mean'] / s['mean']:.1f}" if c["values"] and s["values"] and s["mean"] else "—"
        rows.append([arm, str(len(row["seeds"])), _span(c), _span(s), rate, _span(w, 1 / 60, 1)])
    head = ["arm", "seeds", "completions sampled", "optimizer steps", "completions / step", "wall time (min)"]
    return markdown_table(head, rows)


# -- findings in words -----------------------------------------------------------------------------
def accuracy_findings(table: Mapping[str, Any], baseline: float) -> list[str]:
    """Which arm is best, each arm against the warm start, and each arm against grpo: where it helps
    (overall and per stage) and where it does not, under the noise rule."""
    lines = []
    arms = [a for a in table if not math.isnan(table[a]["mean"])]
    if not arms:
        return ["No arm produced a test accuracy."]
    top = max(table[a]["mean"] for a in arms)
    tied = [a for a in arms if table[a]["mean"] >= top - 1e-9]
    ranking = ", ".join(f"{a} {table[a]['mean']:.3f}" for a in sorted(arms, key=lambda a: -table[a]["mean"]))
    if len(tied) == len(arms) > 1:
        lines.append(
            f"No arm was best: all reached the same mean held-out accuracy {top:.3f} "
            f"(warm-start baseline {baseline:.3f})."
        )
    else:
        best = " and ".join(f"**{a}**" for a in tied) + (" (tied)" if len(tied) > 1 else "")
        lines.append(f"Best mean held-out accuracy: {best} ({ranking}; warm-start baseline {baseline:.3f}).")
    for arm in arms:
        row = table[arm]
        lines.append(
            f"{arm}: {mean_se_text(row['mean'], row['se'])} over {len(row['seeds'])} seed(s), "
            f"{_pts(row['mean'] - baseline)} over the warm start."
        )
    if REFERENCE not in table:
        return lines
    g = table[REFERENCE]
    for arm in (a for a in arms if a != REFERENCE):
        row, vs = table[arm], table[arm].get("vs_grpo", {})
        if not vs.get("diffs"):
            continue
        per_seed = ", ".join(f"{100 * d:+.1f}" for d in vs["diffs"])
        diff = mean_se_text(vs["mean"], vs["se"], 1, 100, True)
        numbers = (
            f"{row['mean']:.3f} vs {g['mean']:.3f}, paired difference (points) {diff}, "
            f"per-seed differences [{per_seed}], 2 × noise {200 * vs['noise']:.1f} points"
        )
        if vs["effect"] == "helps":
            verdict = f"{arm} raised accuracy over plain GRPO ({numbers})."
        elif vs["effect"] == "hurts":
            verdict = f"{arm} lowered accuracy compared with plain GRPO ({numbers})."
        elif vs["mean"] > 0:
            verdict = (
                f"{arm} did not raise accuracy measurably over plain GRPO here: the gain is within the noise "
                f"({numbers})."
            )
        else:
            verdict = f"{arm} did not raise accuracy over plain GRPO here ({numbers})."
        lines.append(verdict)
        lines.append("  - " + where_it_helps(arm, vs))
    return lines


def where_it_helps(arm: str, vs: Mapping[str, Any]) -> str:
    """One sentence: the scopes (overall, each stage) where the arm helps, hurts or has no effect vs grpo."""
    groups: dict[str, list[str]] = {"helps": [], "hurts": [], "no effect": []}
    for k, d in _scopes(vs):
        groups[d["effect"]].append(f"{_scope(k)} ({mean_se_text(d['mean'], d['se'], 1, 100, True)})")
    parts = [f"{effect} on {', '.join(where)}" for effect, where in groups.items() if where]
    return f"{arm} vs grpo, paired by seed (points): " + "; ".join(parts) + "."


def compute_findings(compute: Mapping[str, Any], budget: int) -> list[str]:
    lines = []
    for arm, row in compute.items():
        c, s = row["completions"], row["steps"]
        if not c["values"]:
            continue
        short = [seed for seed, v in zip(row["seeds"], c["values"]) if v < budget]
        over = max(c["values"]) - budget
        note = f"; seeds {short} stopped short of the budget: compute is not equal" if short else ""
        if over > 0:
            note += f"; up to {over:.0f} over the budget (the resampling rounds of its last step)"
        lines.append(
            f"{arm}: {c['mean']:.0f} completions sampled (budget {budget}) in {s['mean']:.1f} optimizer steps "
            f"on average{note}."
        )
    return lines


def curriculum_findings(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Batch S(q), reward and stage of the curriculum arms against grpo, start to end."""
    lines = []
    for arm in (a for a in ("curriculum", "both", "curriculum_v2") if runs_of(runs, a)):
        for tag, what in (("curriculum/batch_similarity", "batch mean S(q)"), ("train/reward", "mean training reward")):
            cur, base = curve_summary(runs, arm, tag), curve_summary(runs, REFERENCE, tag)
            if cur is None or base is None:
                continue
            lines.append(
                f"{what}: {arm} {cur['start']:.3f} → {mean_se_text(cur['end'], cur['end_se'])}, plain GRPO "
                f"{base['start']:.3f} → {mean_se_text(base['end'], base['end_se'])} (first → last 20% of steps, "
                "mean ± SE over seeds)."
            )
        stages = [
            max((p[1] for p in r["curves"].get("curriculum/stage", [])), default=float("nan"))
            for r in runs_of(runs, arm)
        ]
        lines.append(f"Highest curriculum stage reached per seed ({arm}): {', '.join(f'{s:.0f}' for s in stages)}.")
        sim = curve_summary(runs, arm, "curriculum/batch_similarity")
        if sim is not None and sim["end"] <= sim["start"]:
            lines.append(
                f"The batch S(q) of {arm} did not rise over training here (no promotion to harder stages, or too "
                "late to show)."
            )
        reward_c, reward_g = curve_summary(runs, arm, "train/reward"), curve_summary(runs, REFERENCE, "train/reward")
        if reward_c and reward_g:
            rise_c, rise_g = reward_c["end"] - reward_c["start"], reward_g["end"] - reward_g["start"]
            verdict = "climbed faster" if rise_c > rise_g else "did not climb faster"
            lines.append(
                f"The training reward {verdict} under {arm} than under plain GRPO ({rise_c:+.3f} vs {rise_g:+.3f}, "
                "start to end); the curriculum's reward comes from its own, easier, batches, so held-out accuracy "
                "is the fair comparison."
            )
    return lines


def _start_end_text(summary: Mapping[str, Any]) -> str:
    start, end = (mean_se_text(summary[k], summary[f"{k}_se"], 2) for k in ("start", "end"))
    return f"{start} → {end}"


def invalid_ratio_findings(runs: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> list[str]:
    """Start → end of the all-wrong invalid ratio (the paper's "no signal on a hard question") for
    augmentation, dynamic sampling and both against grpo, overall and per frequent class; then the
    all-right split and the total."""
    lines = []
    arms = [a for a in (REFERENCE, *COMPARED_ON_SIGNAL) if runs_of(runs, a)]
    for tag, what in ((ALL_WRONG, "all-wrong groups (no signal on a hard question)"), (ALL_RIGHT, "all-right groups"),
                      (INVALID, "all zero-spread groups")):
        parts = [f"{arm} {_start_end_text(s)}" for arm in arms if (s := curve_summary(runs, arm, tag))]
        if parts:
            head = f"Invalid ratio, {what}, all classes (first → last 20% of steps, mean ± SE): "
            lines.append(head + "; ".join(parts) + ".")
    for arm in (a for a in COMPARED_ON_SIGNAL if runs_of(runs, a)):
        diff = end_difference(runs, arm, ALL_WRONG)
        if diff is None:
            continue
        per_seed = ", ".join(f"{d:+.2f}" for d in diff["diffs"])
        if math.isnan(diff["se"]):
            reading = "one seed, no SE: not read as an effect"
        elif diff["mean"] < -2 * diff["se"]:
            reading = "lower than grpo"
        elif diff["mean"] > 2 * diff["se"]:
            reading = "higher than grpo"
        else:
            reading = "no clear difference from grpo (within 2 × SE)"
        lower, compared = [], 0
        for cls in classes:
            tag = f"{ALL_WRONG}/{cls}"
            mine, ref = curve_summary(runs, arm, tag), curve_summary(runs, REFERENCE, tag)
            if mine and ref:
                compared += 1
                if mine["end"] < ref["end"]:
                    lower.append(cls)
        classes_text = (
            f"; it ended lower than grpo in {len(lower)} of {compared} frequent classes ({', '.join(lower) or 'none'})"
            if compared else ""
        )
        lines.append(
            f"{arm}, all-wrong share at the end vs grpo (paired by seed): "
            f"{mean_se_text(diff['mean'], diff['se'], 2, sign=True)} [per seed {per_seed}]: {reading}{classes_text}."
        )
    return lines


# -- REPORT.md and results.json --------------------------------------------------------------------
def _bullets(lines: Sequence[str], empty: str) -> str:
    return "\n".join(line if line.startswith("  ") else "- " + line for line in lines) or f"- {empty}"


def write_report(out: Path, results: Mapping[str, Any], figures: Mapping[str, Path]) -> Path:
    s = results["setup"]
    n_test = results["baseline"]["n"]
    seeds = len(s["seeds"])
    stage_note = ", ".join(f"stage {k}: {n} questions" for k, n in results["baseline"]["stage_n"].items())
    quick = " (**--quick smoke test: numbers are meaningless**)" if s["quick"] else ""
    findings = results["findings"]
    one_seed = " (**one seed: no standard errors**, values are shown without ±)" if seeds == 1 else ""
    text = f"""# Ablation: GRPO vs curriculum vs group diversity augmentation vs dynamic sampling

Config `{s["config"]}`{quick}; arms {", ".join(s["arms"])}; **{seeds} seed(s)** {s["seeds"]}.
Equal compute: every run stops at the same budget of **{s["completions_per_run"]} sampled completions**
({s["max_steps"]} steps × {s["batch_size"]} prompts × G={s["num_generations"]} of the base config; augmented
questions replace batch rows). Dynamic sampling resamples prompts whose group had no reward spread within the
step (up to {s["max_resample_times"]} rounds), so it samples more per step and does fewer optimizer steps.
All runs start from one format warm start ({s["warm_start_steps"]} steps, answers drawn at random from the
options, so it carries no information about the gold option; its accuracy is the first row below).
Held-out test: {n_test} questions ({stage_note}; stage 0 = least similar options = easiest), the same for
every run; greedy decoding. Mean ± SE: SE = sample standard deviation over seeds / √{seeds}{one_seed}.

## Compute per arm

{results["compute_markdown"]}

{_bullets(findings["compute"], "no run recorded its completions.")}

## Held-out accuracy (mean ± SE over {seeds} seed(s))

{results["table_markdown"]}

With {n_test} test questions one run's accuracy has a binomial standard error of about
{100 * math.sqrt(0.25 / max(1, n_test)):.1f} points at 50% accuracy.

![accuracy]({figures["accuracy"].name})

## Paired differences to plain GRPO (same seed)

{results["paired_markdown"]}

A difference is read as an effect ("helps"/"hurts") only when its mean is over 2 × noise, where noise
combines the seeds' spread of the difference (its SE) with the binomial noise of the scope's test questions.

## Findings

{_bullets(findings["accuracy"], "no accuracy.")}

### Curriculum (figure 1)

Curriculum pacing of the curriculum arms: {s.get("pacing") or "the config's own"} (`--pacing`).

{_bullets(findings["curriculum"], "no curriculum/grpo curves were logged.")}

![reward, S(q) and stage]({figures["curriculum"].name})

### No-signal groups: augmentation and dynamic sampling (figure 2)

Measured with `GroupSignalLogger` in every arm (tags `{ALL_WRONG}[/<anatomy>]`, `{ALL_RIGHT}[/<anatomy>]`,
their sum `{INVALID}[/<anatomy>]`), on the batches each arm trained on (augmented rows included); with
dynamic sampling, on the groups as first sampled, before no-signal ones were replaced: how often the policy
meets a question without signal, not how well the filter worked. Classes shown: the most frequent
({", ".join(results["frequent_classes"]) or "none logged"}). Curves are plotted against completions sampled.

{_bullets(findings["invalid_ratio"], "no invalid-ratio curves were logged.")}

![invalid gradient ratio]({figures["invalid_gradient"].name})

## Files

`results.json` (every number: tables, per-seed values, curve summaries, runs with their curves),
`configs/` (the derived YAML of each run), `predictions/` (per-question JSONL), `tensorboard/`
(`tensorboard --logdir {out / "tensorboard"}`).
"""
    path = out / "REPORT.md"
    path.write_text(text)
    return path


def summarise(
    runs: list[dict[str, Any]], baseline: Mapping[str, Any], setup: Mapping[str, Any], out: Path
) -> dict[str, Any]:
    """Tables, findings and figures from the finished runs; writes results.json and REPORT.md."""
    import matplotlib

    matplotlib.use("Agg")
    acc = baseline["accuracy"]
    arms = setup["arms"]
    table = accuracy_table(runs, arms, {"overall": acc["n"], **acc["stage_n"]})
    compute = compute_table(runs, arms)
    classes = frequent_classes(runs, SIGNAL_ARMS)
    figures = {
        "curriculum": plot_curriculum(runs, arms, out / "fig_curriculum.png"),
        "invalid_gradient": plot_invalid_ratio(runs, classes, out / "fig_invalid_gradient.png"),
        "accuracy": plot_accuracy(table, acc, out / "fig_accuracy.png"),
    }
    results = {
        "setup": dict(setup),
        "baseline": acc,
        "table": table,
        "table_markdown": table_markdown(table, acc),
        "paired_markdown": paired_markdown(table),
        "compute": compute,
        "compute_markdown": compute_markdown(compute),
        "frequent_classes": classes,
        "curve_summaries": {
            arm: {
                tag: curve_summary(runs, arm, tag)
                for tag in sorted({t for r in runs_of(runs, arm) for t in r["curves"]})
            }
            for arm in arms
        },
        "findings": {
            "compute": compute_findings(compute, setup["completions_per_run"]),
            "accuracy": accuracy_findings(table, acc["overall"]),
            "curriculum": curriculum_findings(runs),
            "invalid_ratio": invalid_ratio_findings(runs, classes),
        },
        "figures": {k: str(v) for k, v in figures.items()},
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=True) + "\n")
    (out / "results_summary.json").write_text(json.dumps(per_seed_summary(results), indent=1, allow_nan=True) + "\n")
    write_report(out, results, figures)
    return results


def per_seed_summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """The small file a replication compares with: per arm the per-seed held-out accuracies
    (`arms` -> name -> `seeds` -> [{seed, accuracy}]), mean ± SE, per-stage means and the paired
    difference to grpo (points, same seed)."""
    arms: dict[str, Any] = {}
    for arm, row in results["table"].items():
        entry: dict[str, Any] = {
            "seeds": [{"seed": s, "accuracy": a} for s, a in zip(row["seeds"], row["overall"])],
            "mean": row["mean"],
            "se": row["se"],
            "stage": {k: {"mean": v["mean"], "se": v["se"]} for k, v in row.get("stage", {}).items()},
        }
        paired = row.get("vs_grpo")
        if paired:
            entry["vs_grpo"] = {k: paired[k] for k in ("seeds", "diffs", "mean", "se", "noise", "effect") if k in paired}
            entry["vs_grpo"]["stage"] = {
                k: {x: v[x] for x in ("mean", "se", "noise", "effect") if x in v} for k, v in paired.get("stage", {}).items()
            }
        arms[arm] = entry
    table = results["table"]
    if "dynamic" in table:  # the peers' answer to no-signal groups: the bar the two ideas must also clear
        n_test = int(results["baseline"].get("n", 0) or 0)
        ref = dict(zip(table["dynamic"]["seeds"], table["dynamic"]["overall"]))
        for arm, row in table.items():
            if arm != "dynamic":
                vs = paired_difference(dict(zip(row["seeds"], row["overall"])), ref, n_test)
                if vs:
                    arms[arm]["vs_dynamic"] = {k: vs[k] for k in ("seeds", "diffs", "mean", "se", "noise", "effect")}
    return {"setup": results["setup"], "baseline": results["baseline"], "arms": arms,
            "findings": results["findings"]}
