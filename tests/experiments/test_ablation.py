"""The ablation runner: pure helpers (fast), the report from made-up runs (fast) and the --quick
pipeline end to end (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from anatomy_lightning.experiments import ablation as ab
from anatomy_lightning.experiments.ablation import report, stats
from anatomy_lightning.experiments.ablation.__main__ import main, parse_args

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def test_derived_config_switches_only_the_callbacks_and_keeps_the_completion_budget(tmp_path: Path) -> None:
    base = ab.load_base(ab.Settings(config=CONFIG, out=tmp_path, seeds=[0], arms=list(ab.ARMS), quick=True))
    configs = {arm: ab.derive_config(base, arm, 3, f"r_{arm}", "fit", quick=False) for arm in ab.ARMS}
    budget = ab.completion_budget(base)
    assert budget == 2 * 2 * 2  # --quick: 2 steps x 2 prompts x G=2
    for arm, (curriculum_on, augmentation_on, dynamic_on) in ab.ARMS.items():
        cfg = configs[arm]
        assert ab.callback_section(cfg, ab.CURRICULUM)["enabled"] is curriculum_on
        assert ab.callback_section(cfg, ab.AUGMENTATION)["enabled"] is augmentation_on
        assert ab.callback_section(cfg, ab.AUGMENTATION)["seed"] == 3
        assert cfg["model"]["dynamic_sample"] is dynamic_on
        assert cfg["seed_everything"] == 3 and cfg["run_name"] == f"r_{arm}"
        assert cfg["trainer"]["logger"]["init_args"]["save_dir"] == str(tmp_path.resolve() / "tensorboard")
        assert ab.get_checkpoint_dir(cfg) == "checkpoints/${run_name}"
        assert {"class_path": ab.SIGNAL_LOGGER} in cfg["trainer"]["callbacks"]
        # every arm stops at the same number of sampled completions
        assert {"class_path": ab.BUDGET, "init_args": {"max_completions": budget}} in cfg["trainer"]["callbacks"]
        assert cfg["data"]["seed"] == 3  # the sampler's order varies with the seed too
        # arms that sample replacements in the step (dynamic sampling, same-step GDQA) may need more
        # steps to spend the same budget: the budget, not max_steps, ends them
        same_step = augmentation_on and ab.callback_section(cfg, ab.AUGMENTATION).get("when", "same_step") == "same_step"
        rounds = 1 + base["model"]["max_resample_times"] if dynamic_on or same_step else 1
        assert cfg["trainer"]["max_steps"] == base["trainer"]["max_steps"] * rounds
    # the reference arm carries the S(q) and pacing used before issue 20
    assert ab.get_key(configs["curriculum_v2"], "data.similarity.aggregation") == "gold_mean"
    assert ab.get_key(configs["curriculum_v2"], "data.similarity.stages") == "global"
    assert ab.callback_section(configs["curriculum_v2"], ab.CURRICULUM)["mode"] == "cumulative"
    assert ab.get_key(configs["curriculum"], "data.similarity.aggregation") == "all_pairs"
    # equal compute: everything else that sets the number of completions is the same in every arm
    for key in ("data.batch_size", "model.num_generations", "model.num_iterations", "data.synthetic"):
        assert len({json.dumps(ab.get_key(c, key)) for c in configs.values()}) == 1, key
    assert ab.callback_section(base, ab.CURRICULUM)["enabled"] is True  # the base itself is not modified


def test_pacing_reaches_the_curriculum_arms_only(tmp_path: Path) -> None:
    base = ab.load_base(ab.Settings(config=CONFIG, out=tmp_path, seeds=[0], arms=list(ab.ARMS)))
    pacing = {"promote_at": 0.7, "max_steps_per_stage": 120}
    for arm, (curriculum_on, _, _) in ab.ARMS.items():
        plain = ab.derive_config(base, arm, 0, "r", "fit", quick=False)
        paced = ab.derive_config(base, arm, 0, "r", "fit", quick=False, pacing=pacing)
        if curriculum_on and arm not in ab.ARM_OVERRIDES:
            assert ab.callback_section(paced, ab.CURRICULUM)["max_steps_per_stage"] == 120
            assert ab.callback_section(paced, ab.CURRICULUM)["promote_at"] == 0.7
        else:  # the same config, so the same cache key: tuning the pacing never reruns these arms
            assert paced == plain
    assert ab.callback_section(base, ab.CURRICULUM)["max_steps_per_stage"] == 60  # the base is untouched


def test_command_line_flags_and_pass_through() -> None:
    s = parse_args([
        "--config", "c.yaml", "--out", "o", "--seeds", "4", "5", "--arms", "grpo", "dynamic", "--max-steps", "9",
        "--warm-start-steps", "7", "--quick", "--force", "--no-test", "--model.beta=0.0",
    ])
    assert (s.config, s.out, s.seeds, s.arms) == (Path("c.yaml"), Path("o"), [4, 5], ["grpo", "dynamic"])
    assert s.max_steps == 9
    assert (s.warm_start_steps, s.quick, s.force, s.test, s.extra) == (7, True, True, False, ["--model.beta=0.0"])
    assert parse_args(["--quick"]).seeds == [0] and parse_args([]).seeds == [0, 1, 2]
    assert parse_args([]).arms == list(ab.ARMS) and parse_args([]).test is True
    paced = parse_args(["--pacing", "promote_at=0.7", "max_steps_per_stage=null", "mode=exclusive"])
    assert paced.pacing == {"promote_at": 0.7, "max_steps_per_stage": None, "mode": "exclusive"}
    assert parse_args([]).pacing == {}
    with pytest.raises(SystemExit):
        parse_args(["--pacing", "promote_at"])


def test_standard_error_is_the_sample_sd_over_root_n() -> None:
    d = ab.describe([0.5, 0.6, 0.7])
    assert d["mean"] == pytest.approx(0.6) and d["std"] == pytest.approx(0.1)
    assert d["se"] == pytest.approx(0.1 / math.sqrt(3)) and d["n"] == 3
    one = ab.describe([0.4])
    assert one["std"] == 0.0 and math.isnan(one["se"])  # one seed: no standard error
    assert report.mean_se_text(0.4, one["se"]) == "0.400"
    assert report.mean_se_text(0.012, 0.004, 1, 100, sign=True) == "+1.2 ± 0.4"


def test_moving_average_and_curve_aggregation() -> None:
    assert ab.moving_average([0, 2, 4, 6], 2) == [0, 1, 3, 5]
    agg = ab.aggregate_curve([[[0, 0.0], [1, 1.0], [2, 1.0]], [[1, 0.0], [2, 0.0], [3, 1.0]]])
    assert agg is not None and agg["x"] == [1, 2]  # only the x both seeds cover
    assert all(lo <= m <= hi for lo, m, hi in zip(agg["min"], agg["mean"], agg["max"]))
    assert agg["se"][-1] == pytest.approx(math.sqrt(0.5) / math.sqrt(2))  # values 1 and 0: sd sqrt(0.5)
    assert ab.aggregate_curve([[], []]) is None


def test_curves_are_put_on_the_completions_axis() -> None:
    # a dynamic-sampling run: step 2 resampled (192 completions in one step)
    run = {"curves": {ab.COMPLETIONS: [[0, 64.0], [1, 128.0], [2, 320.0], [3, 384.0]]}, "steps": 4, "completions": 384}
    points = [[0, 0.1], [1.5, 0.2], [3, 0.3], [7, 0.4]]
    assert ab.against_completions(points, run) == [[64.0, 0.1], [224.0, 0.2], [384.0, 0.3], [384.0, 0.4]]
    # no train/completions curve: the run's average rate, counted from the first rollout
    assert ab.against_completions([[0, 1.0], [2, 2.0]], {"curves": {}, "steps": 3, "completions": 300}) == [
        [100.0, 1.0], [300.0, 2.0]
    ]
    assert ab.against_completions([[5, 1.0]], {"curves": {}}) == [[5.0, 1.0]]
    # two seeds with different steps per completion line up on the completions they have in common
    fast = {"curves": {ab.COMPLETIONS: [[0, 100.0], [1, 200.0], [2, 300.0]]}}
    slow = {"curves": {ab.COMPLETIONS: [[0, 150.0], [1, 300.0]]}}
    agg = ab.aggregate_curve([
        ab.against_completions([[0, 0.0], [1, 1.0], [2, 2.0]], fast),
        ab.against_completions([[0, 0.0], [1, 1.0]], slow),
    ])
    assert agg is not None and agg["x"] == [150.0, 200.0, 300.0]


def _run(arm: str, seed: int, overall: float, stages: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {"arm": arm, "seed": seed, "accuracy": {"overall": overall, "stage": stages}, "curves": {}, **extra}


def test_paired_differences_per_stage_say_where_an_arm_helps() -> None:
    runs = []
    for s in range(4):
        g0, g2 = 0.50 + 0.02 * s, 0.30 + 0.03 * (s % 2)
        runs.append(_run("grpo", s, (g0 + g2) / 2, {"0": g0, "2": g2}))
        # curriculum: +20 points on stage 0 every seed; stage 2 moves up and down with the seed
        c2 = g2 + (0.02 if s % 2 else -0.02)
        runs.append(_run("curriculum", s, (g0 + 0.2 + c2) / 2, {"0": g0 + 0.2, "2": c2}))
    table = ab.accuracy_table(runs, ["grpo", "curriculum"], {"overall": 200, "0": 100, "2": 100})
    vs = table["curriculum"]["vs_grpo"]
    assert vs["stage"]["0"]["diffs"] == pytest.approx([0.2] * 4) and vs["stage"]["0"]["seeds"] == [0, 1, 2, 3]
    assert vs["stage"]["0"]["se"] == pytest.approx(0.0, abs=1e-12) and vs["stage"]["0"]["effect"] == "helps"
    assert vs["stage"]["2"]["diffs"] == pytest.approx([-0.02, 0.02, -0.02, 0.02])
    assert vs["stage"]["2"]["se"] == pytest.approx(0.02 * math.sqrt(4 / 3) / 2)
    assert vs["stage"]["2"]["effect"] == "no effect"
    # the noise of a per-stage difference uses that stage's test questions
    p2 = sum(r["accuracy"]["stage"]["2"] for r in runs) / len(runs)
    assert vs["stage"]["2"]["noise"] == pytest.approx(ab.difference_noise(vs["stage"]["2"]["std"], 4, p2, 100))
    assert "vs_grpo" not in table["grpo"]
    assert table["grpo"]["stage"]["0"]["se"] == pytest.approx(ab.describe([0.50, 0.52, 0.54, 0.56])["se"])
    sentence = report.where_it_helps("curriculum", vs)
    assert "helps on overall" in sentence and "stage 0 (+20.0 ± 0.0)" in sentence
    assert "no effect on stage 2" in sentence
    assert "stage 2" in report.paired_markdown(table) and "| curriculum | stage 0 |" in report.paired_markdown(table)


def test_accuracy_table_pairs_seeds_and_findings_say_when_an_idea_does_not_help() -> None:
    runs = [_run("grpo", s, 0.50 + 0.01 * s, {"0": 0.50 + 0.01 * s}) for s in range(3)]
    runs += [_run("curriculum", s, 0.70 + 0.01 * s, {"0": 0.70 + 0.01 * s}) for s in range(3)]
    runs += [_run("augmentation", s, 0.50 + 0.01 * ((s + 1) % 3), {"0": 0.5}) for s in range(3)]
    table = ab.accuracy_table(runs, ["grpo", "curriculum", "augmentation"], {"overall": 240, "0": 240})
    assert table["curriculum"]["vs_grpo"]["diffs"] == pytest.approx([0.2, 0.2, 0.2])
    lines = ab.accuracy_findings(table, baseline=0.25)
    assert "**curriculum**" in lines[0]
    assert any(line.startswith("curriculum raised accuracy over plain GRPO") for line in lines)
    assert any(line.startswith("augmentation did not raise accuracy") for line in lines)
    assert any("augmentation vs grpo" in line and "no effect on overall" in line for line in lines)


def test_compute_table_shows_unequal_budgets() -> None:
    runs = [
        _run("grpo", 0, 0.5, {}, steps=10, completions=640, wall_seconds=60.0),
        _run("dynamic", 0, 0.5, {}, steps=6, completions=640, wall_seconds=90.0),
        _run("dynamic", 1, 0.5, {}, steps=5, completions=600, wall_seconds=30.0),
    ]
    compute = stats.compute_table(runs, ["grpo", "dynamic"])
    assert compute["dynamic"]["steps"]["mean"] == 5.5 and compute["dynamic"]["completions"]["values"] == [640, 600]
    lines = report.compute_findings(compute, budget=640)
    assert "stopped short" not in lines[0] and "seeds [1] stopped short" in lines[1]
    assert "over the budget" not in lines[1]
    assert "up to 40 over the budget" in report.compute_findings(compute, budget=600)[1]
    assert "| dynamic | 2 | 620 (600–640) | 6 (5–6) |" in report.compute_markdown(compute)


def test_accuracy_from_predictions() -> None:
    rows = [{"correct": True, "stage": 0, "anatomy": "Liver"}, {"correct": False, "stage": 2, "anatomy": "Liver"}]
    acc = ab.accuracy_from_predictions(rows)
    assert acc["overall"] == 0.5 and acc["n"] == 2
    assert acc["stage"] == {"0": 1.0, "2": 0.0} and acc["anatomy"] == {"Liver": 0.5}


def _made_up_runs() -> list[dict[str, Any]]:
    """Five arms x 3 seeds with curves: augmentation and dynamic end with fewer all-wrong groups."""
    runs = []
    for arm in ("grpo", "curriculum", "augmentation", "both", "dynamic"):
        per_step = 96 if arm == "dynamic" else 64
        steps = 30 if arm == "dynamic" else 45
        lowers = arm in ("augmentation", "dynamic", "both")
        for seed in range(3):
            wrong = [[s, max(0.0, 0.6 - (0.015 if lowers else 0.002) * s + 0.01 * seed)] for s in range(steps)]
            curves = {
                ab.COMPLETIONS: [[s, float(per_step * (s + 1))] for s in range(steps)],
                "train/reward": [[s, 0.3 + 0.005 * s] for s in range(steps)],
                "curriculum/batch_similarity": [[s, 0.2 + (0.004 * s if arm in ("curriculum", "both") else 0)]
                                                for s in range(steps)],
                ab.ALL_WRONG: wrong,
                ab.ALL_RIGHT: [[s, 0.1] for s in range(steps)],
                ab.INVALID: [[s, v + 0.1] for s, v in wrong],
            }
            for cls in ("Liver", "Gallbladder"):
                curves[f"{ab.ALL_WRONG}/{cls}"] = wrong[::2]
                curves[f"{ab.ALL_RIGHT}/{cls}"] = [[s, 0.1] for s, _ in wrong[::2]]
                curves[f"{ab.INVALID}/{cls}"] = [[s, v + 0.1] for s, v in wrong[::2]]
            if arm in ("curriculum", "both"):
                curves["curriculum/stage"] = [[s, float(s // 15)] for s in range(steps)]
            acc = 0.5 + (0.1 if arm == "curriculum" else 0.0) + 0.01 * seed
            run = _run(arm, seed, acc, {"0": acc + 0.1, "1": acc - 0.1}, steps=steps,
                       completions=per_step * steps, wall_seconds=100.0 + seed, curves=curves)
            runs.append(run)
    return runs


def test_report_from_made_up_runs_has_se_tables_paired_differences_and_figures(tmp_path: Path) -> None:
    runs = _made_up_runs()
    baseline = {"accuracy": {"overall": 0.3, "n": 200, "stage": {"0": 0.4, "1": 0.2}, "stage_n": {"0": 100, "1": 100},
                             "anatomy": {}}}
    setup = {"config": "x.yaml", "quick": False, "arms": list(ab.ARMS), "seeds": [0, 1, 2], "max_steps": 45,
             "batch_size": 8, "num_generations": 8, "num_iterations": 1, "max_resample_times": 3,
             "completions_per_run": 2880, "warm_start_steps": 300, "extra_args": []}
    results = ab.summarise(runs, baseline, setup, tmp_path)
    text = (tmp_path / "REPORT.md").read_text()
    for png in ("fig_curriculum.png", "fig_invalid_gradient.png", "fig_accuracy.png"):
        assert (tmp_path / png).stat().st_size > 10_000 and png in text
    assert "**3 seed(s)**" in text and "2880 sampled completions" in text
    se = ab.describe([0.6, 0.61, 0.62])["se"]
    assert f"| curriculum | 3 | 0.610 ± {se:.3f} |" in text
    assert "| dynamic | 3 | 2880 | 30 | 96.0 |" in text  # compute per arm: same completions, fewer steps
    assert "| curriculum | overall | +10.0, +10.0, +10.0 (0, 1, 2) |" in text
    assert any("curriculum vs grpo" in line and "helps on overall" in line for line in results["findings"]["accuracy"])
    wrong = [line for line in results["findings"]["invalid_ratio"] if "all-wrong share at the end" in line]
    assert len(wrong) == 3 and all("lower than grpo" in line for line in wrong)
    assert all("2 of 2 frequent classes" in line for line in wrong)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["table"]["both"]["vs_grpo"]["stage"]["1"]["diffs"] == pytest.approx([0.0, 0.0, 0.0])
    assert saved["compute"]["dynamic"]["steps"]["values"] == [30, 30, 30]
    end = saved["curve_summaries"]["dynamic"][ab.ALL_WRONG]["per_seed"]["0"]["end"]
    assert end == pytest.approx(0.6 - 0.015 * 26.5)  # the mean of its last 6 of 30 points
    assert saved["frequent_classes"] == ["Gallbladder", "Liver"] and len(saved["runs"]) == 15
    # the small file a replication compares with: per-seed accuracies and paired differences
    summary = json.loads((tmp_path / "results_summary.json").read_text())
    assert summary["arms"]["curriculum"]["seeds"] == [
        {"seed": s, "accuracy": pytest.approx(0.6 + 0.01 * s)} for s in range(3)]
    assert summary["arms"]["curriculum"]["vs_grpo"]["diffs"] == pytest.approx([0.1, 0.1, 0.1])
    assert summary["arms"]["curriculum"]["vs_dynamic"]["mean"] == pytest.approx(0.1)
    assert "vs_grpo" not in summary["arms"]["grpo"] and "runs" not in summary


@pytest.mark.slow
def test_quick_ablation_writes_report_plots_and_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # checkpoints/ and any relative output land in the test's folder
    out = tmp_path / "ablation"
    main(["--quick", "--config", str(CONFIG), "--out", str(out)])

    report_text = (out / "REPORT.md").read_text()
    for png in ("fig_curriculum.png", "fig_invalid_gradient.png", "fig_accuracy.png"):
        assert (out / png).stat().st_size > 1000
        assert png in report_text
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == set(ab.ARMS) and set(results["compute"]) == set(ab.ARMS)
    assert (
        0.0 <= results["baseline"]["overall"] <= 1.0
        and results["baseline"]["n"] == ab.QUICK_OVERRIDES["data.synthetic.n_test"]
    )
    for arm, row in results["table"].items():
        assert 0.0 <= row["mean"] <= 1.0, arm
        assert all(0.0 <= cell["mean"] <= 1.0 for cell in row["stage"].values())
    assert len(results["runs"]) == len(ab.ARMS)
    budget = results["setup"]["completions_per_run"]
    for run in results["runs"]:
        assert run["completions"] >= budget  # equal compute: every arm reaches the completion budget
        _, augmentation_on, dynamic_on = ab.ARMS[run["arm"]]
        if dynamic_on or augmentation_on:  # replacements sampled in the step (same-step GDQA) count too
            assert 1 <= run["steps"] <= results["setup"]["max_steps"]
        else:
            assert run["steps"] == results["setup"]["max_steps"] and run["completions"] == budget
        curves = run["curves"]
        assert curves["train/reward"] and curves["curriculum/batch_similarity"] and curves[ab.INVALID]
        assert curves[ab.COMPLETIONS][-1][1] == run["completions"]
        for prefix in (ab.INVALID, ab.ALL_WRONG, ab.ALL_RIGHT):
            assert any(tag.startswith(prefix + "/") for tag in curves)  # per class, in every arm
            assert all(0.0 <= v <= 1.0 for _, v in curves[prefix])
    by_arm = {r["arm"]: r["curves"] for r in results["runs"]}
    assert "curriculum/stage" in by_arm["curriculum"] and "curriculum/stage" not in by_arm["grpo"]
    # same-step GDQA: the dead groups' rewrites were rolled out in the step (and counted in the budget)
    assert any(n > 0 for _, n in by_arm["augmentation"]["augment/rewrites_sampled"])
    assert "augment/batch_share" not in by_arm["grpo"]
    assert results["findings"]["accuracy"] and results["findings"]["invalid_ratio"] and results["findings"]["compute"]
    assert all("vs_grpo" in row for arm, row in results["table"].items() if arm != "grpo")
    assert not math.isnan(results["table"]["grpo"]["mean"])


def test_every_arm_is_scored_on_the_baselines_stages(tmp_path: Path) -> None:
    """curriculum_v2 stages questions with its own S(q); its per-stage accuracy must still be read on
    the stages every other arm is scored on (the warm-start baseline's, from the base config)."""
    from anatomy_lightning.experiments.ablation.runs import with_reference_stages

    baseline = tmp_path / "baseline.jsonl"
    baseline.write_text("".join(json.dumps({"id": f"q{i}", "stage": i % 3, "correct": False}) + "\n" for i in range(6)))
    own = [{"id": f"q{i}", "stage": 0, "correct": i < 2, "anatomy": "Liver"} for i in range(6)]
    acc = ab.accuracy_from_predictions(with_reference_stages(own, baseline))
    assert acc["stage"] == {"0": 0.5, "1": 0.5, "2": 0.0}  # q0, q1 correct: stages 0 and 1
    assert with_reference_stages(own, tmp_path / "missing.jsonl") == own
