"""`data.audit`: the class x stage table and the text-shortcut check; the DataModule's and
`inspect_data`'s use of them; the acceptance target on the shared SGG-VQA file."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from anatomy_lightning.data.audit import curriculum_audit, format_audit
from anatomy_lightning.data.schema import Question

SGG = Path(__file__).resolve().parents[3] / "shared" / "data" / "sgg_vqa_anatomy_r1.json"
CLASSES = ("Liver", "Omentum", "Gut")


class ScriptedScorer:
    """Stands in for SimilarityScorer: the shortcut picks whatever option the question asks for."""

    def shortcut_choices(self, questions: list[Question]) -> np.ndarray:
        return np.array([q.metadata["pick"] for q in questions])


def _set(stage_of_class: dict[str, list[int]], shortcut_right: dict[int, float]) -> list[Question]:
    """Questions per class with the given stages; in stage k, a `shortcut_right[k]` share is answered by the shortcut."""
    out, seen = [], {}
    total = Counter(stage for stages in stage_of_class.values() for stage in stages)
    for name, stages in stage_of_class.items():
        for i, stage in enumerate(stages):
            n = seen.get(stage, 0)
            seen[stage] = n + 1
            right = n < round(shortcut_right.get(stage, 0.25) * total[stage])
            out.append(Question(f"{name}{i}", "?", [name, "a", "b", "c"], 0, stage=stage,
                                metadata={"pick": 0 if right else 1}))
    return out


def test_a_balanced_set_raises_no_warning_and_the_table_adds_up() -> None:
    questions = _set({c: [0, 1, 2] * 10 for c in CLASSES}, {0: 0.3, 1: 0.4, 2: 0.2})
    audit = curriculum_audit(questions, ScriptedScorer(), 3)
    assert audit["warnings"] == [] and audit["max_class_deviation"] == 0.0
    assert audit["stage_counts"] == {"0": 30, "1": 30, "2": 30}
    assert audit["classes"]["Liver"] == {"count": 30, "stages": {"0": 10, "1": 10, "2": 10},
                                         "share": {"0": 0.3333, "1": 0.3333, "2": 0.3333}}
    assert audit["shortcut_accuracy"] == {"0": 0.3, "1": 0.4, "2": 0.2}  # 0.40 is the limit: not above it
    assert audit["chance"] == {"0": 0.25, "1": 0.25, "2": 0.25}
    json.dumps(audit)
    text = format_audit(audit)
    assert "no warnings" in text and "text shortcut acc" in text
    assert any(line.split()[:4] == ["Omentum", "0.33", "0.33", "0.33"] for line in text.splitlines())


def test_a_confounded_leaky_set_is_named_by_class_stage_and_share() -> None:
    stages = {"Liver": [1, 2] * 15, "Omentum": [0] * 30, "Gut": [0, 1, 2] * 10}
    audit = curriculum_audit(_set(stages, {0: 0.7}), ScriptedScorer(), 3)
    warnings = audit["warnings"]
    assert any("class-confounded" in w and "'Omentum'" in w and "100%" in w and "stage 0" in w for w in warnings)
    assert any("class-confounded" in w and "'Liver'" in w and "stage 0" in w for w in warnings)
    assert not any("'Gut'" in w for w in warnings)
    assert [w for w in warnings if "leaks a text shortcut" in w] == [w for w in warnings if w.startswith("stage 0")]
    assert audit["shortcut_accuracy"]["0"] == pytest.approx(0.7, abs=0.02)
    assert audit["max_class_deviation"] == pytest.approx(2 / 3, abs=1e-3)
    assert "WARNING stage 0 leaks a text shortcut" in format_audit(audit)


def test_small_classes_are_not_judged_and_the_shortcut_limit_follows_chance() -> None:
    few = _set({"Rare": [0, 0, 0]}, {0: 0.25})  # 3 < 3K questions: never called confounded
    assert curriculum_audit(few, ScriptedScorer(), 3)["warnings"] == []
    two = [Question(f"q{i}", "?", ["a", "b"], 0, stage=0, metadata={"pick": int(i % 10 >= 6)}) for i in range(30)]
    audit = curriculum_audit(two, ScriptedScorer(), 1)  # 2 options: chance 0.5, limit 0.65 > 0.6
    assert audit["chance"] == {"0": 0.5} and audit["shortcut_accuracy"] == {"0": 0.6} and audit["warnings"] == []


def test_unstaged_questions_are_refused() -> None:
    with pytest.raises(ValueError, match="no stage"):
        curriculum_audit([Question("x", "?", ["a", "b"], 0)], ScriptedScorer(), 3)


# -- settings ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "new"), [("similarity_aggregation", "data.similarity.aggregation"),
                                          ("similarity_encoder", "data.similarity.encoder"),
                                          ("embedding_cache_dir", "data.similarity.cache_dir")])
def test_old_flat_keys_are_refused_naming_the_new_key(key: str, new: str) -> None:
    from anatomy_lightning.data.datamodule import AnatomyVQADataModule

    with pytest.raises(ValueError, match=f"data.{key} was renamed: use {new}"):
        AnatomyVQADataModule(train_file="x.json", **{key: "mean"})


def test_similarity_settings_are_coerced_and_checked() -> None:
    from anatomy_lightning.data.datamodule import AnatomyVQADataModule
    from anatomy_lightning.data.settings import SimilaritySettings

    dm = AnatomyVQADataModule(train_file="x.json", similarity={"aggregation": "mean", "cache_dir": "/tmp/e"})
    assert dm.similarity == SimilaritySettings(aggregation="gold_mean", cache_dir="/tmp/e")
    assert AnatomyVQADataModule(train_file="x.json").similarity == SimilaritySettings()
    assert SimilaritySettings().aggregation == "all_pairs" and SimilaritySettings().stages == "per_class"
    with pytest.raises(ValueError, match=r"data.similarity.stages must be one of \['per_class', 'global'\]"):
        AnatomyVQADataModule(train_file="x.json", similarity={"stages": "by_class"})
    with pytest.raises(ValueError, match=r"data.similarity: unknown keys \['aggregate'\]"):
        AnatomyVQADataModule(train_file="x.json", similarity={"aggregate": "mean"})


# -- DataModule and inspect_data (real offline encoder) --------------------------------------------
def _encoder_available() -> None:
    pytest.importorskip("sentence_transformers")
    from anatomy_lightning.data.similarity import default_encoder_path

    try:
        default_encoder_path()
    except ValueError:
        pytest.skip("no offline sentence encoder installed")


def _tiny_file(tmp_path: Path) -> Path:
    option_sets = [["Liver", "Gut", "Omentum", "Gallbladder"], ["Cystic Duct", "Cystic Artery", "Cystic Plate", "Liver"],
                   ["Omentum", "Abdominal Wall Cavity", "Gut", "Liver"], ["Gallbladder", "Cystic Plate", "Liver", "Gut"]]
    rows = [{"question": f"Q{i}?", "options": option_sets[i % 4][i % 3:] + option_sets[i % 4][:i % 3],
             "answer": "ABCD"[i % 2], "image": f"{i}.png"} for i in range(24)]
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(rows))
    return path


def test_inspect_data_config_mode_matches_the_datamodule_and_writes_question_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    _encoder_available()
    from anatomy_lightning.data.datamodule import AnatomyVQADataModule
    from anatomy_lightning.inspect_data import main

    data = _tiny_file(tmp_path)
    config = tmp_path / "fit.yaml"
    config.write_text(f"root: {tmp_path}\n"  # an interpolation, resolved as fit's parser would
                      "data:\n  train_file: ${root}/tiny.json\n  format: generic\n  check_images: false\n"
                      "  val_fraction: 0.25\n  num_stages: 2\n  similarity:\n    aggregation: all_pairs\n"
                      "    stages: per_class\n")
    rows_path = tmp_path / "rows.jsonl"
    with caplog.at_level(logging.INFO, logger="anatomy_lightning.data.datamodule"):
        code = main(["--config", str(config), "--questions", str(rows_path)])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["splits"] == {"train": 18, "val": 6, "test": 0}
    assert out["audit"]["questions"] == 18 and set(out["audit"]["stage_counts"]) == {"0", "1"}
    assert out["stage_thresholds_per_class"] is not None and out["similarity"]["aggregation"] == "all_pairs"
    assert any("curriculum audit (18 questions, 2 stages" in r.getMessage() for r in caplog.records)

    dm = AnatomyVQADataModule(train_file=str(data), format="generic", check_images=False, val_fraction=0.25,
                              num_stages=2)
    dm.setup("fit")
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert len(rows) == 24 and set(rows[0]) == {"uid", "answer", "class", "options", "similarity", "stage", "split"}
    by_uid = {q.uid: q for q in dm.train_questions + dm.val_questions}
    for row in rows:
        q = by_uid[row["uid"]]
        assert (row["answer"], row["class"], row["options"]) == (q.answer_text, q.answer_text, q.options)
        assert row["stage"] == q.stage and row["similarity"] == pytest.approx(q.similarity)
    assert [r["split"] for r in rows].count("val") == 6

    code = main(["--config", str(config), "--summary", "--aggregation", "gold_mean", "--stages-by", "global"])
    text = capsys.readouterr().out
    assert code == 0 and "curriculum audit (18 questions, 2 stages" in text and "text shortcut acc" in text
    (tmp_path / "old.yaml").write_text(f"data:\n  train_file: {data}\n  similarity_aggregation: mean\n")
    assert main(["--config", str(tmp_path / "old.yaml")]) == 2
    assert "data.similarity_aggregation was renamed: use data.similarity.aggregation" in capsys.readouterr().err


def test_file_mode_questions_rows_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _encoder_available()
    from anatomy_lightning.inspect_data import main

    rows_path = tmp_path / "rows.jsonl"
    code = main([str(_tiny_file(tmp_path)), "--no-check-images", "--stages", "2", "--stages-by", "global",
                 "--aggregation", "max", "--questions", str(rows_path)])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["similarity"]["aggregation"] == "gold_max" and out["stage_thresholds_per_class"] is None
    assert out["audit"]["questions"] == 24 and isinstance(out["audit"]["warnings"], list)
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert len(rows) == 24 and {r["stage"] for r in rows} == {0, 1} and "split" not in rows[0]
    assert all(r["class"] == r["answer"] in r["options"] for r in rows)


# -- the acceptance target on the shared SGG-VQA file ------------------------------------------------
def _sgg_audit(aggregation: str, by: str) -> dict:
    from anatomy_lightning.data.loader import load_questions
    from anatomy_lightning.data.similarity import SimilarityScorer, assign_stages

    questions = load_questions(str(SGG), check_images=False).questions
    scorer = SimilarityScorer(aggregation=aggregation)
    scorer.score(questions)
    assign_stages(questions, 3, by=by)
    return curriculum_audit(questions, scorer, 3)


def test_default_settings_give_sgg_vqa_class_balanced_shortcut_free_stages() -> None:
    if not SGG.is_file():
        pytest.skip("../shared/data/sgg_vqa_anatomy_r1.json is not present (only on the project's own machines)")
    _encoder_available()
    from anatomy_lightning.data.settings import SimilaritySettings

    default = SimilaritySettings()
    audit = _sgg_audit(default.aggregation, default.stages)
    assert audit["classes_judged"] == 6 and audit["max_class_deviation"] <= 0.15
    assert all(acc <= 0.40 for acc in audit["shortcut_accuracy"].values()), audit["shortcut_accuracy"]
    assert audit["warnings"] == []
    old = _sgg_audit("gold_mean", "global")  # what the curriculum used to do: flagged on both counts
    assert old["classes"]["Omentum"]["share"]["0"] == 1.0 and old["shortcut_accuracy"]["0"] > 0.6
    assert any("leaks a text shortcut" in w for w in old["warnings"])
