"""CurriculumCallback: the promotion rule on scripted metrics, the DataModule calls it makes,
checkpoint round trips, and real `Trainer.fit` runs that promote and log to TensorBoard."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Sampler

from anatomy_lightning.callbacks.curriculum import CurriculumCallback, CurriculumState, PromotionRule, active_stages
from anatomy_lightning.data.schema import Question


# -- the pure rule -------------------------------------------------------------------------------
def _run_validations(rule: PromotionRule, metrics: list[float | None], every: int = 10) -> list[tuple[int, str]]:
    """Feed one validation every `every` steps; returns (step, reason) of each promotion."""
    state, out = CurriculumState(), []
    for i, m in enumerate(metrics, start=1):
        reason = rule.observe_validation(state, i * every, m)
        if reason:
            state.promote(i * every, reason)
            out.append((i * every, reason))
    return out


def test_threshold_promotes_as_soon_as_current_stage_accuracy_reaches_it() -> None:
    rule = PromotionRule(num_stages=3, promote_at=0.6, patience=None)
    assert _run_validations(rule, [0.3, 0.5, 0.6, 0.2, 0.7, 0.9]) == [(30, "threshold"), (50, "threshold")]


def test_patience_counts_validations_without_improvement_and_resets_per_stage() -> None:
    rule = PromotionRule(num_stages=3, promote_at=None, patience=2)
    # stage 0: best 0.3, then 0.3 and 0.2 do not improve -> promoted at the 3rd validation
    # stage 1: 0.1, 0.4 (improves), 0.4, 0.39 -> promoted at the 7th
    assert _run_validations(rule, [0.3, 0.3, 0.2, 0.1, 0.4, 0.4, 0.39]) == [(30, "patience"), (70, "patience")]


def test_a_missing_metric_counts_as_no_improvement() -> None:
    rule = PromotionRule(num_stages=2, promote_at=0.6, patience=2)
    assert _run_validations(rule, [None, None]) == [(20, "patience")]


def test_max_steps_per_stage_promotes_on_steps_alone() -> None:
    rule, state = PromotionRule(num_stages=3, promote_at=None, patience=None, max_steps_per_stage=25), CurriculumState()
    for step in range(1, 80):
        if reason := rule.check_steps(state, step):
            state.promote(step, reason)
    assert [(h["step"], h["reason"]) for h in state.history] == [(25, "max_steps"), (50, "max_steps")]
    assert state.stage == 2  # the last stage is kept


def test_min_steps_per_stage_holds_back_an_early_threshold() -> None:
    rule = PromotionRule(num_stages=2, promote_at=0.5, patience=None, min_steps_per_stage=25)
    assert _run_validations(rule, [0.9, 0.9, 0.9]) == [(30, "threshold")]


def test_fixed_pacing_ignores_validation_and_promotes_every_n_steps() -> None:
    rule, state = PromotionRule(num_stages=3, pacing="fixed", fixed_steps=10), CurriculumState()
    assert rule.observe_validation(state, 50, 1.0) is None
    for step in range(1, 40):
        if reason := rule.check_steps(state, step):
            state.promote(step, reason)
    assert [(h["step"], h["from"], h["to"], h["reason"]) for h in state.history] == [
        (10, 0, 1, "fixed"),
        (20, 1, 2, "fixed"),
    ]


def test_active_stages_per_mode() -> None:
    assert active_stages(2, "cumulative", 0.1) == ([0, 1, 2], [], 0.0)
    assert active_stages(0, "exclusive", 0.1) == ([0], [], 0.0)
    assert active_stages(2, "exclusive", 0.1) == ([2], [0, 1], 0.1)


def test_bad_settings_are_reported_together() -> None:
    with pytest.raises(ValueError) as err:
        CurriculumCallback(promote_at=60, mode="mixed", pacing="linear", replay=1.5)
    for fragment in ("promote_at=60", "mode='mixed'", "pacing='linear'", "replay=1.5"):
        assert fragment in str(err.value)


# -- the callback with a fake trainer ------------------------------------------------------------
class RecordingDataModule:
    """Just the curriculum interface of the DataModule, recording every call."""

    def __init__(self, num_stages: int = 3) -> None:
        self.num_stages, self.calls = num_stages, []

    def set_active_stages(self, stages: Any, replay_stages: Any = (), replay_fraction: float = 0.0) -> None:
        self.calls.append((list(stages), list(replay_stages), replay_fraction))


class RecordingModule:
    def __init__(self) -> None:
        self.logged: list[tuple[str, float]] = []

    def log(self, name: str, value: float, **_: Any) -> None:
        self.logged.append((name, value))


def _fake_trainer(dm: RecordingDataModule) -> SimpleNamespace:
    return SimpleNamespace(
        datamodule=dm,
        global_step=0,
        callback_metrics={},
        sanity_checking=False,
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        is_global_zero=True,
        loggers=[],
        strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj),
    )


def _start(cb: CurriculumCallback, num_stages: int = 3) -> tuple[SimpleNamespace, RecordingModule]:
    trainer, module = _fake_trainer(RecordingDataModule(num_stages)), RecordingModule()
    cb.setup(trainer, module, "fit")
    cb.on_fit_start(trainer, module)
    return trainer, module


def _validate(cb: CurriculumCallback, trainer: SimpleNamespace, module: Any, step: int, accs: dict[int, float]) -> None:
    trainer.global_step = step
    trainer.callback_metrics = {f"val/acc_stage_{k}": torch.tensor(v) for k, v in accs.items()}
    cb.on_validation_end(trainer, module)


def test_exclusive_mode_sends_the_current_stage_with_replay_of_earlier_ones() -> None:
    cb = CurriculumCallback(mode="exclusive", replay=0.2, promote_at=0.6)
    trainer, module = _start(cb)
    _validate(cb, trainer, module, 10, {0: 0.7, 1: 0.1})
    _validate(cb, trainer, module, 20, {0: 0.1, 1: 0.65})
    _validate(cb, trainer, module, 30, {2: 0.99})  # last stage: stays
    assert trainer.datamodule.calls == [([0], [], 0.0), ([1], [0], 0.2), ([2], [0, 1], 0.2)]
    assert cb.history == [
        {"step": 10, "from": 0, "to": 1, "reason": "threshold"},
        {"step": 20, "from": 1, "to": 2, "reason": "threshold"},
    ]


def test_cumulative_mode_grows_the_pool_and_reads_only_the_current_stage_metric() -> None:
    cb = CurriculumCallback(promote_at=0.6, patience=None)
    trainer, module = _start(cb)
    _validate(cb, trainer, module, 10, {0: 0.5, 1: 0.9, 2: 0.9})  # other stages' accuracy is irrelevant
    _validate(cb, trainer, module, 20, {0: 0.6})
    assert trainer.datamodule.calls == [([0], [], 0.0), ([0, 1], [], 0.0)]


def test_sanity_check_and_trainer_validate_never_promote() -> None:
    cb = CurriculumCallback(promote_at=0.1)
    trainer, module = _start(cb)
    trainer.sanity_checking = True
    _validate(cb, trainer, module, 0, {0: 1.0})
    trainer.sanity_checking, trainer.state.fn = False, TrainerFn.VALIDATING
    _validate(cb, trainer, module, 0, {0: 1.0})
    assert cb.stage == 0 and cb.history == []


def test_max_steps_is_checked_after_every_training_batch() -> None:
    cb = CurriculumCallback(promote_at=None, patience=None, max_steps_per_stage=3)
    trainer, module = _start(cb)
    batch = [Question(f"q{i}", "?", ["a", "b"], 0, similarity=0.1 * i, stage=0) for i in range(4)]
    for step in range(1, 8):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, None, batch, step - 1)
    assert [(h["step"], h["reason"]) for h in cb.history] == [(3, "max_steps"), (6, "max_steps")]
    stages = [v for name, v in module.logged if name == "curriculum/stage"]
    assert stages == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0]  # the stage the batch was drawn from
    assert ("curriculum/batch_similarity", pytest.approx(0.15)) in module.logged


def test_disabled_makes_every_stage_active_and_never_promotes() -> None:
    cb = CurriculumCallback(enabled=False, promote_at=0.1, max_steps_per_stage=1)
    trainer, module = _start(cb)
    _validate(cb, trainer, module, 10, {0: 1.0})
    cb.on_train_batch_end(trainer, module, None, [Question("q", "?", ["a", "b"], 0, similarity=0.3)], 0)
    assert trainer.datamodule.calls == [([0, 1, 2], [], 0.0)]
    assert cb.history == [] and [name for name, _ in module.logged] == ["curriculum/batch_similarity"]


def test_the_decision_uses_rank_zeros_metric() -> None:
    cb = CurriculumCallback(promote_at=0.6, patience=None)
    trainer, module = _start(cb)
    trainer.strategy.broadcast = lambda obj, src=0: 0.9  # rank 0 saw 0.9, this rank 0.1
    _validate(cb, trainer, module, 10, {0: 0.1})
    assert cb.stage == 1


SCRIPT = [{0: 0.3}, {0: 0.3}, {0: 0.7}, {1: 0.2}, {1: 0.4}, {1: 0.4}, {1: 0.3}, {2: 0.5}]


@pytest.mark.parametrize("load_before_setup", [True, False])
def test_state_dict_round_trip_continues_identically(load_before_setup: bool) -> None:
    def run(cb: CurriculumCallback, trainer: Any, module: Any, script: list[dict[int, float]], first: int) -> None:
        for i, accs in enumerate(script, start=first):
            _validate(cb, trainer, module, 10 * i, accs)

    whole = CurriculumCallback(promote_at=0.6, patience=2)
    trainer, module = _start(whole)
    run(whole, trainer, module, SCRIPT, 1)

    first = CurriculumCallback(promote_at=0.6, patience=2)
    t1, m1 = _start(first)
    run(first, t1, m1, SCRIPT[:5], 1)
    saved = torch.load(_roundtrip(first.state_dict()), weights_only=True)  # the checkpoint's own format

    resumed = CurriculumCallback(promote_at=0.6, patience=2)
    t2, m2 = _fake_trainer(RecordingDataModule()), RecordingModule()
    if load_before_setup:  # both hook orders Lightning may use (restore before / after on_fit_start)
        resumed.load_state_dict(saved)
        resumed.setup(t2, m2, "fit")
        resumed.on_fit_start(t2, m2)
    else:
        resumed.setup(t2, m2, "fit")
        resumed.on_fit_start(t2, m2)
        resumed.load_state_dict(saved)
    assert t2.datamodule.calls[-1] == ([0, 1], [], 0.0)  # stage 1 re-applied to the DataModule
    run(resumed, t2, m2, SCRIPT[5:], 6)
    assert resumed.state == whole.state
    assert resumed.history == [
        {"step": 30, "from": 0, "to": 1, "reason": "threshold"},
        {"step": 70, "from": 1, "to": 2, "reason": "patience"},
    ]
    assert t2.datamodule.calls[-1] == trainer.datamodule.calls[-1] == ([0, 1, 2], [], 0.0)


def _roundtrip(obj: Any) -> Any:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


# -- real Trainer runs ---------------------------------------------------------------------------
def _acc_script(step: int, stage: int) -> float:
    """Stage 0 improves with steps (threshold 0.6 reached at step 6); stage 1 plateaus at 0.4."""
    return step / 10 if stage == 0 else 0.4


class ScriptedModule(L.LightningModule):
    """A one-parameter module whose validation accuracy per stage is scripted by global_step."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen_stages: list[tuple[int, set[int]]] = []

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # lists of Question stay as they are

    def training_step(self, batch: list[Question], batch_idx: int) -> torch.Tensor:
        self.seen_stages.append((self.global_step, {q.stage for q in batch}))
        return (self.w - 1.0).pow(2).sum()

    def validation_step(self, batch: list[Question], batch_idx: int) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        for k in range(3):
            self.log(f"val/acc_stage_{k}", _acc_script(self.global_step, k))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _ActivePool(Sampler[int]):
    """Draws from whatever stages are active right now (the real StageSampler does this properly)."""

    def __init__(self, dm: LiveDataModule) -> None:
        self.dm = dm

    def __len__(self) -> int:
        return 400

    def __iter__(self):
        rng = random.Random(0)
        for _ in range(len(self)):
            yield rng.choice([i for i, q in enumerate(self.dm.questions) if q.stage in self.dm.active])


class LiveDataModule(L.LightningDataModule):
    """A minimal DataModule with the curriculum interface: 30 questions, S(q) = i/30, 3 stages."""

    num_stages = 3

    def __init__(self) -> None:
        super().__init__()
        self.questions = [Question(f"q{i}", "?", ["a", "b"], 0, similarity=i / 30, stage=i // 10) for i in range(30)]
        self.active: set[int] = {0, 1, 2}
        self.calls: list[tuple[list[int], list[int], float]] = []

    def set_active_stages(self, stages: Any, replay_stages: Any = (), replay_fraction: float = 0.0) -> None:
        self.calls.append((list(stages), list(replay_stages), replay_fraction))
        self.active = set(stages)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.questions, batch_size=4, sampler=_ActivePool(self), collate_fn=list)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.questions[:4], batch_size=4, collate_fn=list)


def _trainer(root: Path, callback: CurriculumCallback, max_steps: int, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=1,
        log_every_n_steps=1,
        callbacks=[callback],
        logger=TensorBoardLogger(str(root), name="tb"),
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _events(log_dir: str) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_fit_promotes_stages_and_writes_them_to_tensorboard(tmp_path: Path) -> None:
    cb = CurriculumCallback(promote_at=0.6, patience=2)
    dm = LiveDataModule()
    trainer = _trainer(tmp_path, cb, max_steps=14, enable_checkpointing=False)
    trainer.fit(ScriptedModule(), datamodule=dm)

    assert cb.history == [
        {"step": 6, "from": 0, "to": 1, "reason": "threshold"},
        {"step": 12, "from": 1, "to": 2, "reason": "patience"},
    ]
    assert dm.calls == [([0], [], 0.0), ([0, 1], [], 0.0), ([0, 1, 2], [], 0.0)]

    events = _events(trainer.logger.log_dir)
    # scalars are logged per batch index (0-based): batches 0-5 ran before the promotion at step 6
    stage = {e.step: e.value for e in events.Scalars("curriculum/stage")}
    assert [stage[i] for i in (0, 5, 6, 11, 12, 13)] == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
    sims = [(e.step, e.value) for e in events.Scalars("curriculum/batch_similarity")]
    early = [v for s, v in sims if s <= 5]
    late = [v for s, v in sims if s >= 12]
    assert max(early) < 10 / 30 < sum(late) / len(late)  # stage 0 only, then the harder stages join
    assert any(tag.startswith("curriculum/promotion") for tag in events.Tags()["tensors"])


def test_fit_resumed_from_a_checkpoint_continues_like_an_uninterrupted_run(tmp_path: Path) -> None:
    first = CurriculumCallback(promote_at=0.6, patience=2)
    trainer = _trainer(tmp_path / "a", first, max_steps=8, enable_checkpointing=False)
    trainer.fit(ScriptedModule(), datamodule=LiveDataModule())
    ckpt = tmp_path / "step8.ckpt"
    trainer.save_checkpoint(ckpt)
    assert first.history == [{"step": 6, "from": 0, "to": 1, "reason": "threshold"}]

    resumed, dm = CurriculumCallback(promote_at=0.6, patience=2), LiveDataModule()
    trainer = _trainer(tmp_path / "b", resumed, max_steps=14, enable_checkpointing=False)
    trainer.fit(ScriptedModule(), datamodule=dm, ckpt_path=str(ckpt))
    assert dm.calls[0] == ([0, 1], [], 0.0)  # the restored stage, never stage 0 again
    assert resumed.history == [
        {"step": 6, "from": 0, "to": 1, "reason": "threshold"},
        {"step": 12, "from": 1, "to": 2, "reason": "patience"},
    ]


def test_fit_with_the_real_datamodule_trains_only_on_active_stages(tmp_path: Path) -> None:
    datamodule = pytest.importorskip("anatomy_lightning.data.datamodule")
    from anatomy_lightning.data.settings import SyntheticSettings

    dm = datamodule.AnatomyVQADataModule(
        synthetic=SyntheticSettings(n_train=64, n_val=12, n_test=12, out_dir=str(tmp_path / "data")),
        num_stages=3,
        batch_size=4,
        eval_batch_size=12,
        similarity={"cache_dir": str(tmp_path / "emb")},
    )
    cb = CurriculumCallback(promote_at=0.6, patience=2)
    module = ScriptedModule()
    trainer = _trainer(tmp_path, cb, max_steps=14, enable_checkpointing=False, use_distributed_sampler=False)
    trainer.fit(module, datamodule=dm)

    assert [h["to"] for h in cb.history] == [1, 2]
    assert dm.active_stages == {0, 1, 2}
    before_first_promotion = [stages for step, stages in module.seen_stages if step < 6]
    assert before_first_promotion and all(stages == {0} for stages in before_first_promotion)
    assert any(2 in stages for _, stages in module.seen_stages)


# -- soft mode and signal pacing (issue 20) --------------------------------------------------------
def test_soft_mode_keeps_a_floor_of_every_later_stage_and_ends_on_the_full_distribution() -> None:
    assert active_stages(0, "soft", 0.0, 3, 0.1) == ([0], [1, 2], pytest.approx(0.2))
    assert active_stages(1, "soft", 0.0, 3, 0.1) == ([0, 1], [2], pytest.approx(0.1))
    assert active_stages(2, "soft", 0.0, 3, 0.1) == ([0, 1, 2], [], 0.0)
    cb = CurriculumCallback(mode="soft", floor=0.15, promote_at=0.6, patience=None)
    trainer, module = _start(cb)
    _validate(cb, trainer, module, 10, {0: 0.7})
    _validate(cb, trainer, module, 20, {1: 0.7})
    assert trainer.datamodule.calls == [([0], [1, 2], pytest.approx(0.3)), ([0, 1], [2], pytest.approx(0.15)),
                                        ([0, 1, 2], [], 0.0)]


def test_soft_mode_sampler_draws_the_floor_share_from_later_stages() -> None:
    from anatomy_lightning.data.sampler import StageSampler

    stages = [0] * 300 + [1] * 300 + [2] * 300
    sampler = StageSampler(stages, seed=3, epoch_length=900)
    sampler.set_active(*active_stages(0, "soft", 0.0, 3, 0.1))
    drawn = [stages[c.index] for c in sampler]
    share = [drawn.count(k) / len(drawn) for k in range(3)]
    assert share[0] == pytest.approx(0.8, abs=0.05)
    assert share[1] == pytest.approx(0.1, abs=0.05) and share[2] == pytest.approx(0.1, abs=0.05)


def _groups(stage_correct: list[tuple[int, int]], G: int = 4) -> dict[str, Any]:
    """training_step outputs for groups of (stage, completions correct out of G)."""
    questions = [Question(f"q{i}", "?", ["a", "b"], 0, similarity=0.1, stage=s) for i, (s, _) in enumerate(stage_correct)]
    rewards = torch.tensor([[1.2] * c + [0.2] * (G - c) for _, c in stage_correct])
    return {"questions": questions, "group_rewards": rewards}


def test_signal_pacing_promotes_on_the_current_stages_training_accuracy() -> None:
    cb = CurriculumCallback(mode="soft", pacing="signal", promote_at=0.6, patience=None, signal_window=4)
    trainer, module = _start(cb)
    low, high = _groups([(0, 1), (0, 2), (2, 4)]), _groups([(0, 4), (0, 3), (1, 0)])
    for step, out in enumerate([low, low, high, high], start=1):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, out, out["questions"], step - 1)
    # stage 0's last 4 groups: after step 2 [1/4, 2/4, 1/4, 2/4] = 0.375; after step 3 [1/4, 2/4, 4/4, 3/4]
    # = 0.625 >= 0.6 (stage 2's 4/4 is not stage 0's); then stage 1's window starts empty
    assert [(h["step"], h["reason"]) for h in cb.history] == [(3, "signal")]
    assert cb.state.window == [0.0]  # step 4: stage 1's one group
    logged = dict(module.logged)
    assert logged["curriculum/train_acc_stage_0"] == pytest.approx(0.875)
    assert logged["curriculum/train_acc_stage_1"] == pytest.approx(0.0)
    # validation does not promote under signal pacing
    _validate(cb, trainer, module, 5, {1: 1.0})
    assert cb.stage == 1


def test_signal_pacing_window_is_checkpointed() -> None:
    cb = CurriculumCallback(pacing="signal", promote_at=0.9, patience=None, signal_window=8)
    trainer, module = _start(cb)
    out = _groups([(0, 2), (0, 3)])
    cb.on_train_batch_end(trainer, module, out, out["questions"], 0)
    state = cb.state_dict()
    other = CurriculumCallback(pacing="signal", promote_at=0.9, patience=None, signal_window=8)
    other.load_state_dict(state)
    assert other.state.window == pytest.approx([0.5, 0.75])


def test_soft_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="floor=1.0"):
        CurriculumCallback(mode="soft", floor=1.0)
    with pytest.raises(ValueError, match="pacing='validation'"):
        CurriculumCallback(pacing="validation")
