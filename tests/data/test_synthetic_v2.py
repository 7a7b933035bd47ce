"""Benchmark v2 of the synthetic scenes (issue 14): v1 unchanged, v2 family members hard to tell apart.

The measured property (accuracy falls with the S(q) stage after plain GRPO) is in
docs/benchmark_v2/README.md; these tests pin what the generator promises, in well under a second.
"""

from __future__ import annotations

import hashlib
import json
from itertools import combinations

import numpy as np
import pytest

from anatomy_lightning.augment.selection import jaccard_similarity
from anatomy_lightning.data.datamodule import SyntheticSettings
from anatomy_lightning.data.synthetic import (
    ANATOMIES,
    FAMILIES,
    V2_LOOKS,
    V2_MEMBER_GAP,
    Scene,
    SceneGenerator,
    write_synthetic_dataset,
)

DEMO = dict(grid=1, kinds=("position",), questions_per_scene=1, unique_scenes=False)  # configs/demo.yaml


def _fingerprint(n: int = 40, **kw: object) -> str:
    gen = SceneGenerator(**kw)
    h = hashlib.sha256()
    for scene, qs in gen.draw(n, "train"):
        h.update(gen.render(scene).tobytes())
        for q in qs:
            h.update(json.dumps(q.to_record(), sort_keys=True).encode())
    return h.hexdigest()


# computed on main before benchmark v2 existed (commit 4d49130)
V1_FINGERPRINTS = [
    (dict(seed=0, **DEMO), "edfd7f800dc5fc203c6a2b394b12ec4ae362423e67f3019cdc246d92ff3933bf"),
    (dict(seed=3), "c6c788e78e85c8cd60e1f914c40c4486b88156cc7c8e443827bee33b7f866c57"),
    (
        dict(seed=1, grid=3, kinds=("position", "relation", "tool"), tool=True, num_options=5),
        "101169eb00526578e837873cb21dc0ad506c198bd94ddb835c7731d49a83bde3",
    ),
]


@pytest.mark.parametrize(("kw", "expected"), V1_FINGERPRINTS)
def test_v1_is_the_default_and_unchanged(kw: dict, expected: str) -> None:
    assert _fingerprint(**kw) == expected
    assert _fingerprint(**kw, benchmark="v1") == expected
    assert SyntheticSettings().benchmark == "v1"


def test_unknown_benchmark_is_refused() -> None:
    with pytest.raises(ValueError, match="benchmark='v3'"):
        SceneGenerator(benchmark="v3")


def test_v2_keeps_the_questions_and_changes_only_the_pixels() -> None:
    v1, v2 = SceneGenerator(seed=0, **DEMO), SceneGenerator(seed=0, benchmark="v2", **DEMO)
    d1, d2 = v1.draw(30), v2.draw(30)
    assert [q.to_record() for _, qs in d1 for q in qs] == [q.to_record() for _, qs in d2 for q in qs]
    assert all(s1 == s2 for (s1, _), (s2, _) in zip(d1, d2))
    assert np.asarray(v1.render(d1[0][0])).tobytes() != np.asarray(v2.render(d2[0][0])).tobytes()
    assert v1.render_settings() != v2.render_settings()  # so the manifest rewrites the split
    assert "benchmark" not in v1.render_settings()  # v1's manifest stays what it was


def _frame_means(gen: SceneGenerator, name: str, frames: int = 40) -> np.ndarray:
    scenes = [Scene("t", 1, (name,), None, 7919 * i + 1) for i in range(frames)]
    return np.stack([np.asarray(gen.render(s), np.float32).reshape(-1, 3).mean(0) for s in scenes])


def test_v2_family_gap_is_below_the_per_frame_jitter_and_families_stay_apart() -> None:
    gen = SceneGenerator(benchmark="v2", **DEMO)
    for members in FAMILIES.values():
        assert len({V2_LOOKS[a.name].texture for a in members}) == 1  # no texture gives a member away
        for a, b in combinations(members, 2):
            assert np.linalg.norm(np.subtract(V2_LOOKS[a.name].rgb, V2_LOOKS[b.name].rgb)) <= V2_MEMBER_GAP * 1.5
    # the lighting moves one anatomy's mean colour from frame to frame by more than the family gap
    jitter = _frame_means(gen, "Liver").std(0)
    assert jitter.min() > V2_MEMBER_GAP
    # ... and by far less than the distance between families' looks
    bases = [V2_LOOKS[m[0].name].rgb for m in FAMILIES.values()]
    nearest = min(np.linalg.norm(np.subtract(a, b)) for a, b in combinations(bases, 2))
    assert nearest > 3 * np.linalg.norm(jitter)


def test_v2_family_members_are_hard_and_families_easy_for_a_colour_classifier() -> None:
    """Nearest mean colour (fit on half the frames): families near perfect, members near chance."""
    gen = SceneGenerator(benchmark="v2", **DEMO)
    feats = {a.name: _frame_means(gen, a.name, 24) for a in ANATOMIES}
    cent = {n: f[:12].mean(0) for n, f in feats.items()}
    family_hits, member_hits = [], []
    for a in ANATOMIES:
        kin = [b.name for b in FAMILIES[a.family]]
        for x in feats[a.name][12:]:
            dist = {n: float(np.linalg.norm(x - c)) for n, c in cent.items()}
            family_hits.append(min(dist, key=dist.get) in kin)
            if len(kin) > 1:
                member_hits.append(min(kin, key=dist.get) == a.name)
    assert np.mean(family_hits) > 0.95
    assert np.mean(member_hits) < 0.75  # 1/3 is chance among three members; v1 gives 1.0


def test_distractor_mix_gives_low_and_high_similarity_questions() -> None:
    gen = SceneGenerator(seed=0, benchmark="v2", **DEMO)
    qs = gen.questions(600)
    n_hard = np.array([q.metadata["hard_distractors"] for q in qs])
    assert set(n_hard) == {0, 1, 2}  # other families only, one look-alike, two look-alikes
    # S(q) with word overlap standing in for the sentence encoder (alike names share words)
    s = []
    for q in qs:
        sim = jaccard_similarity(list(q.options))
        s.append(np.mean([sim[q.answer_index, j] for j in range(len(q.options)) if j != q.answer_index]))
    s = np.asarray(s)
    assert np.median(s[n_hard == 0]) < 0.02 and (s[n_hard == 2] > 0.05).mean() > 0.8
    assert s[n_hard == 2].mean() > s[n_hard == 0].mean() + 0.1


def test_datamodule_passes_the_benchmark_through(tmp_path) -> None:
    from anatomy_lightning.data.datamodule import AnatomyVQADataModule

    synthetic = dict(n_train=4, n_val=2, n_test=2, out_dir=str(tmp_path), benchmark="v2", **DEMO)
    AnatomyVQADataModule(synthetic=synthetic).prepare_data()
    manifest = json.loads((tmp_path / "train.manifest.json").read_text())
    assert manifest["render"]["benchmark"] == "v2"
