"""The ablation runner: pure helpers (fast) and the --quick pipeline end to end (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from anatomy_lightning.experiments import ablation as ab

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def test_derived_config_switches_only_the_callbacks(tmp_path: Path) -> None:
    base = ab.load_base(ab.Settings(config=CONFIG, out=tmp_path, seeds=[0], arms=list(ab.ARMS), quick=True))
    configs = {arm: ab.derive_config(base, arm, 3, f"r_{arm}", "fit", quick=False) for arm in ab.ARMS}
    for arm, (curriculum_on, augmentation_on) in ab.ARMS.items():
        cfg = configs[arm]
        assert ab._callback(cfg, ab.CURRICULUM)["enabled"] is curriculum_on
        assert ab._callback(cfg, ab.AUGMENTATION)["enabled"] is augmentation_on
        assert ab._callback(cfg, ab.AUGMENTATION)["seed"] == 3
        assert cfg["seed_everything"] == 3 and cfg["run_name"] == f"r_{arm}"
        assert cfg["trainer"]["logger"]["init_args"]["save_dir"] == str(tmp_path.resolve() / "tensorboard")
        assert ab.get_checkpoint_dir(cfg) == "checkpoints/${run_name}"
        assert {"class_path": ab.SIGNAL_LOGGER} in cfg["trainer"]["callbacks"]
    # equal compute: everything that sets the number of completions is the same in every arm
    for key in (
        "trainer.max_steps",
        "data.batch_size",
        "model.num_generations",
        "model.num_iterations",
        "data.synthetic",
    ):
        assert len({json.dumps(ab.get_key(c, key)) for c in configs.values()}) == 1, key
    assert ab._callback(base, ab.CURRICULUM)["enabled"] is True  # the base itself is not modified


def test_moving_average_and_curve_aggregation() -> None:
    assert ab.moving_average([0, 2, 4, 6], 2) == [0, 1, 3, 5]
    agg = ab.aggregate_curve([[[0, 0.0], [1, 1.0], [2, 1.0]], [[1, 0.0], [2, 0.0], [3, 1.0]]])
    assert agg is not None and agg["step"] == [1, 2]  # only the steps both seeds cover
    assert all(lo <= m <= hi for lo, m, hi in zip(agg["min"], agg["mean"], agg["max"]))
    assert ab.aggregate_curve([[], []]) is None


def test_accuracy_table_pairs_seeds_and_findings_say_when_an_idea_does_not_help() -> None:
    def run(arm: str, seed: int, acc: float) -> dict:
        return {"arm": arm, "seed": seed, "accuracy": {"overall": acc, "stage": {"0": acc}}, "curves": {}}

    runs = [run("grpo", s, 0.50 + 0.01 * s) for s in range(3)]
    runs += [run("curriculum", s, 0.70 + 0.01 * s) for s in range(3)]
    runs += [run("augmentation", s, 0.50 + 0.01 * ((s + 1) % 3)) for s in range(3)]
    table = ab.accuracy_table(runs, ["grpo", "curriculum", "augmentation"])
    assert table["curriculum"]["vs_grpo"]["diffs"] == pytest.approx([0.2, 0.2, 0.2])
    lines = ab.accuracy_findings(table, baseline=0.25, n_test=240)
    assert "**curriculum**" in lines[0]
    assert any(line.startswith("curriculum raised accuracy over plain GRPO") for line in lines)
    assert any(line.startswith("augmentation did not raise accuracy") for line in lines)


def test_accuracy_from_predictions() -> None:
    rows = [{"correct": True, "stage": 0, "anatomy": "Liver"}, {"correct": False, "stage": 2, "anatomy": "Liver"}]
    acc = ab.accuracy_from_predictions(rows)
    assert acc["overall"] == 0.5 and acc["n"] == 2
    assert acc["stage"] == {"0": 1.0, "2": 0.0} and acc["anatomy"] == {"Liver": 0.5}


@pytest.mark.slow
def test_quick_ablation_writes_report_plots_and_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # checkpoints/ and any relative output land in the test's folder
    out = tmp_path / "ablation"
    ab.main(["--quick", "--config", str(CONFIG), "--out", str(out)])

    report = (out / "REPORT.md").read_text()
    for png in ("fig_curriculum.png", "fig_invalid_gradient.png", "fig_accuracy.png"):
        assert (out / png).stat().st_size > 1000
        assert png in report
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == set(ab.ARMS)
    assert (
        0.0 <= results["baseline"]["overall"] <= 1.0
        and results["baseline"]["n"] == ab.QUICK_OVERRIDES["data.synthetic.n_test"]
    )
    for arm, row in results["table"].items():
        assert 0.0 <= row["mean"] <= 1.0, arm
        assert all(0.0 <= cell["mean"] <= 1.0 for cell in row["stage"].values())
    assert len(results["runs"]) == 4
    for run in results["runs"]:
        assert run["steps"] == results["setup"]["max_steps"]  # equal compute
        curves = run["curves"]
        assert curves["train/reward"] and curves["curriculum/batch_similarity"] and curves[ab.SIGNAL_PREFIX]
        assert any(tag.startswith(ab.SIGNAL_PREFIX + "/") for tag in curves)  # per-class, in every arm
        assert all(0.0 <= v <= 1.0 for _, v in curves[ab.SIGNAL_PREFIX])
    by_arm = {r["arm"]: r["curves"] for r in results["runs"]}
    assert "curriculum/stage" in by_arm["curriculum"] and "curriculum/stage" not in by_arm["grpo"]
    assert any(share > 0 for _, share in by_arm["augmentation"]["augment/batch_share"])  # rewrites were trained on
    assert "augment/batch_share" not in by_arm["grpo"]
    assert results["findings"]["accuracy"] and results["findings"]["augmentation"]
    assert not math.isnan(results["table"]["grpo"]["mean"])
