"""Dynamic sampling (`model.dynamic_sample`, ms-swift's `dynamic_sample` / `max_resample_times`):
the selection rule, the merged rollout (each completion scored as in its own rollout, fast and
generic paths), the training loop keeping only groups with signal, and the CLI end to end with a
completion budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from anatomy_lightning.callbacks.augmentation import GroupDiversityCallback
from anatomy_lightning.data.datamodule import AnatomyVQADataModule
from anatomy_lightning.data.schema import Question
from anatomy_lightning.grpo.dynamic_sampling import Piece, Selection, dynamic_sample, merge_pieces
from anatomy_lightning.grpo.rollout import rollout_logprobs
from anatomy_lightning.grpo.sequences import Rollout, mask_vision_tokens
from anatomy_lightning.module import GRPOModule
from tests.support.cli_runs import CONFIGS, cpu_override, run_cli
from tests.support.standins import standin_image_size
from tests.support.tiny_vqa import MODEL_KWARGS, tiny_fit, write_questions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIGNAL_IDS = {"q1", "q3", "q5"}  # the questions whose groups get reward spread (see signal_reward)


def signal_reward(completions: list[str], questions: list[Question], **kwargs: Any) -> list[float]:
    """Spread (1, 0, 1, 0 ...) inside the groups of SIGNAL_IDS, all zeros elsewhere: which groups
    have a learning signal is known whatever the random policy writes."""
    return [float(q.id in SIGNAL_IDS and i % 2 == 0) for i, q in enumerate(questions)]


def zero_reward(completions: list[str], questions: list[Question], **kwargs: Any) -> list[float]:
    return [0.0] * len(completions)


# -- the selection rule ----------------------------------------------------------------------------
def _piece(ids: list[str], signal: list[bool], width: int, G: int = 2) -> Piece:
    n = len(ids)
    comp = torch.arange(n * G * width).view(n * G, width)
    ro = Rollout({}, comp, torch.ones(n * G, width), torch.zeros(n * G, dtype=torch.bool),
                 [f"{i}/{k}" for i in ids for k in range(G)], G)
    rewards = torch.arange(n * G, dtype=torch.float)
    qs = [Question(id=i, question="?", options=["a", "b"], answer_index=0) for i in ids]
    return Piece(qs, ro, rewards, {"f": rewards * 2}, torch.tensor(signal))


def test_selection_keeps_signal_then_fills_with_the_first_rollouts_groups() -> None:
    first = _piece(["a", "b", "c"], [False, True, False], width=3)
    draws = iter([_piece(["d", "e"], [False, False], width=5), _piece(["f", "g"], [True, False], width=2)])
    calls: list[tuple[int, int]] = []

    def resample(n: int, round_: int) -> Piece:
        calls.append((n, round_))
        return next(draws)

    sel = dynamic_sample(first, resample, max_resample_times=2)
    assert calls == [(2, 1), (2, 2)]  # asks for what is missing, one round at a time
    assert sel.picks == [(0, 1), (2, 0), (0, 0)]  # signal first (b, f), then the first rollout's a
    assert (sel.rounds, sel.generated, sel.filled_without_signal) == (2, 6 + 4 + 4, 1)
    questions, ids, mask, truncated, texts, rewards, per_fn = merge_pieces(sel, pad_id=-1)
    assert [q.id for q in questions] == ["b", "f", "a"] and texts == ["b/0", "b/1", "f/0", "f/1", "a/0", "a/1"]
    assert ids.shape == (6, 3)  # right-padded to the longest picked piece, mask 0 on the padding
    assert ids[2].tolist() == [0, 1, -1] and mask[2].tolist() == [1, 1, 0]
    assert rewards.tolist() == [2, 3, 0, 1, 0, 1] and per_fn["f"].tolist() == [4, 6, 0, 2, 0, 2]


def test_selection_without_missing_signal_or_rounds_keeps_the_batch() -> None:
    full = _piece(["a", "b"], [True, True], width=2)
    assert dynamic_sample(full, lambda n, r: pytest.fail("no resampling needed"), 3).unchanged
    none = _piece(["a", "b"], [False, False], width=2)
    sel = dynamic_sample(none, lambda n, r: pytest.fail("dynamic sampling is off"), 0)
    assert sel.unchanged and sel.generated == 4
    sel = dynamic_sample(none, lambda n, r: None, 3)  # nothing left to draw
    assert sel.unchanged and sel.rounds == 1


# -- the merged rollout ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2.5-vl", "gemma3"])
def test_merged_rollout_scores_every_completion_as_its_own_rollout(family: str, standin, tmp_path: Path) -> None:
    data = write_questions(tmp_path / "data", 4, image_size=standin_image_size(family), images=(1, 2))
    dm = AnatomyVQADataModule(train_file=str(data), val_fraction=0.0, batch_size=2)
    dm.setup("fit")
    qs = sorted(dm.train_questions, key=lambda q: q.id)
    module = GRPOModule(model=str(standin(family)), **{**MODEL_KWARGS, "max_new_tokens": 5})
    module.configure_model()
    torch.manual_seed(0)
    a, b = module.sampler.piece(qs[:2]), module.sampler.piece(qs[2:])
    sel = Selection([a, b], [(1, 1), (0, 0), (1, 0)])
    questions, merged, rewards, _ = module.sampler.merged(sel)
    assert [q.id for q in questions] == [qs[3].id, qs[0].id, qs[2].id]
    assert torch.equal(rewards, torch.cat([b.rewards[2:4], a.rewards[0:2], b.rewards[0:2]]))

    pad = module.processor.tokenizer.pad_token_id

    def logp(ro: Rollout, rows: slice) -> torch.Tensor:
        comp_in = mask_vision_tokens(ro.completion_ids, module.vision_ids, pad)
        with torch.no_grad():
            return rollout_logprobs(module.policy, ro, comp_in, rows, 1.0, reuse_images=False)

    G = 2
    for k, (piece, g) in enumerate(sel.picks):
        src = sel.pieces[piece].rollout
        width = src.completion_ids.shape[1]
        want, got = logp(src, slice(g * G, g * G + G)), logp(merged, slice(k * G, k * G + G))[:, :width]
        mask = src.completion_mask[g * G: g * G + G]
        assert mask.sum() > 0
        assert torch.equal(merged.completion_ids[k * G: k * G + G, :width], src.completion_ids[g * G: g * G + G])
        assert torch.allclose(got * mask, want * mask, atol=2e-5), (family, k)


# -- the training loop ---------------------------------------------------------------------------------
class _Outputs(Callback):
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.seen.append(outputs)


def _fit(tmp_path: Path, reward: str, steps: int, callbacks: tuple[Callback, ...] = (),
         **kwargs: Any) -> tuple[GRPOModule, _Outputs]:
    data = write_questions(tmp_path / "data", 6, images=(1,))
    dm = AnatomyVQADataModule(train_file=str(data), val_fraction=0.0, batch_size=2, seed=1)
    spy = _Outputs()
    module = GRPOModule(model="tiny-qwen2.5-vl", **{**MODEL_KWARGS, "rewards": {reward: 1.0}, **kwargs})
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path), callbacks=[spy, *callbacks])
    trainer.fit(module, datamodule=dm)
    return module, spy


def test_training_steps_keep_only_groups_with_signal(tmp_path: Path) -> None:
    module, spy = _fit(tmp_path, "tests.grpo.test_dynamic_sampling:signal_reward", steps=4,
                       dynamic_sample=True, max_resample_times=8)
    resampled = [o for o in spy.seen if "sampled_questions" in o]
    assert resampled, "no batch needed resampling (3 of 6 questions have no signal)"
    for out in spy.seen:
        assert len(out["questions"]) == 2 and out["group_rewards"].shape == (2, 2)
        assert all(q.id in SIGNAL_IDS for q in out["questions"])  # 8 rounds always find signal here
        assert (out["group_rewards"].std(dim=1) > 0).all()
    for out in resampled:  # what the sampler scheduled, with at least one group without signal
        assert any(q.id not in SIGNAL_IDS for q in out["sampled_questions"])
    assert module.completions_generated > 4 * 2 * 2  # resampled completions count as compute


def test_with_augmentation_too_the_replaced_no_signal_groups_are_rewritten(tmp_path: Path) -> None:
    """GDQA observes the groups as first sampled: the no-signal questions dynamic sampling swapped out
    are the ones it rewrites (the trained batch, all with signal, would give it nothing to do)."""
    gdqa = GroupDiversityCallback(encoder="jaccard", seed=0, max_fraction=0.5, when="next_batches")
    _, spy = _fit(tmp_path, "tests.grpo.test_dynamic_sampling:signal_reward", steps=4, callbacks=(gdqa,),
                  dynamic_sample=True, max_resample_times=8)
    replaced = {q.id for o in spy.seen for q in o.get("sampled_questions", []) if q.id not in SIGNAL_IDS}
    assert replaced, "no batch had a no-signal group replaced"
    rewritten = {q.metadata["augmented_from"] for q in gdqa.augmenter.queue} | {
        q.metadata["augmented_from"] for o in spy.seen for q in o["questions"] if q.metadata.get("augmented")}
    assert rewritten and rewritten <= {"q0", "q2", "q4"} and rewritten & replaced


def test_without_signal_anywhere_the_batch_is_kept_after_the_rounds(tmp_path: Path) -> None:
    module, spy = _fit(tmp_path, "tests.grpo.test_dynamic_sampling:zero_reward", steps=2,
                       dynamic_sample=True, max_resample_times=3)
    assert module.completions_generated == 2 * (2 * 2) * (1 + 3)  # every round drew 2 prompts x G=2
    assert all("sampled_questions" not in o for o in spy.seen)  # filled with the scheduled batch itself
    off, _ = _fit(tmp_path / "off", "tests.grpo.test_dynamic_sampling:zero_reward", steps=2)
    assert off.completions_generated == 2 * 2 * 2


def test_negative_resample_times_is_refused() -> None:
    with pytest.raises(ValueError, match="max_resample_times"):
        GRPOModule(model="tiny-qwen2.5-vl", dynamic_sample=True, max_resample_times=-1)


# -- the CLI, as a user runs it ---------------------------------------------------------------------
@pytest.mark.slow
def test_cli_fit_with_dynamic_sampling_and_a_completion_budget_then_test(tmp_path: Path) -> None:
    override = cpu_override(tmp_path, model=None, steps=6, model_extra={
        "dynamic_sample": True, "max_resample_times": 2,
        "rewards": {"tests.grpo.test_dynamic_sampling:zero_reward": 1.0},
    })
    budget = tmp_path / "budget.yaml"  # the demo's checkpoint callback, plus the budget
    budget.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: anatomy_lightning.checkpointing.ResumableCheckpoint\n"
        "      init_args: {dirpath: ckpts, filename: '{step}', save_last: true, every_n_train_steps: 6}\n"
        "    - class_path: anatomy_lightning.callbacks.budget.CompletionBudget\n"
        "      init_args: {max_completions: 20}\n"
    )
    # dynamic sampling alone: the demo's same-step GDQA would add a rewrite round before the fresh prompts
    run_cli("fit", [CONFIGS / "demo.yaml", override, budget], tmp_path, "--run_name=dyn",
            "--augmentation.when=next_batches")
    # each step samples 2 prompts x G=2, three times (no signal anywhere): 12, then 24 >= 20 stops at step 2
    ckpt = torch.load(tmp_path / "ckpts" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["completions_total"] == 24
    events = EventAccumulator(str(next((tmp_path / "outputs" / "tensorboard" / "dyn").glob("fit_*"))))
    events.Reload()
    assert [e.value for e in events.Scalars("train/completions")] == [12.0, 24.0]
    assert [e.value for e in events.Scalars("train/dynamic_sample/rounds")] == [2.0, 2.0]
    assert [e.value for e in events.Scalars("train/dynamic_sample/first_reward")] == [0.0, 0.0]
    run_cli("test", [CONFIGS / "demo.yaml", override, budget], tmp_path, "--run_name=dyn", "--ckpt_path=ckpts/last.ckpt")
