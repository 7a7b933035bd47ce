"""Running the ablation: the shared warm start, the baseline test, fit+test of every arm and seed
(each cached in `<out>/runs/<run_name>/result.json`), and reading back predictions and curves.

Layout under `<out>`: `configs/<run>.{fit,test}.yaml` (the derived configs), `predictions/<run>.jsonl`
(per-question test results), `tensorboard/<run>/fit` (training curves), `runs/<run>/result.json`
(the cache record: fingerprint, predictions, steps, completions, wall_seconds).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from anatomy_lightning.experiments.ablation.arms import (
    ARMS,
    TAG_PREFIXES,
    Settings,
    completion_budget,
    derive_config,
    get_checkpoint_dir,
    load_base,
    run_name_of,
    setup_summary,
    warm_start_sizes,
    write_yaml,
)
from anatomy_lightning.experiments.ablation.report import summarise
from anatomy_lightning.experiments.ablation.stats import describe, runs_of

log = logging.getLogger("anatomy_lightning.ablation")


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


def _template(base: Mapping[str, Any]) -> str:
    from anatomy_lightning.grpo.prompts import DEFAULT_PROMPT_TEMPLATE

    return str(base["model"].get("prompt_template") or DEFAULT_PROMPT_TEMPLATE)


def warm_start_dir(base: Mapping[str, Any], settings: Settings) -> Path:
    """Where the shared warm start is kept: the folder name carries what it depends on, so a --quick
    one is never reused. Part of every run's fingerprint."""
    from anatomy_lightning.warm_start import cache_dir

    sizes = warm_start_sizes(settings)
    model = str(base["model"]["model"])
    return cache_dir(
        settings.out.resolve(), model, base["data"]["synthetic"], _template(base), sizes,
        steps=sizes["steps"], answer_form="text",
    )


def warm_start(base: dict[str, Any], settings: Settings) -> Path:
    """The shared starting policy: the demo's format warm start (answer form "text"), done once."""
    from anatomy_lightning.demo import synthetic_questions
    from anatomy_lightning.warm_start import format_warm_start

    return format_warm_start(
        str(base["model"]["model"]), synthetic_questions(base), warm_start_dir(base, settings),
        **warm_start_sizes(settings), seed=0, answer_form="text", template=_template(base),
    )


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _cached(marker: Path, fingerprint: str) -> dict[str, Any] | None:
    """The record of a finished run with the same inputs, so a rerun after a crash skips it."""
    if not marker.exists():
        return None
    record = json.loads(marker.read_text())
    if record.get("fingerprint") != fingerprint:
        return None
    if record.get("predictions") is not None and not Path(record["predictions"]).exists():
        return None
    return record


def _save(marker: Path, record: dict[str, Any]) -> dict[str, Any]:
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(record, indent=1) + "\n")
    return record


def evaluate_policy(test_yaml: Path, warm: Path, predictions: Path, ckpt: Path | None, extra: list[str]) -> None:
    args = ["test", "--config", str(test_yaml), f"--model.model={warm}", f"--evaluation.predictions_file={predictions}"]
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
        record = _save(marker, {"fingerprint": fingerprint, "predictions": str(predictions)})
    return {**record, "accuracy": accuracy_from_predictions(read_jsonl(predictions))}


def run_arm(base: dict[str, Any], warm: Path, arm: str, seed: int, settings: Settings) -> dict[str, Any]:
    """fit then test one arm with one seed; returns its accuracy figures and training curves."""
    out = settings.out.resolve()
    name = run_name_of(arm, seed)
    fit_cfg = derive_config(base, arm, seed, name, "fit", settings.quick, settings.pacing)
    fit_yaml = write_yaml(fit_cfg, out / "configs" / f"{name}.fit.yaml")
    test_yaml = write_yaml(
        derive_config(base, arm, seed, name, "test", settings.quick, settings.pacing), out / "configs" / f"{name}.test.yaml"
    )
    predictions = out / "predictions" / f"{name}.jsonl"
    tb_dir = out / "tensorboard" / name
    ckpt_dir = Path(str(get_checkpoint_dir(fit_cfg)).replace("${run_name}", name))
    marker = out / "runs" / name / "result.json"
    fingerprint = _fingerprint(fit_cfg, str(warm), settings.extra)
    record = None if settings.force else _cached(marker, fingerprint)
    if record is None:
        started = marker.with_name("started.json")  # this run's fit began; its interruption saved last.ckpt
        resume = (not settings.force and (ckpt_dir / "last.ckpt").exists() and started.exists()
                  and json.loads(started.read_text()).get("fingerprint") == fingerprint)
        if resume:
            log.info("%s: resuming the interrupted fit from %s", name, ckpt_dir / "last.ckpt")
        else:
            for stale in ckpt_dir.glob("*.ckpt"):  # a fresh run, never a resume of another one
                stale.unlink()
            shutil.rmtree(tb_dir, ignore_errors=True)
            _save(started, {"fingerprint": fingerprint})
        t0 = time.perf_counter()
        resume_args = [f"--ckpt_path={ckpt_dir / 'last.ckpt'}"] if resume else []
        fit = _cli(["fit", "--config", str(fit_yaml), f"--model.model={warm}", *resume_args, *settings.extra])
        steps, completions = int(fit.trainer.global_step), int(fit.model.completions_total)
        del fit  # free this run's policy and optimizer before the next one is built
        gc.collect()
        if settings.test:
            evaluate_policy(test_yaml, warm, predictions, ckpt_dir / "last.ckpt", settings.extra)
        record = _save(marker, {
            "fingerprint": fingerprint,
            "predictions": str(predictions) if settings.test else None,
            "steps": steps,
            "completions": completions,
            "wall_seconds": round(time.perf_counter() - t0, 1),
        })
    budget = completion_budget(base)
    if record.get("completions", budget) < budget:
        log.warning("%s stopped at %s of %s completions: compute is not equal across arms", name,
                    record.get("completions"), budget)
    return {
        "arm": arm,
        "seed": seed,
        "run_name": name,
        "steps": record["steps"],
        "completions": record.get("completions"),
        "wall_seconds": record.get("wall_seconds"),
        "accuracy": accuracy_from_predictions(
            with_reference_stages(read_jsonl(predictions), out / "predictions" / "baseline.jsonl")
        ) if record.get("predictions") else None,
        "curves": read_scalars(tb_dir / "fit"),
    }


def with_reference_stages(rows: list[dict[str, Any]], reference: Path) -> list[dict[str, Any]]:
    """`rows` with each question's stage as the warm-start baseline's test staged it (the base
    config's S(q)), so an arm with S(q) settings of its own (curriculum_v2) is scored per stage on
    the same questions as every other arm. Unchanged when there is no baseline."""
    if not reference.is_file():
        return rows
    stage = {r["id"]: r.get("stage") for r in read_jsonl(reference)}
    return [{**r, "stage": stage.get(r["id"], r.get("stage"))} for r in rows]


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


def validation_summary(runs: Sequence[Mapping[str, Any]], out: Path) -> dict[str, Any]:
    """Per arm, the last validation accuracy of each seed and their mean: what pacing is tuned on."""
    table: dict[str, Any] = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        last = [r["curves"]["val/acc"][-1][1] for r in runs_of(runs, arm) if r["curves"].get("val/acc")]
        stats = describe(last)
        table[arm] = {"last_val_acc": last, "mean": stats["mean"], "std": stats["std"], "se": stats["se"]}
        print(f"{arm}: last val/acc per seed {[round(v, 3) for v in last]}, mean {stats['mean']:.3f} "
              f"± {stats['se']:.3f} (SE)")
    result = {"validation": table, "runs": [{k: r[k] for k in ("arm", "seed", "steps", "completions")} for r in runs]}
    (out / "validation.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


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
    if not settings.test:  # tuning: fit only, judged on validation accuracy
        runs = [run_arm(base, warm, arm, seed, settings) for seed in settings.seeds for arm in settings.arms]
        return validation_summary(runs, out)
    baseline = run_baseline(base, warm, settings)
    runs = []
    for seed in settings.seeds:
        for arm in settings.arms:
            log.info("ablation: arm %s, seed %d", arm, seed)
            runs.append(run_arm(base, warm, arm, seed, settings))
    results = summarise(runs, baseline, setup_summary(base, settings), out)
    took, seeds = time.perf_counter() - t0, settings.seeds
    print(f"\nablation ({took:.0f} s): held-out accuracy, mean ± SE over {len(seeds)} seed(s) {seeds}\n")
    print(results["table_markdown"])
    print()
    for line in results["findings"]["accuracy"]:
        print(line)
    print(f"\nreport: {out / 'REPORT.md'}   numbers: {out / 'results.json'}")
    return results
