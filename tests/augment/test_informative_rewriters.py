"""The informative GDQA rewriters (fewer distractors, a contrast cue), the all-wrong-first order,
the augmenter's same-step interface, and the settings check of the new knobs."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from anatomy_lightning.augment.augmenter import (
    DEFAULT_DETECT,
    DEFAULT_REWRITERS,
    GroupDiversityAugmenter,
    hard_order,
)
from anatomy_lightning.augment.registry import REWRITERS, build_rewriter
from anatomy_lightning.augment.rules import ContrastCue, EliminateOptions, distractors_by_nearness
from anatomy_lightning.callbacks.augmentation import GroupDiversityCallback
from anatomy_lightning.data.schema import LETTERS, Question
from anatomy_lightning.settings_check import SettingsError, check_settings, settings_problems

# gold "cystic duct" (D); its nearest distractor by words is "cystic artery"
DUCT = Question(
    id="q0", question="Which structure is clipped?", options=["Liver", "cystic artery", "Gut", "cystic duct", "Omentum"],
    answer_index=3, images=["a.png"], metadata={"anatomy": "Cystic Duct"}, similarity=0.4, stage=2,
)


def test_defaults_are_the_informative_rewriters_and_all_wrong_groups():
    assert DEFAULT_REWRITERS == ("eliminate_options", "contrast_cue") and DEFAULT_DETECT == ("zero_std_wrong",)
    assert {"eliminate_options", "contrast_cue", "template_paraphrase", "shuffle_options"} <= set(REWRITERS)
    aug = GroupDiversityAugmenter()
    assert [r.name for r in aug.rewriters] == list(DEFAULT_REWRITERS) and aug.when == "same_step"


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_eliminate_options_keeps_the_gold_and_its_nearest_distractor_re_lettered(n: int):
    options = ["cystic duct", "Liver", "cystic artery", "Gut", "Omentum", "Spleen"][:n]
    q = Question(id="q", question="Which?", options=options, answer_index=0, stage=1, similarity=0.3,
                 metadata={"anatomy": "Duct"})
    rewrites = EliminateOptions(keep=2)(q, random.Random(0))
    if n <= 2:
        assert rewrites == []  # nothing to eliminate
        return
    [r] = rewrites
    assert r.options == ["cystic duct", "cystic artery"] and r.answer_text == "cystic duct" and r.answer_letter == "A"
    assert (r.stage, r.similarity, r.images, r.metadata["anatomy"]) == (1, 0.3, q.images, "Duct")
    assert r.metadata["rewriter"] == "eliminate_options" and r.metadata["augmented"] and r.metadata["eliminated"] == n - 2


def test_eliminate_options_moves_the_letter_with_the_gold_and_varies_its_position():
    [r] = EliminateOptions(keep=3)(DUCT, random.Random(0))
    assert "cystic artery" in r.options and r.answer_text == "cystic duct" and len(r.options) == 3
    assert r.options == [o for o in DUCT.options if o in r.options]  # original relative order
    assert r.answer_letter == LETTERS[r.options.index("cystic duct")]
    variants = EliminateOptions(keep=3, num_variants=3)(DUCT, random.Random(1))
    assert len({v.answer_index for v in variants}) == 3  # the gold at three different letters
    assert all(v.answer_text == "cystic duct" and "cystic artery" in v.options for v in variants)


def test_nearest_distractor_uses_the_encoder_when_given():
    vectors = {"cystic duct": [1.0, 0.0], "Liver": [0.0, 1.0], "cystic artery": [0.1, 1.0], "Gut": [0.2, 1.0],
               "Omentum": [0.9, 0.3]}

    def embed(texts: list[str]) -> np.ndarray:
        return np.array([vectors[t] for t in texts])

    assert DUCT.options[distractors_by_nearness(DUCT, embed)[0]] == "Omentum"  # the encoder, not the words
    assert DUCT.options[distractors_by_nearness(DUCT)[0]] == "cystic artery"
    aug = GroupDiversityAugmenter()
    aug.embed = embed  # the augmenter hands its encoder to the rewriters
    [r] = aug.rewriters[0](DUCT, random.Random(0))
    assert r.options == ["cystic duct", "Omentum"]
    assert "Omentum" in aug.rewriters[1](DUCT, random.Random(0))[0].question


def test_contrast_cue_rules_out_the_nearest_distractor_and_never_names_the_gold():
    [r] = ContrastCue()(DUCT, random.Random(0))
    assert r.options == DUCT.options and r.answer_index == DUCT.answer_index
    assert r.question.startswith(DUCT.question) and "cystic artery" in r.question
    assert "cystic duct" not in r.question.lower()
    assert r.metadata["rewriter"] == "contrast_cue" and r.metadata["cue_excludes"] == "cystic artery"
    custom = build_rewriter({"name": "contrast_cue", "template": "({distractor} is wrong.)"})
    assert custom(DUCT, random.Random(0))[0].question.endswith("(cystic artery is wrong.)")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"name": "eliminate_options", "keep": 1}, "keep must be an integer >= 2"),
        ({"name": "eliminate_options", "num_variants": 0}, "num_variants must be an integer >= 1"),
        ({"name": "contrast_cue", "template": "The answer is {gold}."}, "must contain '\\{distractor\\}'"),
    ],
)
def test_bad_rewriter_arguments_name_the_field(spec, match):
    with pytest.raises(ValueError, match=match):
        build_rewriter(spec)


# rows: all wrong | low mean with spread | all wrong | healthy
ORDER_REWARDS = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.6], [0.1, 0.1, 0.1, 0.1], [1.1, 0.1, 1.1, 0.1]])


def _questions(n: int) -> list[Question]:
    return [Question(id=f"q{i}", question="Which anatomy is shown?", options=["Liver", "Gut", "cystic duct", "Omentum"],
                     answer_index=i % 4, stage=0) for i in range(n)]


def test_all_wrong_groups_come_first_in_the_queue():
    assert hard_order(ORDER_REWARDS, ["low_mean", "zero_std_wrong"]) == [0, 2, 1]
    aug = GroupDiversityAugmenter(num_rewrites=1, detect=["low_mean", "zero_std_wrong"], when="next_batches", seed=0)
    aug.observe(_questions(4), ORDER_REWARDS)
    # three hard questions, a budget of two: it goes to the all-wrong ones, the low-mean q1 waits
    assert [q.metadata["augmented_from"] for q in aug.take(2)] == ["q0", "q2"]
    assert [q.metadata["augmented_from"] for q in aug.queue] == ["q1"]


def test_same_step_targets_rewrite_now_and_the_budget():
    aug = GroupDiversityAugmenter(detect=["low_mean", "zero_std_wrong"], max_rounds=1, seed=0)
    qs = _questions(4)
    assert aug.same_step_targets(qs, ORDER_REWARDS) == [0, 2]  # no spread only: q1 trains as it is
    first = aug.rewrite_now([qs[0], qs[2]], step=5)
    again = GroupDiversityAugmenter(detect=["low_mean", "zero_std_wrong"], seed=0).rewrite_now([qs[2]], step=5)
    assert [r.uid for r in first] == ["q0#s5r1-eliminate_options", "q2#s5r1-eliminate_options"]
    assert [vars(r) for r in again] == [vars(first[1])]  # the same whatever else the (rank's) batch holds
    assert all(r.answer_text == q.answer_text for r, q in zip(first, (qs[0], qs[2])))
    second = aug.rewrite_now([qs[0]], step=5, round_=2)[0]
    assert second.metadata["rewriter"] == "contrast_cue"  # round 2 tries the next candidate
    assert aug.observe(qs, ORDER_REWARDS, step=5) == [] and len(aug) == 0  # same_step: nothing queued
    assert aug.rounds == {"q0": 1, "q2": 1} and aug.same_step_targets(qs, ORDER_REWARDS) == []  # budget used


def test_settings_check_names_the_augmentation_fields():
    problems = settings_problems(augmentation={
        "when": "later", "max_rounds_per_step": -1, "detect": ["all_wrong"],
        "rewriters": [{"name": "eliminate_options", "keep": 1}, "contrast_cue", {"name": "nope"}],
    })
    text = "; ".join(problems)
    assert "augmentation.when = 'later': must be one of ['same_step', 'next_batches']" in text
    assert "augmentation.max_rounds_per_step = -1" in text and "augmentation.detect" in text
    assert "augmentation.rewriters[0] (eliminate_options).keep = 1: must be an integer >= 2" in text
    assert "augmentation.rewriters[2].name = 'nope'" in text and len(problems) == 5
    assert settings_problems(augmentation={"when": "next_batches", "rewriters": ["eliminate_options"]}) == []
    with pytest.raises(ValueError, match="when must be one of"):
        GroupDiversityCallback(when="later", encoder="jaccard")
    with pytest.raises(ValueError, match="eliminate_options: keep"):
        GroupDiversityCallback(rewriters=[{"name": "eliminate_options", "keep": 0}], encoder="jaccard")


def test_the_old_dynamic_sampling_key_is_refused_naming_requeue_originals():
    message = "augmentation.dynamic_sampling was renamed: use augmentation.requeue_originals"
    assert settings_problems(augmentation={"dynamic_sampling": True}) == [message]
    with pytest.raises(SettingsError, match=f"^{message}$"):
        check_settings(augmentation={"dynamic_sampling": False, "max_fraction": 2.0})
    with pytest.raises(ValueError, match=message):
        GroupDiversityCallback(dynamic_sampling=True, encoder="jaccard")
    assert GroupDiversityCallback(requeue_originals=True, encoder="jaccard").augmenter.requeue_originals
