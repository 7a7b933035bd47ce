"""GDQA in the same step (`augmentation.when: same_step`): the step's all-wrong groups are replaced
by rewrites of those questions, rolled out and scored in the step (every completion counted);
and with `next_batches`, the questions injected rewrites displace are deferred, not lost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from anatomy_lightning.augment.augmenter import GroupDiversityAugmenter
from anatomy_lightning.callbacks.augmentation import GroupDiversityCallback
from anatomy_lightning.data.datamodule import AnatomyVQADataModule
from anatomy_lightning.data.schema import Question
from tests.grpo.test_dynamic_sampling import _fit as fit_with_spy
from tests.support.cli_runs import CONFIGS, cpu_override, run_cli
from tests.support.tiny_vqa import write_questions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIGNAL_IDS = {"q1", "q3", "q5"}
CALLS: list[list[str]] = []  # per rollout scored: the question id of every completion, in order


def rewrite_reward(completions: list[str], questions: list[Question], **kwargs: Any) -> list[float]:
    """Spread (1, 0, ...) inside the groups of rewrites, all zeros (all wrong) for originals."""
    CALLS.append([q.id for q in questions])
    return [float(bool(q.metadata.get("augmented")) and i % 2 == 0) for i, q in enumerate(questions)]


def original_signal_reward(completions: list[str], questions: list[Question], **kwargs: Any) -> list[float]:
    """Spread only for the originals q1, q3, q5: rewrites never get signal."""
    CALLS.append([q.id for q in questions])
    return [float(q.id in SIGNAL_IDS and i % 2 == 0) for i, q in enumerate(questions)]


def _fit(tmp_path: Path, reward: str, steps: int, gdqa: GroupDiversityCallback, **kwargs: Any):
    """The dynamic-sampling tests' fit (same data, model and spy) with the GDQA callback added."""
    CALLS.clear()
    module, spy = fit_with_spy(tmp_path, reward, steps, (gdqa,), **kwargs)
    return module, spy, module.trainer


def test_same_step_trains_on_rewrites_of_the_dead_questions(tmp_path: Path) -> None:
    gdqa = GroupDiversityCallback(encoder="jaccard", seed=0, max_rounds=1)  # when: same_step is the default
    module, spy, trainer = _fit(tmp_path, "tests.grpo.test_same_step_augmentation:rewrite_reward", 4, gdqa)
    # 6 questions, batch 2: steps 1-3 see each once; step 4 meets questions whose one round is used
    for out in spy.seen[:3]:
        sampled, trained = out["sampled_questions"], out["questions"]
        assert not any(q.metadata.get("augmented") for q in sampled)
        assert all(q.metadata.get("augmented") for q in trained)  # every dead group replaced
        assert [q.metadata["augmented_from"] for q in trained] == [q.id for q in sampled]
        assert all(r.answer_text == q.answer_text for r, q in zip(trained, sampled))  # gold kept
        assert (out["group_rewards"].std(dim=1) > 0).all() and (out["sampled_group_rewards"] == 0).all()
    assert "sampled_questions" not in spy.seen[3]  # budget spent: the scheduled batch trains as it was
    assert not any(q.metadata.get("augmented") for q in spy.seen[3]["questions"])
    # every completion counts: 3 steps x (2 scheduled + 2 rewrites) x G=2, and 1 step x 2 x 2
    assert module.completions_generated == 3 * 4 * 2 + 2 * 2
    assert len(gdqa.augmenter) == 0 and set(gdqa.augmenter.rounds.values()) == {1}  # nothing queued
    metrics = trainer.callback_metrics
    assert metrics["augment/invalid_before"].item() == 1.0 and metrics["augment/invalid_after"].item() == 1.0
    assert metrics["augment/batch_share"].item() == 0.0  # the last step trained on originals


def test_with_dynamic_sampling_rewrites_come_first_then_fresh_prompts(tmp_path: Path) -> None:
    gdqa = GroupDiversityCallback(encoder="jaccard", seed=0)
    module, spy, _ = _fit(tmp_path, "tests.grpo.test_same_step_augmentation:original_signal_reward", 3, gdqa,
                          dynamic_sample=True, max_resample_times=8)
    for out in spy.seen:  # rewrites never have signal here: fresh prompts with signal fill the batch
        assert all(q.id in SIGNAL_IDS for q in out["questions"])
    scheduled = [o.get("sampled_questions", o["questions"]) for o in spy.seen]
    steps, k = [], 0  # the rollouts of each step: the scheduled batch's first
    for batch in scheduled:
        assert CALLS[k][::2] == [q.id for q in batch]
        end = next((j for j in range(k + 1, len(CALLS)) if len(steps) + 1 < len(scheduled)
                    and CALLS[j][::2] == [q.id for q in scheduled[len(steps) + 1]]), len(CALLS))
        steps.append(CALLS[k:end])
        k = end
    for batch, calls in zip(scheduled, steps):
        dead = [q.id for q in batch if q.id not in SIGNAL_IDS]
        if not dead:
            assert len(calls) == 1
            continue
        # round 1: rewrites of exactly the dead questions; every later round: fresh original prompts
        assert [i.split("#")[0] for i in calls[1][::2]] == dead and all("#s" in i for i in calls[1])
        assert all("#" not in i for c in calls[2:] for i in c) and len(calls) > 2
    assert module.completions_generated == sum(len(c) for c in CALLS)  # every scored completion counted


def test_displaced_questions_are_deferred_and_survive_a_state_dict_round_trip(tmp_path: Path) -> None:
    data = write_questions(tmp_path / "data", 8, images=(1,))

    def datamodule() -> AnatomyVQADataModule:
        dm = AnatomyVQADataModule(train_file=str(data), val_fraction=0.0, batch_size=4, seed=1)
        dm.setup("fit")
        return dm

    dm = datamodule()
    aug = GroupDiversityAugmenter(when="next_batches", max_fraction=0.5, num_rewrites=2, seed=0)
    dm.attach_augmenter(aug)
    aug.observe(dm.train_questions[:1], torch.zeros(1, 2))  # two rewrites of one question queued
    batches = iter(dm.train_dataloader())
    scheduled = next(batches)
    first = dm.on_before_batch_transfer(scheduled, 0)
    assert [q.uid for q in first[:2]] == [q.uid for q in scheduled.questions[:2]]
    assert all(q.metadata.get("augmented") for q in first[2:])
    displaced = [q.uid for q in scheduled.questions[2:]]
    assert dm.state_dict()["deferred"] == displaced

    resumed = datamodule()
    resumed.load_state_dict(dm.state_dict())
    second = next(batches)
    for module_dm in (dm, resumed):  # the uninterrupted run and the resumed one serve the same batch
        served = module_dm.on_before_batch_transfer(second, 0)
        assert [q.uid for q in served] == displaced + [q.uid for q in second.questions[:2]]
        assert module_dm.state_dict()["deferred"] == [q.uid for q in second.questions[2:]]


@pytest.mark.slow
def test_cli_fit_with_same_step_augmentation(tmp_path: Path) -> None:
    override = cpu_override(tmp_path, model=None, steps=2, model_extra={
        "rewards": {"tests.grpo.test_same_step_augmentation:rewrite_reward": 1.0}})
    run_cli("fit", [CONFIGS / "demo.yaml", override], tmp_path, "--run_name=gdqa", "--augmentation.when=same_step",
            "--augmentation.encoder=jaccard", "--curriculum.enabled=false")
    events = EventAccumulator(str(next((tmp_path / "outputs" / "tensorboard" / "gdqa").glob("fit_*"))))
    events.Reload()
    # originals all wrong, every rewrite with spread: the whole batch is replaced in both steps
    assert [e.value for e in events.Scalars("augment/invalid_before")] == [1.0, 1.0]
    assert [e.value for e in events.Scalars("augment/invalid_after")] == [0.0, 0.0]
    assert [e.value for e in events.Scalars("augment/batch_share")] == [1.0, 1.0]
    assert [e.value for e in events.Scalars("train/completions")] == [8.0, 16.0]  # 2 prompts x G=2, twice a step
