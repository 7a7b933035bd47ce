"""GDQA decisions on scripted rewards: detection, selection, budget, metrics, resume, and the
callback inside a real lightning.Trainer."""

from __future__ import annotations

import io
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from anatomy_lightning.augment.augmenter import GroupDiversityAugmenter, group_signal_stats, hard_groups
from anatomy_lightning.augment.selection import jaccard_similarity, prompt_text, select_diverse
from anatomy_lightning.callbacks.augmentation import GroupDiversityCallback
from anatomy_lightning.data.schema import Question

OPTIONS = ["Liver", "Gut", "Gallbladder", "Omentum"]
STEMS = [
    "What anatomy is at the top-left of the frame ?",
    "What is the anatomy left of the gallbladder?",
    "What is the name of the anatomy that is within the gut thing and above the scissors object?",
    "What is the brown top-left anatomy?",
]
# rows: all wrong (flat 0) | all right (flat 1.1) | low mean with spread | healthy | flat format-only 0.1
REWARDS = torch.tensor(
    [[0.0, 0.0, 0.0, 0.0], [1.1, 1.1, 1.1, 1.1], [0.0, 0.0, 0.0, 0.6], [1.1, 0.1, 1.1, 0.1], [0.1, 0.1, 0.1, 0.1]]
)


def make_questions(n: int, prefix: str = "q", stages: int = 1) -> list[Question]:
    return [
        Question(
            id=f"{prefix}{i}",
            question=STEMS[i % len(STEMS)],
            options=list(OPTIONS),
            answer_index=i % len(OPTIONS),
            images=[f"img{i}.png"],
            similarity=0.1 * (i % 5),
            stage=i % stages,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize(
    ("detect", "expected"),
    [
        (["zero_std_wrong"], [True, False, False, False, True]),
        (["zero_std_right"], [False, True, False, False, False]),
        (["low_mean"], [True, False, True, False, True]),
        (["zero_std_wrong", "low_mean"], [True, False, True, False, True]),
        (["zero_std_right", "low_mean"], [True, True, True, False, True]),
        ([], [False] * 5),
    ],
)
def test_hard_groups_per_detect_setting(detect, expected):
    assert hard_groups(REWARDS, detect, low_reward_threshold=0.25, right_reward_threshold=1.0).tolist() == expected


def test_observe_rewrites_hard_originals_only():
    aug = GroupDiversityAugmenter(when="next_batches", num_rewrites=2, detect=["zero_std_wrong"], seed=0, temperature=1.3)
    questions = make_questions(5)
    questions[4].metadata["augmented"] = True  # a rewrite that is still hard is not rewritten again
    enqueued = aug.observe(questions, REWARDS, step=7)
    assert [q.metadata["augmented_from"] for q in enqueued] == ["q0", "q0"]
    assert [q.id for q in enqueued] == [f"q0#aug{k}-{q.metadata['rewriter']}" for k, q in enumerate(enqueued)]
    assert all(q.answer_text == "Liver" and q.metadata["augmented_at_step"] == 7 for q in enqueued)
    assert all(q.metadata["temperature"] == 1.3 for q in enqueued)
    assert len(aug) == 2 and aug.metrics()["hard_total"] == 1 and aug.metrics()["last_enqueued"] == 2


def test_max_rounds_caps_rewrites_per_original_and_ids_stay_unique():
    aug = GroupDiversityAugmenter(when="next_batches", num_rewrites=2, max_rounds=2, detect=["zero_std_wrong"], seed=0)
    q = make_questions(1)
    sizes = [len(aug.observe(q, REWARDS[:1])) for _ in range(4)]
    assert sizes == [2, 2, 0, 0]
    ids = [r.id for r in aug.queue]
    assert len(set(ids)) == 4 and [i.split("#")[1][:4] for i in ids] == ["aug0", "aug1", "aug2", "aug3"]


def test_take_respects_budget_stages_and_order():
    aug = GroupDiversityAugmenter(when="next_batches", num_rewrites=1, detect=["zero_std_wrong"], max_fraction=0.25, seed=0)
    questions = make_questions(6, stages=3)  # stages 0,1,2,0,1,2
    aug.observe(questions, torch.zeros(6, 4))
    assert [q.stage for q in aug.queue] == [0, 1, 2, 0, 1, 2]
    assert [aug.budget(b) for b in (3, 4, 8, 9)] == [0, 1, 2, 2]
    first = aug.take(1, active_stages={1, 2})
    assert [q.metadata["augmented_from"] for q in first] == ["q1"]
    assert [q.metadata["augmented_from"] for q in aug.take(10, active_stages={0})] == ["q0", "q3"]
    assert [q.metadata["augmented_from"] for q in aug.queue] == ["q2", "q4", "q5"]  # others kept, in order
    assert aug.take(0) == [] and len(aug.take(2)) == 2 and len(aug) == 1
    assert aug.metrics()["taken_total"] == 5


def test_queue_cap_drops_the_oldest():
    aug = GroupDiversityAugmenter(when="next_batches", num_rewrites=1, detect=["zero_std_wrong"], queue_size=3, seed=0)
    aug.observe(make_questions(5), torch.zeros(5, 4))
    assert [q.metadata["augmented_from"] for q in aug.queue] == ["q2", "q3", "q4"]
    assert aug.metrics()["dropped_total"] == 2


def test_queued_rewrites_expire_after_max_age_steps():
    """A queue that fills faster than batches drain it must not grow without bound (issue 25)."""
    aug = GroupDiversityAugmenter(when="next_batches", num_rewrites=1, detect=["zero_std_wrong"], max_age_steps=10, seed=0)
    aug.observe(make_questions(3, "a"), torch.zeros(3, 4), step=0)
    aug.observe(make_questions(2, "b"), torch.zeros(2, 4), step=6)
    assert len(aug.queue) == 5 and aug.metrics()["dropped_total"] == 0
    aug.observe(make_questions(1, "c"), torch.ones(1, 4), step=11)  # nothing hard; the step-0 rewrites are 11 old
    assert [q.metadata["augmented_from"] for q in aug.queue] == ["b0", "b1"]
    assert aug.metrics()["dropped_total"] == 3
    keep = GroupDiversityAugmenter(when="next_batches", num_rewrites=1, detect=["zero_std_wrong"], max_age_steps=None)
    keep.observe(make_questions(3, "a"), torch.zeros(3, 4), step=0)
    keep.observe(make_questions(1, "c"), torch.ones(1, 4), step=1000)
    assert len(keep.queue) == 3


def test_requeue_originals_requeues_the_original_unchanged():
    aug = GroupDiversityAugmenter(when="next_batches", detect=["zero_std_wrong"], requeue_originals=True, seed=0)
    [orig] = make_questions(1)
    [again] = aug.observe([orig], REWARDS[:1])
    assert again.id == "q0#resample0" and again.metadata["augmented_from"] == "q0"
    assert (again.question, again.options, again.answer_index) == (orig.question, orig.options, orig.answer_index)


def test_bad_knobs_are_reported_together():
    expected = "unknown rules \\['all_wrong'\\].*max_fraction must be in \\[0, 1\\], got 1.5"
    with pytest.raises(ValueError, match=expected):
        GroupDiversityAugmenter(detect=["all_wrong"], max_fraction=1.5)


def test_group_signal_stats_by_hand():
    questions = make_questions(5)  # gold: Liver, Gut, Gallbladder, Omentum, Liver
    questions[3].metadata["augmented"] = True
    questions[2].metadata["anatomy"] = "Liver"  # an explicit class overrides the gold text
    stats = group_signal_stats(questions, REWARDS)
    # flat rows: 0 (Liver), 1 (Gut), 4 (Liver); row 2 (Liver) and 3 (Omentum) have spread
    assert stats == pytest.approx({
        "invalid_gradient_ratio": 3 / 5,
        "invalid_gradient_ratio/Liver": 2 / 3,
        "invalid_gradient_ratio/Gut": 1.0,
        "invalid_gradient_ratio/Omentum": 0.0,
        # split by the rows' mean against right_reward_threshold 1.0: 0 and 4 all wrong, 1 all right
        "invalid_all_wrong": 2 / 5,
        "invalid_all_wrong/Liver": 2 / 3,
        "invalid_all_wrong/Gut": 0.0,
        "invalid_all_wrong/Omentum": 0.0,
        "invalid_all_right": 1 / 5,
        "invalid_all_right/Liver": 0.0,
        "invalid_all_right/Gut": 1.0,
        "invalid_all_right/Omentum": 0.0,
        "reward/augmented": 0.6,
        "reward/original": (0.0 + 1.1 + 0.15 + 0.1) / 4,
    })
    assert "reward/augmented" not in group_signal_stats(make_questions(2), REWARDS[:2])
    with pytest.raises(ValueError, match="N = 2 questions.*got shape \\(5, 4\\)"):
        group_signal_stats(make_questions(2), REWARDS)


def _candidate(stem: str, options: list[str] = OPTIONS) -> Question:
    return Question(stem, stem, list(options), 0)


def test_select_diverse_prefers_far_and_mutually_distinct_with_embeddings():
    vectors = {
        "ref": [1.0, 0.0, 0.0], "near": [0.99, 0.14, 0.0], "far": [0.0, 1.0, 0.0],
        "far twin": [0.0, 0.99, 0.14], "other": [0.3, 0.0, 0.95],
    }

    def embed(texts: list[str]) -> np.ndarray:
        return np.array([vectors[t.split("\n")[0]] for t in texts])

    cands = [_candidate(s) for s in ("near", "far", "far twin", "other")]
    ref = _candidate("ref")
    assert [c.id for c in select_diverse(cands, 2, embed, lambda_=0.5, reference=ref)] == ["far", "other"]
    assert [c.id for c in select_diverse(cands, 2, embed, lambda_=1.0, reference=ref)] == ["far", "far twin"]
    assert select_diverse(cands, 0, embed) == [] and len(select_diverse(cands, 9, embed, reference=ref)) == 4


def test_select_diverse_without_encoder_uses_jaccard():
    ref = _candidate("What anatomy is at the top-left of the frame?")
    cands = [
        _candidate("What anatomy is at the top-left of the frame?"),  # the original itself: never picked
        _candidate("What anatomy is at the top-left of the image?"),
        _candidate("Looking at the upper left part of the image, which structure do you see?"),
        _candidate("What anatomy is at the top-left of the frame?", OPTIONS[::-1]),
    ]
    picked = select_diverse(cands, 2, None, reference=ref)
    assert [c.id for c in picked][0] == cands[2].id
    assert cands[0] not in picked and len(picked) == 2
    sim = jaccard_similarity([prompt_text(c) for c in cands])
    assert sim[0, 0] == 1.0 and 0.0 < sim[0, 3] < 1.0  # reordered options count as different


def test_select_diverse_with_the_real_encoder():
    similarity = pytest.importorskip("anatomy_lightning.data.similarity")
    scorer = similarity.SimilarityScorer()
    ref = _candidate("What is the anatomy left of the gallbladder?")
    cands = [
        _candidate("What is the anatomy to the left of the gallbladder?"),
        _candidate("The gallbladder is to the right of which anatomy?"),
        _candidate("What's the anatomy left of the gallbladder?"),
    ]
    [first] = select_diverse(cands, 1, scorer.embed, lambda_=1.0, reference=ref)
    assert first.id == cands[1].id


def test_state_dict_round_trip_gives_identical_later_decisions():
    def run_tail(aug: GroupDiversityAugmenter) -> list[tuple]:
        out = []
        for step in range(3):
            questions = make_questions(4, prefix=f"s{step}-", stages=2) + make_questions(2, stages=2)
            enq = aug.observe(questions, torch.tensor([[0.0] * 4, [0.0, 1.0, 0.0, 0.0]] * 3), step=step)
            out.append([(q.id, q.question, tuple(q.options), q.answer_index) for q in enq])
            out.append([q.id for q in aug.take(3, active_stages={step % 2})])
        return out

    knobs = dict(when="next_batches", num_rewrites=2, detect=["zero_std_wrong", "low_mean"], seed=3, max_rounds=2, queue_size=7)
    a = GroupDiversityAugmenter(**knobs)
    questions = make_questions(6, stages=2)
    questions[0].metadata["source"] = "sgg.json"  # to_record() drops it; the state must not
    a.observe(questions, torch.zeros(6, 4), step=0)
    a.take(1)
    stream = io.BytesIO()
    torch.save(a.state_dict(), stream)  # as in a Lightning checkpoint; must load with weights_only
    stream.seek(0)
    b = GroupDiversityAugmenter(**knobs)
    b.load_state_dict(torch.load(stream, weights_only=True))
    assert [vars(q) for q in b.queue] == [vars(q) for q in a.queue]
    assert b.metrics() == a.metrics()
    assert run_tail(b) == run_tail(a)


# ---------------------------------------------------------------------------------------------
# The callback in a real Trainer
# ---------------------------------------------------------------------------------------------

HARD = {"q0", "q3"}  # originals whose groups are always all wrong


class ScriptedModule(L.LightningModule):
    """Returns scripted group rewards: hard originals all 0, everything else with spread."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[Question]] = []

    def training_step(self, batch: list[Question], batch_idx: int):
        self.seen.append(list(batch))
        rows = [[0.0] * 4 if q.id in HARD else [1.1, 0.1, 1.1, 0.0] for q in batch]
        return {"loss": (self.weight**2).sum() + 1.0, "group_rewards": torch.tensor(rows)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyDataModule(L.LightningDataModule):
    """The DataModule contract: attach_augmenter, active_stages, injection before transfer."""

    def __init__(self, questions: list[Question], batch_size: int = 4) -> None:
        super().__init__()
        self.questions, self.batch_size = questions, batch_size
        self.augmenter = None

    def attach_augmenter(self, augmenter) -> None:
        self.augmenter = augmenter

    @property
    def active_stages(self) -> set[int] | None:
        return {0, 1}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.questions, batch_size=self.batch_size, shuffle=False, collate_fn=list)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.augmenter is not None:
            extra = self.augmenter.take(self.augmenter.budget(len(batch)), self.active_stages)
            batch = batch[: len(batch) - len(extra)] + extra
        return batch


def _trainer(tmp_path: Path, callback: GroupDiversityCallback, steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, log_every_n_steps=1,
    )


def test_callback_injects_rewrites_into_later_batches(tmp_path: Path):
    callback = GroupDiversityCallback(num_rewrites=2, max_fraction=0.5, encoder="jaccard", seed=0, when="next_batches")
    module, data = ScriptedModule(), TinyDataModule(make_questions(16, stages=2))
    trainer = _trainer(tmp_path, callback, steps=4)
    trainer.fit(module, datamodule=data)

    assert data.augmenter is callback.augmenter
    assert not any(q.metadata.get("augmented") for q in module.seen[0])  # nothing to inject yet
    injected = [q for batch in module.seen[1:] for q in batch if q.metadata.get("augmented")]
    assert injected and {q.metadata["augmented_from"] for q in injected} <= HARD
    assert all(sum(bool(q.metadata.get("augmented")) for q in b) <= 2 for b in module.seen)  # 0.5 * 4
    assert all(q.answer_text == OPTIONS[int(q.metadata["augmented_from"][1:]) % 4] for q in injected)
    metrics = trainer.callback_metrics
    assert {"augment/queue_size", "augment/batch_share", "augment/enqueued", "train/invalid_gradient_ratio",
            "train/invalid_gradient_ratio/Liver"} <= set(metrics)
    last = module.seen[-1]
    assert metrics["augment/batch_share"].item() == pytest.approx(
        sum(bool(q.metadata.get("augmented")) for q in last) / len(last))

    # checkpoint state: the callback's queue comes back in a fresh callback
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"]["GroupDiversityCallback"]
    fresh = GroupDiversityCallback(num_rewrites=2, max_fraction=0.5, encoder="jaccard", seed=0, when="next_batches")
    fresh.load_state_dict(state)
    assert [q.id for q in fresh.augmenter.queue] == [q.id for q in callback.augmenter.queue]
    assert fresh.augmenter.rng.getstate() == callback.augmenter.rng.getstate()


def test_disabled_callback_does_nothing(tmp_path: Path):
    callback = GroupDiversityCallback(enabled=False, encoder="jaccard")
    module, data = ScriptedModule(), TinyDataModule(make_questions(8))
    _trainer(tmp_path, callback, steps=2).fit(module, datamodule=data)
    assert data.augmenter is None and len(callback.augmenter) == 0


def test_callback_requires_group_rewards(tmp_path: Path):
    class NoRewards(ScriptedModule):
        def training_step(self, batch, batch_idx):
            return {"loss": (self.weight**2).sum() + 1.0}

    with pytest.raises(ValueError, match="'group_rewards'"):
        _trainer(tmp_path, GroupDiversityCallback(encoder="jaccard"), steps=1).fit(
            NoRewards(), datamodule=TinyDataModule(make_questions(4)))


def test_augmenter_is_deterministic_for_a_seed():
    def run(seed: int) -> list[str]:
        # paraphrases draw on the seed (eliminate_options / contrast_cue are deterministic)
        aug = GroupDiversityAugmenter(seed=seed, detect=["zero_std_wrong"], when="next_batches",
                                      rewriters=["template_paraphrase", "shuffle_options"])
        return [q.question for q in aug.observe(make_questions(4), torch.zeros(4, 4))]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_questions_sharing_an_id_keep_their_own_budget_and_queue_state_keeps_uids():
    """A file that repeats an id gives unique uids ("x", "x#dup1"): each has its own max_rounds,
    their rewrites stay distinct, and a checkpoint round trip keeps the uids."""
    aug = GroupDiversityAugmenter(when="next_batches", num_rewrites=1, max_rounds=1, detect=["zero_std_wrong"], seed=0)
    a, b = make_questions(2)
    a, b = a.replace(id="x", uid="x"), b.replace(id="x", uid="x#dup1")
    wrong = REWARDS[[0, 0]]  # both groups all wrong: both hard
    assert len(aug.observe([a, b], wrong)) == 2  # a shared id would have let only one through
    assert aug.observe([a, b], wrong) == []  # each used its one round
    uids = [q.uid for q in aug.queue]
    assert len(set(uids)) == 2 and {u.split("#aug")[0] for u in uids} == {"x", "x#dup1"}
    again = GroupDiversityAugmenter(when="next_batches", num_rewrites=1, max_rounds=1, detect=["zero_std_wrong"], seed=0)
    again.load_state_dict(aug.state_dict())
    assert [q.uid for q in again.queue] == uids
