"""S(q) scoring, the embedding cache and quantile stages.

Most tests use a fake encoder (deterministic random unit vectors per text) so they run in
milliseconds; the real default encoder is loaded once per session for the behaviour that matters:
"Liver / Gut / Omentum" is easier than "Cystic Duct / Cystic Artery / Cystic Plate".
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from anatomy_lightning.data import similarity
from anatomy_lightning.data.schema import Question
from anatomy_lightning.data.similarity import SimilarityScorer, assign_stages, default_encoder_path

EASY = Question("easy", "What is at the top left?", ["Liver", "Gut", "Omentum"], 0)
HARD = Question("hard", "What is at the top left?", ["Cystic Duct", "Cystic Artery", "Cystic Plate"], 0)


class FakeEncoder:
    """Stands in for SentenceTransformer: a fixed random vector per text, and a record of calls."""

    def __init__(self, dim: int = 8) -> None:
        self.dim, self.calls = dim, []

    def encode(self, texts: list[str], **_: object) -> np.ndarray:
        self.calls.append(list(texts))
        rows = [
            np.random.default_rng(int(hashlib.md5(t.encode()).hexdigest()[:8], 16)).normal(size=self.dim) for t in texts
        ]
        return np.asarray(rows, np.float32)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeEncoder:
    encoder = FakeEncoder()
    monkeypatch.setattr(SimilarityScorer, "_load_model", lambda self: encoder)
    return encoder


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="session")
def real_scorer(real_cache: Path) -> SimilarityScorer:
    return SimilarityScorer(cache_dir=str(real_cache))


def _questions(option_sets: list[list[str]], gold: list[int] | None = None) -> list[Question]:
    gold = gold or [0] * len(option_sets)
    return [Question(f"q{i}", "Which?", opts, g) for i, (opts, g) in enumerate(zip(option_sets, gold))]


def _by_hand(vectors: dict[str, np.ndarray], q: Question, aggregation: str) -> float:
    gold = vectors[q.answer_text]
    cos = [float(vectors[t] @ gold) for i, t in enumerate(q.options) if i != q.answer_index]
    return max(cos) if aggregation == "max" else sum(cos) / len(cos)


# -- the real encoder ----------------------------------------------------------------------------
def test_default_encoder_loads_offline_and_ranks_cystic_structures_harder(real_scorer: SimilarityScorer) -> None:
    assert Path(default_encoder_path(), "config.json").is_file()
    easy, hard = EASY.replace(), HARD.replace()
    scores = real_scorer.score([easy, hard])
    assert real_scorer.model_loads == 1
    assert easy.similarity == pytest.approx(scores[0]) and hard.similarity == pytest.approx(scores[1])
    assert easy.similarity < hard.similarity - 0.1


def test_embeddings_are_unit_float32_rows(real_scorer: SimilarityScorer) -> None:
    vecs = real_scorer.embed(["Liver", "Gut", "Liver"])
    assert vecs.dtype == np.float32 and vecs.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vecs[0], vecs[2])


def test_warm_cache_never_loads_the_model(real_scorer: SimilarityScorer, real_cache: Path) -> None:
    real_scorer.score([EASY.replace(), HARD.replace()])  # make sure these texts are on disk
    warm = SimilarityScorer(cache_dir=str(real_cache), aggregation="max")
    q = HARD.replace()
    warm.score([q])
    assert warm.model_loads == 0 and warm._model is None
    vecs = dict(zip(HARD.options, real_scorer.embed(HARD.options)))
    assert q.similarity == pytest.approx(_by_hand(vecs, q, "max"), abs=1e-6)


def test_scorers_in_one_process_share_the_loaded_encoder(real_scorer: SimilarityScorer, tmp_path: Path) -> None:
    other = SimilarityScorer(cache_dir=str(tmp_path))  # e.g. the GDQA encoder next to the DataModule's
    assert other.model is real_scorer.model


def test_a_hub_id_that_is_not_available_offline_names_itself_and_the_default(tmp_path: Path) -> None:
    scorer = SimilarityScorer("no-such-org/no-such-encoder", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"no-such-org/no-such-encoder.*default all-MiniLM-L6-v2"):
        scorer.embed(["Liver"])


# -- aggregation, grouping, caching (fake encoder) -------------------------------------------------
@pytest.mark.parametrize("aggregation", ["mean", "max"])
def test_score_matches_cosines_by_hand_for_mixed_option_counts(
    fake: FakeEncoder, tmp_path: Path, aggregation: str
) -> None:
    questions = _questions(
        [["a", "b"], ["a", "b", "c", "d", "e"], ["c", "a", "b"], ["e", "d", "c", "b", "a", "f"], ["b", "a"]],
        gold=[1, 3, 0, 5, 0],
    )
    scorer = SimilarityScorer(cache_dir=str(tmp_path), aggregation=aggregation)
    scores = scorer.score(questions)
    vecs = dict(zip("abcdef", scorer.embed(list("abcdef"))))
    expected = [_by_hand(vecs, q, aggregation) for q in questions]
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert [q.similarity for q in questions] == pytest.approx(expected, abs=1e-6)


def test_many_distinct_texts_take_the_row_gather_path_with_the_same_result(
    fake: FakeEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    questions = _questions([[f"t{i}", f"t{i + 1}", f"t{i + 2}"] for i in range(50)], gold=[i % 3 for i in range(50)])
    gram = SimilarityScorer(cache_dir=str(tmp_path)).score(questions)
    monkeypatch.setattr(similarity, "_GRAM_LIMIT", 0)
    monkeypatch.setattr(similarity, "_CHUNK", 7)
    np.testing.assert_allclose(SimilarityScorer(cache_dir=str(tmp_path)).score(questions), gram, atol=1e-6)


def test_each_distinct_text_is_encoded_once(fake: FakeEncoder, tmp_path: Path) -> None:
    scorer = SimilarityScorer(cache_dir=str(tmp_path))
    scorer.score(_questions([["x", "y", "z"], ["y", "x"], ["z", "x", "y"]] * 100))
    scorer.embed(["y", "x"])
    assert sorted(t for call in fake.calls for t in call) == ["x", "y", "z"]


def test_second_scorer_on_the_same_cache_dir_does_not_load_the_model(fake: FakeEncoder, tmp_path: Path) -> None:
    first = SimilarityScorer(cache_dir=str(tmp_path))
    a = first.embed(["Liver", "Gut"])
    second = SimilarityScorer(cache_dir=str(tmp_path))
    np.testing.assert_array_equal(second.embed(["Gut", "Liver"]), a[::-1])
    assert (first.model_loads, second.model_loads) == (1, 0) and len(fake.calls) == 1
    second.embed(["Omentum"])  # a new text: only it is encoded, then merged into the same file
    assert second.model_loads == 1 and fake.calls[-1] == ["Omentum"]
    assert SimilarityScorer(cache_dir=str(tmp_path))._read_disk().keys() == second._vectors.keys()


def test_a_corrupt_cache_file_is_ignored_and_rewritten(fake: FakeEncoder, tmp_path: Path) -> None:
    scorer = SimilarityScorer(cache_dir=str(tmp_path))
    expected = scorer.embed(["Liver", "Gut"])
    [shard] = scorer._shards()
    shard.write_bytes(b"not an npz at all")
    again = SimilarityScorer(cache_dir=str(tmp_path))
    np.testing.assert_allclose(again.embed(["Liver", "Gut"]), expected, atol=1e-6)
    assert again.model_loads == 1  # recomputed, not read from the broken file
    assert set(SimilarityScorer(cache_dir=str(tmp_path))._read_disk()) == set(again._vectors)
    assert shard not in again._shards() and len(again._shards()) == 1  # the broken file was replaced
    assert not list(again.cache_path.glob("*.tmp"))  # the atomic write left no temporary file behind


def test_many_small_saves_are_merged_into_few_shards(
    fake: FakeEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(similarity, "_MAX_SHARDS", 3)
    scorer = SimilarityScorer(cache_dir=str(tmp_path))
    for i in range(10):  # GDQA-style: a few new texts per step
        scorer.embed([f"rewrite {i}"])
        assert len(scorer._shards()) <= 4
    fresh = SimilarityScorer(cache_dir=str(tmp_path))
    np.testing.assert_array_equal(
        fresh.embed([f"rewrite {i}" for i in range(10)]), scorer.embed([f"rewrite {i}" for i in range(10)])
    )
    assert fresh.model_loads == 0


def test_cache_is_per_model_and_follows_the_environment(
    fake: FakeEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(similarity.CACHE_ENV, str(tmp_path / "env"))
    default = SimilarityScorer()
    assert default.cache_path.parent == tmp_path / "env"
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert SimilarityScorer(str(other)).cache_path != default.cache_path


# -- argument errors -----------------------------------------------------------------------------
def test_a_missing_encoder_folder_is_named_and_the_default_suggested(tmp_path: Path) -> None:
    missing = tmp_path / "no-encoder-here"
    with pytest.raises(ValueError, match=rf"{missing}.*does not exist.*default all-MiniLM-L6-v2"):
        SimilarityScorer(str(missing))


def test_unknown_aggregation_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"'median'.*\['all_pairs', 'all_pairs_max', 'gold_mean', 'gold_max'\]"):
        SimilarityScorer(aggregation="median")


def test_a_question_with_one_option_is_named(fake: FakeEncoder, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'lonely'"):
        SimilarityScorer(cache_dir=str(tmp_path)).score([Question("lonely", "?", ["Liver"], 0)])


# -- stages --------------------------------------------------------------------------------------
def _scored(values: list[float]) -> list[Question]:
    return [Question(f"q{i}", "?", ["a", "b"], 0, similarity=v) for i, v in enumerate(values)]


def _stage_of(s: float, thresholds: list[float]) -> int:
    return sum(1 for t in thresholds if s > t)  # the rule datamodule.stage_of implements


def test_stages_are_quantiles_with_stage_zero_least_similar() -> None:
    questions = _scored([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])
    thresholds = assign_stages(questions, 3)
    assert thresholds == pytest.approx([0.3, 0.6])
    by_stage = {k: sorted(q.similarity for q in questions if q.stage == k) for k in range(3)}
    assert by_stage == {0: [0.1, 0.2, 0.3], 1: [0.4, 0.5, 0.6], 2: [0.7, 0.8, 0.9]}


def test_stages_agree_with_the_datamodule_rule() -> None:
    stage_of = pytest.importorskip("anatomy_lightning.data.datamodule").stage_of
    rng = np.random.default_rng(0)
    questions = _scored(rng.uniform(size=200).round(2).tolist())  # plenty of ties
    for k in (1, 2, 3, 5):
        thresholds = assign_stages(questions, k)
        assert len(thresholds) == k - 1 and thresholds == sorted(thresholds)
        assert all(q.stage == stage_of(q.similarity, thresholds) for q in questions)


def test_ties_do_not_leave_a_stage_empty_when_values_allow() -> None:
    questions = _scored([0.5] * 90 + [0.6, 0.7, 0.8, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0])
    thresholds = assign_stages(questions, 3)
    assert thresholds[0] < thresholds[1]
    assert {q.stage for q in questions} == {0, 1, 2}
    assert all(q.stage == _stage_of(q.similarity, thresholds) for q in questions)
    assert sum(q.stage == 0 for q in questions) == 90  # equal S(q) always share a stage


@pytest.mark.parametrize(
    ("values", "k", "stages"),
    [
        ([0.4, 0.2, 0.9], 1, [0, 0, 0]),  # one stage: no thresholds
        ([0.3, 0.6], 3, [0, 1]),  # fewer questions than stages: the earliest stages fill
        ([0.5, 0.5, 0.5], 3, [0, 0, 0]),  # all equal
        ([0.2, 0.8, 0.2, 0.8], 4, [0, 1, 0, 1]),
    ],
)
def test_stage_edge_cases(values: list[float], k: int, stages: list[int]) -> None:
    questions = _scored(values)
    thresholds = assign_stages(questions, k)
    assert len(thresholds) == k - 1
    assert [q.stage for q in questions] == stages
    assert all(q.stage == _stage_of(q.similarity, thresholds) for q in questions)


def test_stage_assignment_needs_scored_questions_and_a_positive_k() -> None:
    with pytest.raises(ValueError, match=r"no S\(q\).*'x'.*SimilarityScorer.score"):
        assign_stages([Question("x", "?", ["a", "b"], 0)], 3)
    with pytest.raises(ValueError, match="num_stages must be >= 1, got 0"):
        assign_stages(_scored([0.1]), 0)


# -- cache key and non-finite vectors ------------------------------------------------------------
def _encoder_folder(folder: Path, weights: bytes) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_an_encoder_retrained_into_the_same_folder_gets_a_fresh_cache(fake: FakeEncoder, tmp_path: Path) -> None:
    folder = _encoder_folder(tmp_path / "encoder", b"old weights")
    before = SimilarityScorer(str(folder), cache_dir=str(tmp_path / "cache")).cache_path
    assert SimilarityScorer(str(folder), cache_dir=str(tmp_path / "cache")).cache_path == before  # stable
    _encoder_folder(folder, b"new weights")  # same size, other content
    assert SimilarityScorer(str(folder), cache_dir=str(tmp_path / "cache")).cache_path != before


def test_weight_hashes_are_remembered_by_size_and_mtime(
    fake: FakeEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _encoder_folder(tmp_path / "encoder", b"weights one")
    first = SimilarityScorer(str(folder), cache_dir=str(tmp_path / "cache")).cache_path
    assert (tmp_path / "cache" / "weight-hashes.json").is_file()
    monkeypatch.setattr(similarity, "_WEIGHT_HASHES", {})  # a new process: only the memo on disk is left
    weights = folder / "model.safetensors"
    stat = weights.stat()
    weights.write_bytes(b"weights two")  # same size; with the old mtime put back the memo answers unread
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert SimilarityScorer(str(folder), cache_dir=str(tmp_path / "cache")).cache_path == first
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a real rewrite moves mtime
    assert SimilarityScorer(str(folder), cache_dir=str(tmp_path / "cache")).cache_path != first


def test_non_finite_cached_vectors_are_rejected_and_embedded_again(fake: FakeEncoder, tmp_path: Path) -> None:
    scorer = SimilarityScorer(cache_dir=str(tmp_path))
    expected = scorer.score(_questions([["Liver", "Gut", "Omentum"]]))
    keys = np.array(sorted(scorer._vectors), dtype="S40")
    poisoned = np.full((len(keys), fake.dim), np.nan, np.float32)
    for shard in scorer._shards():
        shard.unlink()
    similarity._write_shard(scorer.cache_path, {k.decode(): v for k, v in zip(keys, poisoned)})
    again = SimilarityScorer(cache_dir=str(tmp_path))
    scores = again.score(_questions([["Liver", "Gut", "Omentum"]]))
    assert np.isfinite(scores).all() and scores == pytest.approx(expected)
    assert again.model_loads == 1  # embedded again instead of trusting the NaN rows


def test_an_encoder_that_returns_nan_is_refused_before_anything_is_cached(
    fake: FakeEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fake, "encode", lambda texts, **_: np.full((len(texts), 8), np.nan, np.float32))
    scorer = SimilarityScorer(cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"returned non-finite embeddings for 3 text\(s\)"):
        scorer.score(_questions([["Liver", "Gut", "Omentum"]]))
    assert scorer._shards() == []


# -- gold-blind aggregations, per-class stages, the text shortcut ----------------------------------
def _pairs_by_hand(vectors: dict[str, np.ndarray], q: Question, aggregation: str) -> float:
    cos = [float(vectors[a] @ vectors[b]) for i, a in enumerate(q.options) for b in q.options[i + 1:]]
    return max(cos) if aggregation == "all_pairs_max" else sum(cos) / len(cos)


@pytest.mark.parametrize("aggregation", ["all_pairs", "all_pairs_max"])
def test_all_pairs_aggregations_match_by_hand_and_ignore_the_gold(
    fake: FakeEncoder, tmp_path: Path, aggregation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    option_sets = [["a", "b"], ["a", "b", "c", "d", "e"], ["c", "a", "b"], ["e", "d", "c", "b", "a", "f"]]
    scorer = SimilarityScorer(cache_dir=str(tmp_path), aggregation=aggregation)
    scores = scorer.score(_questions(option_sets, gold=[1, 3, 0, 5]))
    vecs = dict(zip("abcdef", scorer.embed(list("abcdef"))))
    expected = [_pairs_by_hand(vecs, q, aggregation) for q in _questions(option_sets)]
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    np.testing.assert_allclose(scorer.score(_questions(option_sets, gold=[0, 0, 2, 1])), scores)  # gold-blind
    monkeypatch.setattr(similarity, "_GRAM_LIMIT", 0)  # the row-gather path agrees
    monkeypatch.setattr(similarity, "_CHUNK", 3)
    np.testing.assert_allclose(scorer.score(_questions(option_sets)), scores, atol=1e-6)


def test_old_aggregation_names_are_aliases_and_all_pairs_is_the_default(tmp_path: Path) -> None:
    assert similarity.AGGREGATIONS == ("all_pairs", "all_pairs_max", "gold_mean", "gold_max")
    assert SimilarityScorer(cache_dir=str(tmp_path), aggregation="mean").aggregation == "gold_mean"
    assert SimilarityScorer(cache_dir=str(tmp_path), aggregation="max").aggregation == "gold_max"
    assert SimilarityScorer(cache_dir=str(tmp_path)).aggregation == "all_pairs"


def test_shortcut_picks_the_option_least_like_the_others(fake: FakeEncoder, tmp_path: Path) -> None:
    scorer = SimilarityScorer(cache_dir=str(tmp_path))
    questions = _questions([["a", "b", "c", "d"], ["e", "a", "f"], ["b", "d"]])
    vecs = dict(zip("abcdef", scorer.embed(list("abcdef"))))
    expected = [
        int(np.argmin([np.mean([vecs[o] @ vecs[p] for p in q.options if p != o]) for o in q.options]))
        for q in questions
    ]
    assert scorer.shortcut_choices(questions).tolist() == expected
    assert similarity.shortcut_choice(questions[1], scorer) == expected[1]


def _confounded(per_class: int = 30) -> list[Question]:
    """Three classes whose S(q) ranges do not overlap: global quantiles make each class one stage."""
    out = []
    for c, (name, base) in enumerate([("Omentum", 0.1), ("Liver", 0.5), ("Cystic Duct", 0.8)]):
        for i in range(per_class):
            q = Question(f"{name}{i}", "?", [name, "x", "y", "z"], 0, similarity=base + 0.005 * i)
            out.append(q)
    return out


def test_global_stages_partition_a_confounded_set_and_per_class_stages_spread_every_class() -> None:
    questions = _confounded()
    assign_stages(questions, 3, by="global")
    assert {q.answer_text: {q.stage} for q in questions} == {"Omentum": {0}, "Liver": {1}, "Cystic Duct": {2}}
    thresholds = assign_stages(questions, 3, by="per_class")
    assert isinstance(thresholds, similarity.StageThresholds)
    for name in ("Omentum", "Liver", "Cystic Duct"):
        stages = [q.stage for q in questions if q.answer_text == name]
        assert [stages.count(k) for k in range(3)] == [10, 10, 10], name
    assert all(q.stage == similarity.stage_for(q, thresholds) for q in questions)


def test_per_class_thresholds_serialise_and_small_or_unseen_classes_use_the_global_ones() -> None:
    import json

    questions = _confounded() + [Question("rare", "?", ["Gut", "x"], 0, similarity=0.95)]  # 1 < K questions
    thresholds = assign_stages(questions, 3, by="per_class")
    assert "Gut" not in thresholds.per_class and len(thresholds.global_) == 2
    assert questions[-1].stage == sum(0.95 > t for t in thresholds.global_) == 2
    data = json.loads(json.dumps(thresholds.to_dict()))
    for q in questions:
        assert similarity.stage_for(q, data) == similarity.stage_for(q, thresholds) == q.stage
    assert similarity.stage_for((0.95, "never seen"), thresholds) == 2
    stage_of = pytest.importorskip("anatomy_lightning.data.datamodule").stage_of
    assert stage_of(0.12, thresholds, "Omentum") == similarity.stage_for((0.12, "Omentum"), thresholds)
    assert stage_of(0.5, [0.3, 0.6]) == 1  # the old call: a plain list of global thresholds
    with pytest.raises(ValueError, match=r"'by_gold'.*\['per_class', 'global'\]"):
        assign_stages(questions, 3, by="by_gold")
