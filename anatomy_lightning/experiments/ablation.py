"""Ablation of the two Anatomy-R1 ideas on the synthetic benchmark: grpo / curriculum / augmentation / both.

`python -m anatomy_lightning.experiments.ablation [--seeds 0 1 2] [--max-steps N] [--out outputs/ablation]
[--config configs/demo.yaml] [--quick]` trains four arms at equal compute (same max_steps, batch_size
and num_generations, so the same number of sampled completions; the augmentation *replaces* batch
rows, it does not add any) for every seed, tests each on the same held-out questions, and writes
`<out>/REPORT.md` (figures in the style of the paper's, an accuracy table, findings in words),
`<out>/results.json` (every number) and the PNGs.

Why this shape:
* one format warm start shared by every arm and seed, so all runs start from the same policy and
  the baseline ("before GRPO") is measured once;
* the synthetic data's seed is fixed (same train/val/test questions); `seed_everything` and the
  augmentation's seed vary with the run's seed;
* each arm gets its own derived YAML (the config with the two sections switched on or off): a
  LightningCLI `trainer.callbacks` list cannot be edited entry by entry from the command line;
* `GroupSignalLogger` (below) is added to every arm: `GroupDiversityCallback` logs the invalid
  gradient ratio per anatomy class only when it is enabled, and plain GRPO is exactly the arm it
  must be compared against. Its tags are `ablation/invalid_gradient_ratio[/<anatomy>]`.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import Tensor

log = logging.getLogger("anatomy_lightning.ablation")

ARMS: dict[str, tuple[bool, bool]] = {  # arm -> (curriculum on, augmentation on)
    "grpo": (False, False),
    "curriculum": (True, False),
    "augmentation": (False, True),
    "both": (True, True),
}
CURRICULUM = "anatomy_lightning.callbacks.curriculum.CurriculumCallback"
AUGMENTATION = "anatomy_lightning.callbacks.augmentation.GroupDiversityCallback"
SIGNAL_LOGGER = "anatomy_lightning.experiments.ablation.GroupSignalLogger"  # not __name__: "__main__" under -m
SIGNAL_PREFIX = "ablation/invalid_gradient_ratio"
# TensorBoard tags kept in results.json (prefix match)
TAG_PREFIXES = ("train/reward", "train/invalid_gradient_ratio", "curriculum/", "ablation/", "augment/", "val/acc")

# --quick: a smoke test of the whole pipeline (4 arms, 1 seed) in about a minute on a free CPU;
# its numbers mean nothing (the policy barely leaves the warm start)
QUICK_OVERRIDES: dict[str, Any] = {
    "trainer.max_steps": 2,
    "trainer.val_check_interval": 2,  # one validation, at the end
    "data.synthetic.n_train": 32,
    "data.synthetic.n_val": 6,
    "data.synthetic.n_test": 12,
    "data.batch_size": 2,
    "data.eval_batch_size": 16,
    "model.num_generations": 2,
    "model.max_new_tokens": 10,
}
QUICK_CURRICULUM = {"max_steps_per_stage": 1}  # so the quick run promotes at least once
# jaccard: diverse-subset selection without loading MiniLM; max_fraction 0.5: with 2 prompts per
# batch the default 0.25 would inject nothing
QUICK_AUGMENTATION = {"encoder": "jaccard", "max_fraction": 0.5}
QUICK_WARM_START = {"steps": 4, "batch_size": 4}


# -- the extra logger ----------------------------------------------------------------------------
class GroupSignalLogger(Callback):
    """Logs the invalid gradient ratio (share of groups with zero reward spread), overall and per
    anatomy class, in every arm, from the (N, G) rewards `training_step` returns.

    `GroupDiversityCallback` logs the same figures only when it is enabled; measuring all four arms
    with this one callback keeps the GRPO-vs-augmentation comparison like for like.
    """

    def __init__(self, std_tol: float = 1e-6) -> None:
        self.std_tol = std_tol

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        from anatomy_lightning.augment.augmenter import group_signal_stats
        from anatomy_lightning.callbacks.curriculum import _questions

        rewards = outputs.get("group_rewards") if isinstance(outputs, Mapping) else None
        questions = _questions(batch)
        if not isinstance(rewards, Tensor) or not questions or len(questions) != rewards.shape[0]:
            return  # a skipped step, or a batch this logger does not understand: log nothing
        stats = group_signal_stats(questions, rewards, self.std_tol)
        metrics = {
            k.replace("invalid_gradient_ratio", SIGNAL_PREFIX, 1): v
            for k, v in stats.items()
            if k.startswith("invalid_gradient_ratio")
        }
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(questions))


# -- settings and derived configs ----------------------------------------------------------------
@dataclass
class Settings:
    """What one ablation run is: paths, seeds, arms and the overrides applied to the base config."""

    config: Path
    out: Path
    seeds: list[int]
    arms: list[str]
    max_steps: int | None = None
    warm_start_steps: int = 300  # as the demo
    quick: bool = False
    force: bool = False
    extra: list[str] = field(default_factory=list)  # passed through to every fit/test call


def set_key(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    """`cfg["a"]["b"] = value` for "a.b", creating missing mappings."""
    *parents, last = dotted.split(".")
    node = cfg
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def get_key(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def load_base(settings: Settings) -> dict[str, Any]:
    """The user's config as a plain dict (interpolations such as ${run_name} kept), with the
    settings that are the same for every run: step budget, output folders, --quick sizes."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(settings.config), resolve=False)
    assert isinstance(cfg, dict)
    overrides: dict[str, Any] = dict(QUICK_OVERRIDES) if settings.quick else {}
    if settings.max_steps is not None:
        overrides["trainer.max_steps"] = settings.max_steps
    for key, value in overrides.items():
        set_key(cfg, key, value)
    out = settings.out.resolve()
    # the data lives with the ablation so a concurrent demo (outputs/synthetic) cannot rewrite it
    set_key(cfg, "data.synthetic.out_dir", str(out / "synthetic"))
    set_key(cfg, "trainer.default_root_dir", str(out / "runs" / "${run_name}"))
    if get_key(cfg, "trainer.logger.class_path", "").endswith("TensorBoardLogger"):
        set_key(cfg, "trainer.logger.init_args.save_dir", str(out / "tensorboard"))
    else:
        raise ValueError(
            f"{settings.config}: the ablation reads TensorBoard files; trainer.logger must be a TensorBoardLogger"
        )
    if not get_key(cfg, "trainer.max_steps"):
        raise ValueError(
            f"{settings.config}: set trainer.max_steps (or --max-steps); equal compute needs a step budget"
        )
    return cfg


SECTIONS = {CURRICULUM: "curriculum", AUGMENTATION: "augmentation"}  # their top-level config sections


def _callback(cfg: dict[str, Any], class_path: str) -> dict[str, Any]:
    """The settings of the curriculum or the augmentation: its top-level section (made if absent)."""
    section = cfg.get(SECTIONS[class_path])
    if not isinstance(section, dict):
        section = cfg[SECTIONS[class_path]] = {}
    return section


def derive_config(base: dict[str, Any], arm: str, seed: int, run_name: str, phase: str, quick: bool) -> dict[str, Any]:
    """The config of one run: `base` with the arm's callbacks switched, the run's seed and name, the
    signal logger added and a checkpoint exactly at max_steps. `phase` ("fit"/"test") names the
    TensorBoard version folder, so the training curves of a run are in `<run_name>/fit`."""
    cfg = json.loads(json.dumps(base))  # deep copy of plain data
    curriculum_on, augmentation_on = ARMS[arm]
    cfg["run_name"], cfg["seed_everything"] = run_name, seed
    set_key(cfg, "trainer.logger.init_args.version", phase)
    curriculum = _callback(cfg, CURRICULUM)
    curriculum["enabled"] = curriculum_on
    if quick:
        curriculum.update(QUICK_CURRICULUM)
    augmentation = _callback(cfg, AUGMENTATION)
    augmentation["enabled"], augmentation["seed"] = augmentation_on, seed
    if quick:
        augmentation.update(QUICK_AUGMENTATION)
    callbacks = cfg["trainer"]["callbacks"]
    callbacks.append({"class_path": SIGNAL_LOGGER})
    max_steps = int(cfg["trainer"]["max_steps"])
    for entry in callbacks:  # one checkpoint, at the end: last.ckpt is then exactly the max_steps policy
        args = entry.get("init_args", {}) if isinstance(entry, dict) else {}
        if "every_n_train_steps" in args:
            args["every_n_train_steps"] = max_steps
    return cfg


def write_yaml(cfg: dict[str, Any], path: Path) -> Path:
    from omegaconf import OmegaConf

    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


def run_name_of(arm: str, seed: int) -> str:
    return f"ablation_{arm}_s{seed}"


# -- running -------------------------------------------------------------------------------------
def _cli(args: list[str]) -> Any:
    """`python -m anatomy_lightning <args>`, in this process. sys.argv is emptied for the call:
    LightningCLI warns when it is given `args` while the process has command-line arguments."""
    from anatomy_lightning.cli import main

    log.info("anatomy_lightning %s", " ".join(args))
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        return main(args)
    finally:
        sys.argv = saved


def warm_start(base: dict[str, Any], settings: Settings) -> Path:
    """The shared starting policy: the demo's format warm start (answer form "text"), done once."""
    from anatomy_lightning.demo import _synthetic_questions
    from anatomy_lightning.grpo.rollout import DEFAULT_PROMPT_TEMPLATE
    from anatomy_lightning.warm_start import cache_dir, format_warm_start

    sizes = dict(QUICK_WARM_START) if settings.quick else {"steps": settings.warm_start_steps}
    model = str(base["model"]["model"])
    template = str(base["model"].get("prompt_template") or DEFAULT_PROMPT_TEMPLATE)
    # the folder name carries what the cached warm start depends on, so a --quick one is never reused
    folder = cache_dir(settings.out.resolve(), model, base["data"]["synthetic"], template, sizes, steps=sizes["steps"], answer_form="text")
    return format_warm_start(model, _synthetic_questions(base), folder, **sizes, seed=0, answer_form="text", template=template)


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _cached(marker: Path, fingerprint: str) -> dict[str, Any] | None:
    """The record of a finished run with the same inputs, so a rerun after a crash skips it."""
    if not marker.exists():
        return None
    record = json.loads(marker.read_text())
    if record.get("fingerprint") != fingerprint or not Path(record.get("predictions", "")).exists():
        return None
    return record


def evaluate_policy(test_yaml: Path, warm: Path, predictions: Path, ckpt: Path | None, extra: list[str]) -> None:
    args = ["test", "--config", str(test_yaml), f"--model.model={warm}", f"--model.predictions_file={predictions}"]
    if ckpt is not None:
        args.append(f"--ckpt_path={ckpt}")
    _cli([*args, *extra])


def run_baseline(base: dict[str, Any], warm: Path, settings: Settings) -> dict[str, Any]:
    """Test the warm-started policy once: the accuracy every arm starts from."""
    out = settings.out.resolve()
    name = "ablation_baseline"
    cfg = derive_config(base, "grpo", 0, name, "test", settings.quick)
    test_yaml = write_yaml(cfg, out / "configs" / f"{name}.test.yaml")
    predictions = out / "predictions" / "baseline.jsonl"
    marker = out / "runs" / name / "result.json"
    fingerprint = _fingerprint(cfg, str(warm), settings.extra)
    record = None if settings.force else _cached(marker, fingerprint)
    if record is None:
        evaluate_policy(test_yaml, warm, predictions, None, settings.extra)
        record = {"fingerprint": fingerprint, "predictions": str(predictions)}
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(record, indent=1) + "\n")
    return {**record, "accuracy": accuracy_from_predictions(read_jsonl(predictions))}


def run_arm(base: dict[str, Any], warm: Path, arm: str, seed: int, settings: Settings) -> dict[str, Any]:
    """fit then test one arm with one seed; returns its accuracy figures and training curves."""
    out = settings.out.resolve()
    name = run_name_of(arm, seed)
    fit_cfg = derive_config(base, arm, seed, name, "fit", settings.quick)
    fit_yaml = write_yaml(fit_cfg, out / "configs" / f"{name}.fit.yaml")
    test_yaml = write_yaml(
        derive_config(base, arm, seed, name, "test", settings.quick), out / "configs" / f"{name}.test.yaml"
    )
    predictions = out / "predictions" / f"{name}.jsonl"
    tb_dir = out / "tensorboard" / name
    ckpt_dir = Path(str(get_checkpoint_dir(fit_cfg)).replace("${run_name}", name))
    marker = out / "runs" / name / "result.json"
    fingerprint = _fingerprint(fit_cfg, str(warm), settings.extra)
    record = None if settings.force else _cached(marker, fingerprint)
    if record is None:
        for stale in ckpt_dir.glob("*.ckpt"):  # a fresh run, never a resume of an older one
            stale.unlink()
        shutil.rmtree(tb_dir, ignore_errors=True)
        t0 = time.perf_counter()
        fit = _cli(["fit", "--config", str(fit_yaml), f"--model.model={warm}", *settings.extra])
        steps = int(fit.trainer.global_step)
        del fit  # free this run's policy and optimizer before the next one is built
        gc.collect()
        evaluate_policy(test_yaml, warm, predictions, ckpt_dir / "last.ckpt", settings.extra)
        record = {
            "fingerprint": fingerprint,
            "predictions": str(predictions),
            "steps": steps,
            "wall_seconds": round(time.perf_counter() - t0, 1),
        }
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(record, indent=1) + "\n")
    if record["steps"] != int(fit_cfg["trainer"]["max_steps"]):
        log.warning(
            "%s stopped at step %s of %s: compute is not equal across arms",
            name,
            record["steps"],
            fit_cfg["trainer"]["max_steps"],
        )
    return {
        "arm": arm,
        "seed": seed,
        "run_name": name,
        "steps": record["steps"],
        "wall_seconds": record.get("wall_seconds"),
        "accuracy": accuracy_from_predictions(read_jsonl(predictions)),
        "curves": read_scalars(tb_dir / "fit"),
    }


def get_checkpoint_dir(cfg: Mapping[str, Any]) -> str:
    for entry in get_key(cfg, "trainer.callbacks", []) or []:
        dirpath = (entry.get("init_args") or {}).get("dirpath") if isinstance(entry, dict) else None
        if dirpath:
            return str(dirpath)
    raise ValueError("the config has no checkpoint callback with a dirpath; the test needs the run's last.ckpt")


# -- reading results -----------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def accuracy_from_predictions(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Overall, per difficulty stage and per anatomy accuracy of a predictions JSONL."""
    by: dict[str, dict[str, list[bool]]] = {"stage": defaultdict(list), "anatomy": defaultdict(list)}
    for r in rows:
        by["stage"][str(r.get("stage"))].append(bool(r["correct"]))
        by["anatomy"][str(r.get("anatomy"))].append(bool(r["correct"]))
    return {
        "overall": sum(bool(r["correct"]) for r in rows) / max(1, len(rows)),
        "n": len(rows),
        "stage": {k: sum(v) / len(v) for k, v in sorted(by["stage"].items())},
        "stage_n": {k: len(v) for k, v in sorted(by["stage"].items())},
        "anatomy": {k: sum(v) / len(v) for k, v in sorted(by["anatomy"].items())},
    }


def read_scalars(event_dir: Path) -> dict[str, list[list[float]]]:
    """{tag: [[step, value], ...]} of the TensorBoard scalars we plot (all events in the folder)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not event_dir.exists():
        log.warning("no TensorBoard folder %s", event_dir)
        return {}
    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    acc.Reload()
    curves = {}
    for tag in acc.Tags().get("scalars", []):
        if tag.startswith(TAG_PREFIXES):
            curves[tag] = [[float(e.step), float(e.value)] for e in acc.Scalars(tag)]
    return curves


# -- statistics ----------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


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
    """Mean and min-max over seeds of smoothed curves, on the steps all seeds cover.

    Each seed's curve is smoothed on its own points, then interpolated onto the union of steps
    inside the range every seed covers (per-class curves have gaps where a class is absent).
    """
    import numpy as np

    series = [s for s in series if len(s) > 0]
    if not series:
        return None
    lo_step = max(s[0][0] for s in series)
    hi_step = min(s[-1][0] for s in series)
    grid = sorted({p[0] for s in series for p in s if lo_step <= p[0] <= hi_step})
    if not grid:
        return None
    stacked = []
    for s in series:
        steps = [p[0] for p in s]
        smooth = moving_average([p[1] for p in s], smoothing_window(len(s)))
        stacked.append(np.interp(grid, steps, smooth))
    arr = np.vstack(stacked)
    return {"step": list(grid), "mean": arr.mean(0).tolist(), "min": arr.min(0).tolist(), "max": arr.max(0).tolist()}


def start_end(points: Sequence[Sequence[float]], fraction: float = 0.2) -> tuple[float, float] | None:
    """Mean value over the first and the last `fraction` of a run's points (raw, not smoothed)."""
    if not points:
        return None
    k = max(1, round(len(points) * fraction))
    head, tail = [p[1] for p in points[:k]], [p[1] for p in points[-k:]]
    return sum(head) / len(head), sum(tail) / len(tail)


def _runs_of(runs: Sequence[Mapping[str, Any]], arm: str) -> list[Mapping[str, Any]]:
    return [r for r in runs if r["arm"] == arm]


def curve_summary(runs: Sequence[Mapping[str, Any]], arm: str, tag: str) -> dict[str, Any] | None:
    """Start and end value of a tag, each averaged over the arm's seeds (with the seeds' spread)."""
    pairs = [start_end(r["curves"].get(tag, [])) for r in _runs_of(runs, arm)]
    pairs = [p for p in pairs if p is not None]
    if not pairs:
        return None
    start, start_sd = mean_std([p[0] for p in pairs])
    end, end_sd = mean_std([p[1] for p in pairs])
    return {"start": start, "start_std": start_sd, "end": end, "end_std": end_sd, "seeds": len(pairs)}


def accuracy_table(runs: Sequence[Mapping[str, Any]], arms: Sequence[str]) -> dict[str, Any]:
    """Per arm: mean/std/per-seed accuracy overall and per stage, and the paired difference to grpo."""
    table: dict[str, Any] = {}
    for arm in arms:
        rs = sorted(_runs_of(runs, arm), key=lambda r: r["seed"])
        overall = [r["accuracy"]["overall"] for r in rs]
        stages = sorted({k for r in rs for k in r["accuracy"]["stage"]})
        row: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "overall": overall}
        row["mean"], row["std"] = mean_std(overall)
        row["stage"] = {}
        for k in stages:
            vals = [r["accuracy"]["stage"][k] for r in rs if k in r["accuracy"]["stage"]]
            m, s = mean_std(vals)
            row["stage"][k] = {"mean": m, "std": s, "values": vals}
        table[arm] = row
    if "grpo" in table:
        ref = dict(zip(table["grpo"]["seeds"], table["grpo"]["overall"]))
        for arm, row in table.items():
            diffs = [a - ref[s] for s, a in zip(row["seeds"], row["overall"]) if s in ref]
            m, s = mean_std(diffs)
            row["vs_grpo"] = {"diffs": diffs, "mean": m, "std": s}
    return table


def difference_noise(diff_std: float, k: int, p: float, n: int) -> float:
    """Standard error of a mean paired accuracy difference over k seeds: the seeds' spread plus the
    binomial noise of n test questions (two runs' worth). Differences under 2x this are not read
    as an effect."""
    seed_part = (diff_std**2) / k if k > 1 else 0.0
    test_part = 2 * p * (1 - p) / max(1, n) / max(1, k)
    return math.sqrt(seed_part + test_part)


# -- findings in words ---------------------------------------------------------------------------
def _pts(x: float) -> str:
    return f"{100 * x:+.1f} points"


def accuracy_findings(table: Mapping[str, Any], baseline: float, n_test: int) -> list[str]:
    lines = []
    arms = [a for a in table if not math.isnan(table[a]["mean"])]
    if not arms:
        return ["No arm produced a test accuracy."]
    top = max(table[a]["mean"] for a in arms)
    tied = [a for a in arms if table[a]["mean"] >= top - 1e-9]
    ranking = ", ".join(f"{a} {table[a]['mean']:.3f}" for a in sorted(arms, key=lambda a: -table[a]["mean"]))
    if len(tied) == len(arms) > 1:
        lines.append(
            f"No arm was best: all reached the same mean held-out accuracy {top:.3f} (warm-start baseline {baseline:.3f})."
        )
    else:
        best = " and ".join(f"**{a}**" for a in tied) + (" (tied)" if len(tied) > 1 else "")
        lines.append(f"Best mean held-out accuracy: {best} ({ranking}; warm-start baseline {baseline:.3f}).")
    for arm in arms:
        gain = table[arm]["mean"] - baseline
        lines.append(
            f"{arm}: {table[arm]['mean']:.3f} ± {table[arm]['std']:.3f} over {len(table[arm]['seeds'])} seed(s), {_pts(gain)} over the warm start."
        )
    if "grpo" not in table:
        return lines
    g = table["grpo"]
    for arm in (a for a in arms if a != "grpo"):
        row, vs = table[arm], table[arm]["vs_grpo"]
        k = len(vs["diffs"])
        if k == 0:
            continue
        noise = difference_noise(vs["std"], k, (row["mean"] + g["mean"]) / 2, n_test)
        per_seed = ", ".join(f"{100 * d:+.1f}" for d in vs["diffs"])
        numbers = (
            f"{row['mean']:.3f} vs {g['mean']:.3f}, difference {_pts(vs['mean'])}, per-seed differences [{per_seed}], "
            f"seed spread {100 * vs['std']:.1f} points, 2×SE {100 * 2 * noise:.1f} points"
        )
        if vs["mean"] > 2 * noise:
            verdict = f"{arm} raised accuracy over plain GRPO ({numbers})."
        elif vs["mean"] < -2 * noise:
            verdict = f"{arm} lowered accuracy compared with plain GRPO ({numbers})."
        elif vs["mean"] > 0:
            verdict = f"{arm} did not raise accuracy measurably over plain GRPO here: the gain is within the noise ({numbers})."
        else:
            verdict = f"{arm} did not raise accuracy over plain GRPO here ({numbers})."
        lines.append(verdict)
        lines.extend(_stage_findings(arm, row, g))
    return lines


def _stage_findings(arm: str, row: Mapping[str, Any], grpo: Mapping[str, Any]) -> list[str]:
    parts = []
    for k, cell in row["stage"].items():
        if k in grpo["stage"]:
            parts.append(
                f"stage {k} {cell['mean']:.3f} vs {grpo['stage'][k]['mean']:.3f} ({_pts(cell['mean'] - grpo['stage'][k]['mean'])})"
            )
    return [f"  - {arm} per difficulty stage vs grpo: " + "; ".join(parts) + "."] if parts else []


def curriculum_findings(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = []
    for tag, what in (("curriculum/batch_similarity", "batch mean S(q)"), ("train/reward", "mean training reward")):
        cur, base = curve_summary(runs, "curriculum", tag), curve_summary(runs, "grpo", tag)
        if cur is None or base is None:
            continue
        lines.append(
            f"{what}: curriculum {cur['start']:.3f} → {cur['end']:.3f}, plain GRPO {base['start']:.3f} → {base['end']:.3f} "
            f"(first and last 20% of steps, mean over seeds; end spread ±{cur['end_std']:.3f} / ±{base['end_std']:.3f})."
        )
    stages = [
        max((p[1] for p in r["curves"].get("curriculum/stage", [])), default=float("nan"))
        for r in _runs_of(runs, "curriculum")
    ]
    if stages:
        lines.append(f"Highest curriculum stage reached per seed: {', '.join(f'{s:.0f}' for s in stages)}.")
    sim = curve_summary(runs, "curriculum", "curriculum/batch_similarity")
    if sim is not None and sim["end"] <= sim["start"]:
        lines.append(
            "The curriculum's batch S(q) did not rise over training here (no promotion to harder stages, or too late to show)."
        )
    reward_c, reward_g = curve_summary(runs, "curriculum", "train/reward"), curve_summary(runs, "grpo", "train/reward")
    if reward_c and reward_g:
        rise_c, rise_g = reward_c["end"] - reward_c["start"], reward_g["end"] - reward_g["start"]
        verdict = "climbed faster" if rise_c > rise_g else "did not climb faster"
        lines.append(
            f"The training reward {verdict} under the curriculum than under plain GRPO ({rise_c:+.3f} vs {rise_g:+.3f}, "
            "start to end); the curriculum's reward comes from its own, easier, batches, so held-out accuracy is the fair comparison."
        )
    return lines


def augmentation_findings(runs: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> list[str]:
    lines = []
    lower, compared = [], 0
    for cls in [None, *classes]:
        tag = SIGNAL_PREFIX if cls is None else f"{SIGNAL_PREFIX}/{cls}"
        aug, base = curve_summary(runs, "augmentation", tag), curve_summary(runs, "grpo", tag)
        if aug is None or base is None:
            continue
        label = "overall" if cls is None else cls
        lines.append(
            f"invalid gradient ratio, {label}: augmentation {aug['start']:.2f} → {aug['end']:.2f}, plain GRPO {base['start']:.2f} → {base['end']:.2f}."
        )
        if cls is None and aug["end"] >= base["end"]:
            lines.append(
                f"Augmentation did not lower the overall invalid gradient ratio at the end of training here "
                f"({aug['end']:.2f} vs {base['end']:.2f}, seed spread ±{aug['end_std']:.2f} / ±{base['end_std']:.2f})."
            )
        if cls is not None:
            compared += 1
            if aug["end"] < base["end"]:
                lower.append(cls)
    if compared:
        verdict = "lowered" if len(lower) > compared / 2 else "did not lower"
        lines.append(
            f"Augmentation {verdict} the end-of-training invalid gradient ratio in most classes: lower than GRPO in "
            f"{len(lower)} of {compared} ({', '.join(lower) or 'none'})."
        )
    return lines


# -- figures -------------------------------------------------------------------------------------
ARM_COLOURS = {"grpo": "tab:gray", "curriculum": "tab:blue", "augmentation": "tab:orange", "both": "tab:green"}


def _plot_band(ax: Any, runs: Sequence[Mapping[str, Any]], arm: str, tag: str) -> bool:
    """One arm's curve for `tag`: mean over seeds, min-max band; False when no run logged it."""
    from matplotlib.ticker import MaxNLocator

    agg = aggregate_curve([r["curves"].get(tag, []) for r in _runs_of(runs, arm)])
    if agg is None:
        return False
    colour = ARM_COLOURS.get(arm)
    marker = "o" if len(agg["step"]) < 20 else None  # a one- or two-point curve would be invisible
    ax.plot(agg["step"], agg["mean"], color=colour, label=arm, lw=1.8, marker=marker, ms=4)
    ax.fill_between(agg["step"], agg["min"], agg["max"], color=colour, alpha=0.2, lw=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return True


def _last_step(runs: Sequence[Mapping[str, Any]]) -> float:
    """The x-axis end shared by every panel (a class seen at one step only would get its own axis)."""
    return max([1.0] + [pts[-1][0] for r in runs for pts in r["curves"].values() if pts])


def plot_curriculum(runs: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Paper-style figure 1: reward and batch S(q) against step, GRPO vs curriculum."""
    import matplotlib.pyplot as plt

    panels = (
        ("train/reward", "mean reward"),
        ("curriculum/batch_similarity", "batch mean S(q)"),
        ("curriculum/stage", "curriculum stage"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (tag, title) in zip(axes, panels):
        for arm in ("grpo", "curriculum"):
            _plot_band(ax, runs, arm, tag)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_xlim(-0.03 * _last_step(runs), 1.03 * _last_step(runs))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle("GRPO vs Anatomical Similarity Curriculum (mean over seeds, shaded min-max, moving average)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def frequent_classes(runs: Sequence[Mapping[str, Any]], k: int = 5) -> list[str]:
    """The k anatomy classes with the most logged batches in the grpo and augmentation runs."""
    counts: dict[str, int] = defaultdict(int)
    for r in runs:
        if r["arm"] in ("grpo", "augmentation"):
            for tag, points in r["curves"].items():
                if tag.startswith(SIGNAL_PREFIX + "/"):
                    counts[tag[len(SIGNAL_PREFIX) + 1 :]] += len(points)
    return sorted(counts, key=lambda c: (-counts[c], c))[:k]


def plot_invalid_ratio(runs: Sequence[Mapping[str, Any]], classes: Sequence[str], path: Path) -> Path:
    """Paper-style figure 2: invalid gradient ratio per anatomy class, GRPO vs augmentation."""
    import matplotlib.pyplot as plt

    tags = [(SIGNAL_PREFIX, "all classes")] + [(f"{SIGNAL_PREFIX}/{c}", c) for c in classes]
    cols = 3
    rows = math.ceil(len(tags) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False, sharey=True)
    for ax, (tag, title) in zip(axes.flat, tags):
        for arm in ("grpo", "augmentation"):
            _plot_band(ax, runs, arm, tag)
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlim(-0.03 * _last_step(runs), 1.03 * _last_step(runs))
        ax.grid(alpha=0.3)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(tags) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("invalid gradient ratio")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend()
    fig.suptitle("Invalid gradient ratio (groups with zero reward spread): GRPO vs Group Diversity Augmentation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy(table: Mapping[str, Any], baseline: float, path: Path) -> Path:
    """Held-out accuracy per arm: bars for the mean, dots for the seeds, a line for the warm start."""
    import matplotlib.pyplot as plt

    arms = list(table)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, arm in enumerate(arms):
        ax.bar(i, table[arm]["mean"], color=ARM_COLOURS.get(arm), alpha=0.7)
        ax.scatter([i] * len(table[arm]["overall"]), table[arm]["overall"], color="black", s=12, zorder=3)
    ax.axhline(baseline, color="red", ls="--", lw=1, label=f"warm start {baseline:.3f}")
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the report ----------------------------------------------------------------------------------
def table_markdown(table: Mapping[str, Any], baseline: Mapping[str, Any]) -> str:
    stages = sorted({k for row in table.values() for k in row["stage"]} | set(baseline["stage"]))
    head = ["arm", "overall", *(f"stage {k}" for k in stages), "Δ vs grpo (paired)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(
        "| warm start (before GRPO) | "
        + " | ".join(
            [f"{baseline['overall']:.3f}", *(f"{baseline['stage'].get(k, float('nan')):.3f}" for k in stages), "—"]
        )
        + " |"
    )
    for arm, row in table.items():
        cells = [f"{row['mean']:.3f} ± {row['std']:.3f}"]
        for k in stages:
            cell = row["stage"].get(k)
            cells.append("—" if cell is None else f"{cell['mean']:.3f} ± {cell['std']:.3f}")
        vs = row.get("vs_grpo")
        cells.append(
            "—" if arm == "grpo" or not vs or not vs["diffs"] else f"{_pts(vs['mean'])} ± {100 * vs['std']:.1f}"
        )
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, results: Mapping[str, Any], figures: Mapping[str, Path]) -> Path:
    s = results["setup"]
    stage_note = ", ".join(f"stage {k}: {n} questions" for k, n in results["baseline"]["stage_n"].items())
    text = f"""# Ablation: GRPO vs Anatomical Similarity Curriculum vs Group Diversity Augmentation

Config `{s["config"]}`{" (**--quick smoke test: numbers are meaningless**)" if s["quick"] else ""}; arms {", ".join(s["arms"])};
seeds {s["seeds"]}; {s["max_steps"]} optimizer steps × {s["batch_size"]} prompts × G={s["num_generations"]} completions
= {s["completions_per_run"]} sampled completions per run in every arm (equal compute: augmented questions replace
batch rows). All runs start from one format warm start ({s["warm_start_steps"]} steps, answers drawn at random from
the options, so it carries no information about the gold option; its measured accuracy is the first row below). Held-out test: {results["baseline"]["n"]} questions ({stage_note}; stage 0 = least
similar options = easiest), the same for every run; greedy decoding.

## Held-out accuracy (mean ± std over seeds)

{results["table_markdown"]}

Δ vs grpo: mean and std of the per-seed difference to the grpo run with the same seed.
With {results["baseline"]["n"]} test questions one run's accuracy has a binomial standard error of about
{100 * math.sqrt(0.25 / max(1, results["baseline"]["n"])):.1f} points at 50% accuracy.

![accuracy]({figures["accuracy"].name})

## Findings

{chr(10).join("- " + line if not line.startswith("  ") else line for line in results["findings"]["accuracy"])}

### Curriculum (figure 1)

{chr(10).join("- " + line for line in results["findings"]["curriculum"]) or "- no curriculum/grpo curves were logged."}

![reward and S(q)]({figures["curriculum"].name})

### Augmentation (figure 2)

Measured with `GroupSignalLogger` in every arm (tags `{SIGNAL_PREFIX}[/<anatomy>]`), on the batches
each arm trained on (augmented rows included).

{chr(10).join("- " + line for line in results["findings"]["augmentation"]) or "- no invalid-gradient curves were logged."}

![invalid gradient ratio]({figures["invalid_gradient"].name})

## Files

`results.json` (every number and curve), `configs/` (the derived YAML of each run), `predictions/`
(per-question JSONL), `tensorboard/` (`tensorboard --logdir {out / "tensorboard"}`).
"""
    path = out / "REPORT.md"
    path.write_text(text)
    return path


def _setup_summary(base: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    steps = int(base["trainer"]["max_steps"])
    batch, G = int(get_key(base, "data.batch_size", 1)), int(get_key(base, "model.num_generations", 1))
    iters = int(get_key(base, "model.num_iterations", 1) or 1)
    return {
        "config": str(settings.config),
        "quick": settings.quick,
        "arms": settings.arms,
        "seeds": settings.seeds,
        "max_steps": steps,
        "batch_size": batch,
        "num_generations": G,
        "num_iterations": iters,
        "completions_per_run": math.ceil(steps / iters) * batch * G,
        "warm_start_steps": QUICK_WARM_START["steps"] if settings.quick else settings.warm_start_steps,
        "extra_args": settings.extra,
    }


def summarise(
    runs: list[dict[str, Any]], baseline: Mapping[str, Any], setup: Mapping[str, Any], out: Path
) -> dict[str, Any]:
    """Tables, findings and figures from the finished runs; writes results.json and REPORT.md."""
    import matplotlib

    matplotlib.use("Agg")
    table = accuracy_table(runs, setup["arms"])
    acc = baseline["accuracy"]
    classes = frequent_classes(runs)
    figures = {
        "curriculum": plot_curriculum(runs, out / "fig_curriculum.png"),
        "invalid_gradient": plot_invalid_ratio(runs, classes, out / "fig_invalid_gradient.png"),
        "accuracy": plot_accuracy(table, acc["overall"], out / "fig_accuracy.png"),
    }
    results = {
        "setup": dict(setup),
        "baseline": acc,
        "table": table,
        "table_markdown": table_markdown(table, acc),
        "frequent_classes": classes,
        "curve_summaries": {
            arm: {
                tag: curve_summary(runs, arm, tag)
                for tag in sorted({t for r in _runs_of(runs, arm) for t in r["curves"]})
            }
            for arm in setup["arms"]
        },
        "findings": {
            "accuracy": accuracy_findings(table, acc["overall"], acc["n"]),
            "curriculum": curriculum_findings(runs),
            "augmentation": augmentation_findings(runs, classes),
        },
        "figures": {k: str(v) for k, v in figures.items()},
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=True) + "\n")
    write_report(out, results, figures)
    return results


# -- entry point ---------------------------------------------------------------------------------
def run_ablation(settings: Settings) -> dict[str, Any]:
    """Warm start once, test it, fit+test every arm × seed, then write the report."""
    unknown = [a for a in settings.arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    out = settings.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = load_base(settings)
    t0 = time.perf_counter()
    warm = warm_start(base, settings)
    baseline = run_baseline(base, warm, settings)
    runs = []
    for seed in settings.seeds:
        for arm in settings.arms:
            log.info("ablation: arm %s, seed %d", arm, seed)
            runs.append(run_arm(base, warm, arm, seed, settings))
    results = summarise(runs, baseline, _setup_summary(base, settings), out)
    print(f"\nablation ({time.perf_counter() - t0:.0f} s): held-out accuracy, mean ± std over seeds {settings.seeds}\n")
    print(results["table_markdown"])
    print()
    for line in results["findings"]["accuracy"]:
        print(line)
    print(f"\nreport: {out / 'REPORT.md'}   numbers: {out / 'results.json'}")
    return results


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default="outputs/ablation")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (0 with --quick)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--max-steps", type=int, default=None, help="override trainer.max_steps (every arm)")
    parser.add_argument("--warm-start-steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed: a smoke test of the pipeline")
    parser.add_argument("--force", action="store_true", help="rerun runs whose results are already in --out")
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
        extra=extra,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from anatomy_lightning.cli import setup_logging

    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return run_ablation(parse_args(argv))


if __name__ == "__main__":
    main()
