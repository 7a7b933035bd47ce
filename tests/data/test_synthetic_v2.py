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
from anatomy_lightning.data.settings import SyntheticSettings
from anatomy_lightning.data.synthetic import (
    ANATOMIES,
    BY_NAME,
    FAMILIES,
    V2_LOOKALIKE_GAP,
    V2_LOOKALIKE_GROUPS,
    V2_LOOKS,
    Scene,
    SceneGenerator,
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
    with pytest.raises(ValueError, match="benchmark='v9'"):
        SceneGenerator(benchmark="v9")


def test_v2_changes_the_pixels_and_the_manifest_not_v1s() -> None:
    v1, v2 = SceneGenerator(seed=0, **DEMO), SceneGenerator(seed=0, benchmark="v2", **DEMO)
    (s1, _), (s2, _) = v1.draw(1)[0], v2.draw(1)[0]
    assert s1 == s2  # the first scene is drawn before any option, so both streams start alike
    assert v1.render(s1).tobytes() != v2.render(s2).tobytes()
    assert v1.render_settings() != v2.render_settings()  # so the manifest rewrites the split
    assert "benchmark" not in v1.render_settings()  # v1's manifest stays what it was


ALIKE = {name for group in V2_LOOKALIKE_GROUPS for name in group}


def _same_group(a: str, b: str) -> bool:
    return any(a in g and b in g for g in V2_LOOKALIKE_GROUPS)


def _frame_means(gen: SceneGenerator, name: str, frames: int = 40) -> np.ndarray:
    scenes = [Scene("t", 1, (name,), None, 7919 * i + 1) for i in range(frames)]
    return np.stack([np.asarray(gen.render(s), np.float32).reshape(-1, 3).mean(0) for s in scenes])


def test_v2_lookalike_gap_is_below_the_per_frame_jitter_and_other_looks_stay_apart() -> None:
    gen = SceneGenerator(benchmark="v2", **DEMO)
    assert all(len({BY_NAME[n].family for n in g}) == 1 for g in V2_LOOKALIKE_GROUPS)  # groups within a family
    for x, y in combinations(ANATOMIES, 2):
        lx, ly = V2_LOOKS[x.name], V2_LOOKS[y.name]
        gap = np.linalg.norm(np.subtract(lx.rgb, ly.rgb))
        if _same_group(x.name, y.name):
            assert lx.texture == ly.texture and gap <= V2_LOOKALIKE_GAP * 1.5
        else:
            assert gap >= 45 or lx.texture != ly.texture
    # the lighting moves one anatomy's mean colour from frame to frame by more than the look-alike gap
    jitter = _frame_means(gen, "Gallbladder").std(0)
    assert jitter.min() > V2_LOOKALIKE_GAP
    assert 45 > 1.5 * np.linalg.norm(jitter)  # ... and well under the distance to any other look


def test_v2_lookalikes_are_hard_and_the_rest_easy_for_a_colour_classifier() -> None:
    """Nearest mean colour (fit on half the frames): look-alikes near chance, every other anatomy
    (including family members with a look of their own) near perfect; v1 gives 1.0 for all."""
    gen = SceneGenerator(benchmark="v2", **DEMO)
    feats = {a.name: _frame_means(gen, a.name, 24) for a in ANATOMIES}
    cent = {n: f[:12].mean(0) for n, f in feats.items()}
    hits: dict[bool, list[bool]] = {True: [], False: []}
    for a in ANATOMIES:
        for x in feats[a.name][12:]:
            dist = {n: float(np.linalg.norm(x - c)) for n, c in cent.items()}
            hits[a.name in ALIKE].append(min(dist, key=dist.get) == a.name)
    assert np.mean(hits[False]) > 0.9
    assert np.mean(hits[True]) < 0.65  # chance is 1/2 in a pair, 1/3 in the gallbladder trio


def test_v2_distractors_are_all_kin_so_similarity_follows_the_gold() -> None:
    qs = SceneGenerator(seed=0, benchmark="v2", **DEMO).questions(300)
    kin_counts = {f: len(m) - 1 for f, m in FAMILIES.items()}
    for q in qs:
        assert q.metadata["hard_distractors"] == min(3, kin_counts[q.metadata["family"]])
    # S(q), with word overlap standing in for the sentence encoder (alike names share words):
    # singletons (other families only) low, look-alike golds high
    def s_of(q) -> float:
        sim = jaccard_similarity(list(q.options))
        return float(np.mean([sim[q.answer_index, j] for j in range(len(q.options)) if j != q.answer_index]))

    low = [s_of(q) for q in qs if kin_counts[q.metadata["family"]] == 0]
    high = [s_of(q) for q in qs if q.metadata["anatomy"] in ALIKE]
    assert low and high and np.median(low) < 0.02 and np.median(high) > 0.15
    v1 = {q.metadata["hard_distractors"] for q in SceneGenerator(seed=0, **DEMO).questions(300)}
    assert v1 == {0, 1, 2}  # v1 keeps its uniform mix


def test_datamodule_passes_the_benchmark_through(tmp_path) -> None:
    from anatomy_lightning.data.datamodule import AnatomyVQADataModule

    synthetic = dict(n_train=4, n_val=2, n_test=2, out_dir=str(tmp_path), benchmark="v2", **DEMO)
    AnatomyVQADataModule(synthetic=synthetic).prepare_data()
    manifest = json.loads((tmp_path / "train.manifest.json").read_text())
    assert manifest["render"]["benchmark"] == "v2"
