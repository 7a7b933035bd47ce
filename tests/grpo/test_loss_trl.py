"""`grpo_loss` against TRL's own `GRPOTrainer._compute_loss` on identical float64 inputs.

TRL is not a dependency: the module is skipped where it is not installed. The trainer is built
without `__init__` (its maths needs a handful of attributes, not a model), and its per-token
log-prob forward is replaced by one that returns our tensors, so both sides see the same numbers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")
grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")

from anatomy_lightning.grpo.loss import grpo_loss  # noqa: E402

B, T, BETA, EPS_LOW, EPS_HIGH, MAX_LEN = 6, 5, 0.04, 0.2, 0.28, 5


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    return {
        "logp": logp,
        "old": logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
        "ref": logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64),
        "entropy": torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
        "adv": torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3, -0.4], dtype=torch.float64),
        "mask": mask,
    }


# GRPOConfig's defaults for the knobs of the newer loss types (TRL 1.16)
TRL_KNOB_DEFAULTS = {"delta": None, "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05, "vespo_k_pos": 2.0,
                     "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0}


def _trl_trainer(loss_type: str, level: str, bias_kl: bool, quantile: float, eps_high: float = EPS_HIGH,
                 **knobs: float | None) -> object:
    trainer = object.__new__(grpo_trainer.GRPOTrainer)
    one = SimpleNamespace(
        gather=lambda t: t.reshape(-1) if t.dim() == 0 else t,
        reduce=lambda t, reduction="sum": t,
        pad_across_processes=lambda t, dim=0, pad_index=0: t,
        num_processes=1,
        sync_gradients=True,
    )
    attrs = {
        "loss_type": loss_type, "importance_sampling_level": level, "beta": BETA,
        "epsilon_low": EPS_LOW, "epsilon_high": eps_high, "top_entropy_quantile": quantile,
        "off_policy_mask_threshold": None, "use_vllm": False, "vllm_importance_sampling_correction": False,
        "_entropy_bonus_enabled": False, "aux_loss_enabled": False, "max_completion_length": MAX_LEN,
        "current_gradient_accumulation_steps": 1, "model": SimpleNamespace(training=True),
        "accelerator": one, "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "args": SimpleNamespace(use_bias_correction_kl=bias_kl, steps_per_generation=1,
                                **{**TRL_KNOB_DEFAULTS, **knobs}),
    }
    for k, v in attrs.items():
        object.__setattr__(trainer, k, v)
    return trainer


@pytest.mark.parametrize("quantile", [1.0, 0.5])
@pytest.mark.parametrize("bias_kl", [False, True])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_matches_trl_compute_loss(loss_type: str, level: str, bias_kl: bool, quantile: float) -> None:
    x = _inputs()
    trainer = _trl_trainer(loss_type, level, bias_kl, quantile)
    theirs, theirs_grad = _trl_loss_and_grad(trainer, x)

    ours_logp = x["logp"].clone().requires_grad_()
    ours = grpo_loss(
        loss_type, ours_logp, x["adv"], x["mask"], old_logp=x["old"], ref_logp=x["ref"], beta=BETA,
        epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, max_completion_length=MAX_LEN,
        importance_sampling_level=level, use_bias_correction_kl=bias_kl, entropy=x["entropy"],
        top_entropy_quantile=quantile, num_items_in_batch=x["mask"].sum(), num_processes=1,
    )
    ours.loss.backward()
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_logp.grad, theirs_grad, rtol=1e-12, atol=1e-12)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for tag in ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max"):
        assert math.isclose(ours.metrics[tag], logged[tag], rel_tol=1e-9, abs_tol=1e-12), tag


# --- the newer loss types (cispo, sapo, luspo, vespo) and two-sided clipping (delta) -------------------

NEW_CASES = {  # id: (loss_type, importance sampling level, epsilon_high, knobs other than TRL's defaults)
    "cispo-token": ("cispo", "token", 1.2, {}),  # epsilon_high is eps_max: caps ratios above 1.2
    "cispo-sequence": ("cispo", "sequence", 1.1, {}),
    "sapo-token": ("sapo", "token", EPS_HIGH, {}),
    "sapo-sequence-temps": ("sapo", "sequence", EPS_HIGH, {"sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0}),
    "luspo-sequence": ("luspo", "sequence", EPS_HIGH, {}),
    "luspo-token-delta": ("luspo", "token", EPS_HIGH, {"delta": 1.3}),
    "vespo-token": ("vespo", "token", EPS_HIGH, {}),
    "vespo-sequence-knobs": ("vespo", "sequence", EPS_HIGH, {"vespo_k_pos": 1.0, "vespo_lambda_pos": 0.5,
                                                             "vespo_k_neg": 4.0, "vespo_lambda_neg": 1.5}),
    "grpo-token-delta": ("grpo", "token", EPS_HIGH, {"delta": 1.3}),
    "bnpo-token-delta": ("bnpo", "token", EPS_HIGH, {"delta": 1.3}),
    "dapo-sequence-delta": ("dapo", "sequence", EPS_HIGH, {"delta": 1.3}),
    "dr_grpo-token-delta": ("dr_grpo", "token", EPS_HIGH, {"delta": 1.3}),
}


def _trl_loss_and_grad(trainer: object, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's `_compute_loss` on `x` (its log-prob forward replaced by ours): loss and d loss / d logp."""
    logp = x["logp"].clone().requires_grad_()
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, x["entropy"], None)
    trl_inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": x["mask"],
        "advantages": x["adv"], "old_per_token_logps": x["old"], "ref_per_token_logps": x["ref"],
        "num_items_in_batch": x["mask"].sum(),
    }
    try:
        loss = trainer._compute_loss(None, trl_inputs)
    except AttributeError as exc:  # an internal attribute this TRL version reads and we did not set
        pytest.skip(f"TRL {trl.__version__} internals differ from 1.16: {exc}")
    except ValueError as exc:  # an older TRL: "Unknown loss type: ..."
        if "Unknown loss type" not in str(exc):
            raise
        pytest.skip(f"TRL {trl.__version__}: {exc}")
    loss.backward()
    return loss.detach(), logp.grad


@pytest.mark.parametrize(("bias_kl", "quantile"), [(False, 1.0), (True, 0.5)], ids=["plain", "biaskl-entropy"])
@pytest.mark.parametrize("case", sorted(NEW_CASES))
def test_newer_loss_types_and_delta_match_trl(case: str, bias_kl: bool, quantile: float) -> None:
    """Loss, gradient w.r.t. logp and every metric TRL logs, float64, to 1e-6. Measured: exact to 3e-17
    but where TRL rounds to float32: sapo's temperature 1.05 (loss 3e-8 off; ours keeps logp's dtype)
    and a sequence-level cispo_clip_ratio's average (5e-9)."""
    loss_type, level, eps_high, knobs = NEW_CASES[case]
    x = _inputs()
    trainer = _trl_trainer(loss_type, level, bias_kl, quantile, eps_high=eps_high, **knobs)
    theirs, their_grad = _trl_loss_and_grad(trainer, x)

    def ours(**extra: float | None):
        logp = x["logp"].clone().requires_grad_()
        out = grpo_loss(
            loss_type, logp, x["adv"], x["mask"], old_logp=x["old"], ref_logp=x["ref"], beta=BETA,
            epsilon_low=EPS_LOW, epsilon_high=eps_high, max_completion_length=MAX_LEN,
            importance_sampling_level=level, use_bias_correction_kl=bias_kl, entropy=x["entropy"],
            top_entropy_quantile=quantile, num_items_in_batch=x["mask"].sum(), num_processes=1,
            **{**knobs, **extra},
        )
        out.loss.backward()
        return out, logp.grad

    out, grad = ours()
    torch.testing.assert_close(out.loss, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, their_grad, rtol=1e-6, atol=1e-6)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged, "TRL logged nothing"
    for tag, value in logged.items():  # kl, entropy, then clip_ratio/*, cispo_clip_ratio or vespo/phi_seq_mean
        assert math.isclose(out.metrics[tag], value, rel_tol=1e-6, abs_tol=1e-9), tag
    if knobs.get("delta") is not None:  # the inputs reach the cap: delta changes the gradient
        assert not torch.allclose(ours(delta=None)[1], grad)
