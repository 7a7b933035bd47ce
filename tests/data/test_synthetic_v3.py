"""Benchmark v3 (issue 20): difficulty is set by the distractors, so it varies within every class.

Text-level properties, checked on the generator itself with the real offline encoder: every class
has easy and hard questions, a class-neutral S(q) with per-class stages puts every class in every
stage and the hard ones in the last, and the text-only shortcut stays near chance in every stage.
(The accuracy property under plain GRPO is measured by the ablation: docs/ablation_v3.)
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from anatomy_lightning.data.synthetic import V3_ANATOMIES, V3_PAIRS, SceneGenerator, write_synthetic_dataset


def _v3(n: int = 960, seed: int = 0):
    gen = SceneGenerator(seed=seed, grid=1, kinds=("position",), questions_per_scene=1, unique_scenes=False,
                         benchmark="v3")
    return gen.questions(n)


def test_hard_scenes_are_rendered_ambiguous_and_easy_ones_clear() -> None:
    gen = SceneGenerator(seed=2, grid=1, kinds=("position",), questions_per_scene=1, unique_scenes=False,
                         benchmark="v3", noise=0.0)
    pairs = {}
    for scene, qs in gen.draw(200):
        assert (qs[0].metadata["hard_distractors"] == 1) is scene.hard
        pairs.setdefault((scene.layout[0], scene.hard), scene)
    a, b = V3_PAIRS[0][:2]  # plain texture pair: the second twin is checkered only in the clear view
    def textured(name: str, hard: bool) -> bool:
        img = np.asarray(gen.render(pairs[(name, hard)]), float)
        lum = img.mean(axis=2)
        return bool(lum.std() / lum.mean() > 0.1)
    assert not textured(a, False) and textured(b, False)
    assert not textured(a, True) and not textured(b, True)


def test_every_anatomy_has_a_twin_and_every_class_has_easy_and_hard_questions() -> None:
    assert len(V3_ANATOMIES) == 2 * len(V3_PAIRS)
    qs = _v3()
    twin = {a.name: b.name for a in V3_ANATOMIES for b in V3_ANATOMIES if a.family == b.family and a is not b}
    for q in qs:
        gold = q.answer_text
        hard = q.metadata["hard_distractors"] == 1
        assert (twin[gold] in q.options) is hard
        if hard:  # every option's twin is among the options: the text gives nothing away
            assert all(twin[o] in q.options for o in q.options)
        else:  # one option from each of four pairs
            assert len({twin.get(o) for o in q.options} & set(q.options)) == 0
    by_class = Counter((q.answer_text, q.metadata["hard_distractors"]) for q in qs)
    for a in V3_ANATOMIES:
        assert by_class[(a.name, 0)] >= 15 and by_class[(a.name, 1)] >= 15, a.name


def test_v1_and_v2_questions_are_unchanged_by_v3() -> None:
    for bench in ("v1", "v2"):
        a = SceneGenerator(seed=4, benchmark=bench).questions(50)
        b = SceneGenerator(seed=4, benchmark=bench).questions(50)
        assert [q.to_record() for q in a] == [q.to_record() for q in b]
        assert not {o for q in a for o in q.options} & {"Greater Omentum", "Diaphragm Crus"}


def test_default_similarity_stages_spread_every_class_and_keep_the_shortcut_near_chance() -> None:
    from anatomy_lightning.data.audit import curriculum_audit
    from anatomy_lightning.data.similarity import SimilarityScorer, assign_stages

    qs = _v3()
    scorer = SimilarityScorer()
    scorer.score(qs)
    assign_stages(qs, 3, by="per_class")
    audit = curriculum_audit(qs, scorer, 3)
    assert audit["warnings"] == []
    hard = np.array([q.metadata["hard_distractors"] for q in qs])
    stage = np.array([q.stage for q in qs])
    assert hard[stage == 0].mean() < 0.15 and hard[stage == 2].mean() > 0.9  # S(q) ranks difficulty
    shortcut = [audit["shortcut_accuracy"][str(k)] for k in range(3)]
    assert all(abs(s - 0.25) < 0.1 for s in shortcut), shortcut


def test_v3_renders_twins_alike_and_pairs_apart(tmp_path) -> None:
    files = write_synthetic_dataset(tmp_path, 8, 2, 2, seed=1, grid=1, kinds=("position",), questions_per_scene=1,
                                    unique_scenes=False, benchmark="v3")
    assert files["train"].is_file() and len(list((tmp_path / "images").glob("train-*.png"))) == 8
    from anatomy_lightning.data.synthetic import V3_AMBIGUOUS, V3_CLEAR

    looks = {a.name: np.array(a.rgb, float) for a in V3_ANATOMIES}
    for a, b, *_ in V3_PAIRS:  # ambiguous view: one look with a small tint; clear view: own texture and colour
        assert np.linalg.norm(looks[a] - looks[b]) == pytest.approx(20.0)
        assert np.linalg.norm(np.subtract(V3_AMBIGUOUS[a].rgb, V3_AMBIGUOUS[b].rgb)) < 12
        assert V3_AMBIGUOUS[a].texture == V3_AMBIGUOUS[b].texture
        assert V3_CLEAR[a].texture != V3_CLEAR[b].texture
        assert np.linalg.norm(np.subtract(V3_CLEAR[a].rgb, V3_CLEAR[b].rgb)) == pytest.approx(60.0)
    names = list(looks)
    far = min(np.linalg.norm(looks[x] - looks[y]) for x in names for y in names
              if x != y and V3_ANATOMIES[names.index(x)].family != V3_ANATOMIES[names.index(y)].family)
    assert far > 60
