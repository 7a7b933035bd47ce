"""Numerical guards: degenerate batches give a finite (often exactly zero) loss, a NaN/inf reward is
an error naming the function, and a non-finite loss skips the optimizer step and is counted.

The first tests drive `grpo.loss` the way the training step does (advantages, row chunks weighted
by `chunk_weight`, backward); the last ones run `GRPOModule` with the tiny model in a real Trainer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from anatomy_lightning.data.schema import Question
from anatomy_lightning.grpo.advantages import group_advantages
from anatomy_lightning.grpo.loss import LOSS_AGGREGATIONS, chunk_weight, grpo_loss
from anatomy_lightning.grpo.rewards import RewardComputer

LOSS_TYPES = sorted(LOSS_AGGREGATIONS)
T = 5  # completion tokens


def _batch(scenario: str, g: int = 4, n: int = 3) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(rewards (B,), mask (B, T), G) for a degenerate batch."""
    b = n * g
    rewards = torch.tensor([float(i % 2) for i in range(b)])  # spread in every group by default
    mask = torch.ones(b, T)
    if scenario == "every completion empty":
        mask.zero_()
    elif scenario == "every completion truncated and masked":  # mask_truncated_completions with all truncated
        mask = mask * torch.zeros(b, 1)
    elif scenario == "every completion truncated, kept":  # all hit max_new_tokens, none answered
        rewards = torch.zeros(b)
    elif scenario == "rewards equal everywhere":
        rewards = torch.full((b,), 0.7)
    elif scenario == "some completions empty":
        mask[::3] = 0
    elif scenario == "groups of one":
        g = 1
    else:
        raise AssertionError(scenario)
    return rewards, mask, g


def _train_pass(loss_type: str, rewards: torch.Tensor, mask: torch.Tensor, g: int, beta: float, chunk: int):
    """The training step's loss computation: advantages, group-aligned chunks, weighted backward."""
    torch.manual_seed(0)
    b = rewards.numel()
    logits = torch.randn(b, T, requires_grad=True)
    logp = torch.nn.functional.logsigmoid(logits)
    logp = torch.where(mask.bool(), logp, torch.full_like(logp, -math.inf))  # padding may hold -inf
    ref = (logp.detach() + 0.1 * torch.randn(b, T)).where(mask.bool(), torch.full_like(logp, -math.inf))
    adv = group_advantages(rewards, g)
    total = torch.zeros(())
    step = max(g, chunk // g * g)
    for s in range(0, b, step):
        rows, groups = slice(s, s + step), slice(s // g, (s + step) // g)
        out = grpo_loss(
            loss_type, logp[rows], adv.advantages[rows], mask[rows], ref_logp=ref[rows], beta=beta,
            max_completion_length=T, has_signal=adv.has_signal[groups], group_size=g,
        )
        total = total + out.loss * chunk_weight(loss_type, mask[rows], mask, adv.has_signal[groups], adv.has_signal)
        assert all(math.isfinite(v) for v in out.metrics.values()), out.metrics
    total.backward()
    return total, logits.grad, adv


ZERO_LOSS = ("every completion empty", "every completion truncated and masked", "every completion truncated, kept",
             "rewards equal everywhere", "groups of one")


@pytest.mark.parametrize("chunk", [100, 4], ids=["one pass", "chunked"])
@pytest.mark.parametrize("scenario", [*ZERO_LOSS, "some completions empty"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_degenerate_batches_give_a_finite_loss_and_gradient(loss_type: str, scenario: str, chunk: int) -> None:
    rewards, mask, g = _batch(scenario)
    loss, grad, adv = _train_pass(loss_type, rewards, mask, g, beta=0.0, chunk=chunk)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.isfinite(adv.advantages).all()
    if scenario in ZERO_LOSS:
        assert loss.item() == 0.0  # exactly 0, not NaN and not float noise
        assert torch.count_nonzero(grad) == 0
    else:
        assert torch.count_nonzero(grad) > 0  # the value may be 0 (rho = 1, centred advantages); the gradient is not


@pytest.mark.parametrize("scenario", ZERO_LOSS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_degenerate_batches_with_kl_leave_only_the_finite_kl_term(loss_type: str, scenario: str) -> None:
    rewards, mask, g = _batch(scenario)
    loss, grad, _ = _train_pass(loss_type, rewards, mask, g, beta=0.04, chunk=4)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert loss.item() >= 0.0  # k3 >= 0; with no live token it is exactly 0
    if not mask.any():
        assert loss.item() == 0.0


# -- user reward functions -----------------------------------------------------------------------
def nan_reward(completions: list[str], questions: list[Question], **kwargs: Any) -> list[float]:
    return [0.0, math.nan] + [1.0] * (len(completions) - 2)


def inf_reward(completions: list[str], questions: list[Question], **kwargs: Any) -> list[float]:
    return [math.inf] * len(completions)


@pytest.mark.parametrize(("name", "index"), [("nan_reward", 1), ("inf_reward", 0)])
def test_a_non_finite_user_reward_is_an_error_naming_the_function(name: str, index: int) -> None:
    spec = f"{__name__}:{name}"
    computer = RewardComputer({"accuracy": 1.0, spec: 0.5})
    q = Question("q0", "Which organ?", ["Liver", "Gut"], 0)
    with pytest.raises(ValueError, match=rf"reward function '{spec}' returned (nan|inf) for completion {index}"):
        computer(["<answer>A</answer>"] * 4, [q] * 4)


def alternating_reward(completions: list[str], questions: list[Question], **kwargs: Any) -> list[float]:
    """1, 0, 1, 0...: every group has spread, so every step has a gradient."""
    return [float(i % 2 == 0) for i in range(len(completions))]


# -- the module ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("numerics-data")


def _weights(module: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.policy.named_parameters()}


def _fit(data_root: Path, max_steps: int, **module_kwargs: Any) -> tuple[Any, L.Trainer, list[dict[str, Any]]]:
    from anatomy_lightning.data.datamodule import AnatomyVQADataModule
    from anatomy_lightning.data.settings import SyntheticSettings
    from anatomy_lightning.module import GRPOModule

    class Record(L.Callback):
        """Weights and the logged non-finite count after every training batch."""

        def __init__(self) -> None:
            self.rows: list[dict[str, Any]] = []

        def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
            self.rows.append({"global_step": -1, "weights": _weights(module)})

        def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, i: int) -> None:
            self.rows.append({
                "global_step": trainer.global_step,
                "weights": _weights(module),
                "non_finite_steps": float(trainer.callback_metrics["train/non_finite_steps"]),
                "loss": trainer.callback_metrics.get("train/loss"),
            })

    dm = AnatomyVQADataModule(
        synthetic=SyntheticSettings(n_train=16, n_val=4, n_test=4, out_dir=str(data_root / "synthetic")),
        num_stages=2, batch_size=2, eval_batch_size=4, similarity={"cache_dir": str(data_root / "cache")},
    )
    settings = {"model": "tiny-qwen2.5-vl", "dtype": "float32", "num_generations": 2, "max_new_tokens": 4,
                "beta": 0.0, "learning_rate": 1e-2, "rewards": {f"{__name__}:alternating_reward": 1.0},
                **module_kwargs}
    module, record = GRPOModule(**settings), Record()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=[record], default_root_dir=str(data_root),
    )
    trainer.fit(module, datamodule=dm)
    return module, trainer, record.rows


def test_a_non_finite_loss_skips_the_step_and_is_counted(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import anatomy_lightning.grpo.update as module_py  # where the step calls grpo_loss

    calls = {"n": 0}
    real = module_py.grpo_loss

    def poisoned_once(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:  # the first training batch
            out.loss = out.loss * math.nan
        return out

    monkeypatch.setattr(module_py, "grpo_loss", poisoned_once)
    module, trainer, rows = _fit(data_root, max_steps=1)

    assert module.non_finite_steps == 1
    start, skipped, stepped = rows
    assert skipped["global_step"] == 0 and skipped["non_finite_steps"] == 1.0  # logged as train/non_finite_steps
    assert stepped["global_step"] == 1 and stepped["non_finite_steps"] == 1.0
    assert all(torch.equal(start["weights"][n], w) for n, w in skipped["weights"].items())  # no update
    assert any(not torch.equal(start["weights"][n], w) for n, w in stepped["weights"].items())
    assert all(torch.isfinite(w).all() for w in stepped["weights"].values())
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 1  # stepped only with the optimizer


def test_every_completion_empty_trains_without_nan(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import anatomy_lightning.grpo.fast_path as module_py  # where the step calls generate

    real = module_py.generate

    def empty(*args: Any, **kwargs: Any) -> Any:
        ro = real(*args, **kwargs)
        ro.completion_mask = torch.zeros_like(ro.completion_mask)  # every completion empty
        return ro

    monkeypatch.setattr(module_py, "generate", empty)
    module, trainer, rows = _fit(data_root, max_steps=2, beta=0.04)
    assert module.non_finite_steps == 0 and trainer.global_step == 2
    assert [float(r["loss"]) for r in rows[1:]] == [0.0, 0.0]
    for r in rows:
        assert all(torch.isfinite(w).all() for w in r["weights"].values())
