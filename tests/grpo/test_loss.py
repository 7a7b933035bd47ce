"""GRPO maths checked against numbers worked out by hand in the comments."""

from __future__ import annotations

import math
import re

import pytest
import torch

from anatomy_lightning.grpo.advantages import group_advantages
from anatomy_lightning.grpo.loss import (
    LOSS_AGGREGATIONS,
    POLICY_TERMS,
    LossOutput,
    chunk_weight,
    grpo_loss,
    high_entropy_threshold,
    is_finite_loss,
    kl_k3,
    needs_global_token_count,
)
from anatomy_lightning.grpo.metrics import combine_chunk_metrics, completion_length_metrics
from anatomy_lightning.grpo.sequences import token_logprobs, token_logprobs_and_entropy

# --- group_advantages ------------------------------------------------------------------------

# Three groups of G=3:
#   [0, 1, 2]  mean 1, sample var ((1 + 0 + 1) / 2) = 1 -> std 1, centred [-1, 0, 1]
#   [0, 2, 4]  mean 2, sample var ((4 + 0 + 4) / 2) = 4 -> std 2, centred [-2, 0, 2]
#   [.5,.5,.5] mean .5, std 0 -> no signal
REWARDS = torch.tensor([0.0, 1.0, 2.0, 0.0, 2.0, 4.0, 0.5, 0.5, 0.5])


def test_advantages_scaled_by_sample_std_plus_eps() -> None:
    out = group_advantages(REWARDS, group_size=3, eps=1e-4)
    expected = [-1 / 1.0001, 0, 1 / 1.0001, -2 / 2.0001, 0, 2 / 2.0001, 0, 0, 0]
    torch.testing.assert_close(out.advantages, torch.tensor(expected))
    torch.testing.assert_close(out.group_mean, torch.tensor([1.0, 2.0, 0.5]))
    torch.testing.assert_close(out.group_std, torch.tensor([1.0, 2.0, 0.0]))
    assert out.has_signal.tolist() == [True, True, False]


def test_advantages_unscaled_are_centred_rewards() -> None:
    out = group_advantages(REWARDS, group_size=3, scale_rewards=False)
    expected = [-1.0, 0.0, 1.0, -2.0, 0.0, 2.0, 0.0, 0.0, 0.0]
    assert out.advantages.tolist() == expected


def test_float_noise_below_tolerance_gives_exact_zeros() -> None:
    # 0.1 + 0.2 != 0.3 in float64: std ~3e-17, which (x - mean) / (std + 1e-4) would not zero.
    rewards = torch.tensor([0.1 + 0.2, 0.3, 0.3, 1.0, 1.0 + 1e-7, 1.0], dtype=torch.float64)
    out = group_advantages(rewards, group_size=3)
    assert 0 < out.group_std[0] < 1e-6 and 0 < out.group_std[1] < 1e-6
    assert out.has_signal.tolist() == [False, False]
    assert torch.equal(out.advantages, torch.zeros(6, dtype=torch.float64))


def test_single_member_groups_have_no_signal_and_no_nan() -> None:
    out = group_advantages(torch.tensor([1.0, 0.0]), group_size=1)
    assert out.advantages.tolist() == [0.0, 0.0]
    assert out.group_std.tolist() == [0.0, 0.0]
    assert out.has_signal.tolist() == [False, False]


def test_integer_rewards_are_promoted_to_float() -> None:
    out = group_advantages(torch.tensor([1, 0]), group_size=2, scale_rewards=False)
    assert out.advantages.dtype == torch.float32
    assert out.advantages.tolist() == [0.5, -0.5]


@pytest.mark.parametrize(
    ("rewards", "group_size", "message"),
    [
        (torch.zeros(5), 2, "does not divide the 5 rewards"),
        (torch.zeros(2, 2), 2, "shape (B,)"),
        (torch.tensor([0.0, float("inf")]), 2, "rewards contain inf"),
        (torch.zeros(4), 2, "scale_rewards='std'"),
    ],
)
def test_advantages_reject_bad_input(rewards: torch.Tensor, group_size: int, message: str) -> None:
    scale = "std" if "scale_rewards" in message else True
    with pytest.raises(ValueError, match=re.escape(message)):
        group_advantages(rewards, group_size, scale_rewards=scale)


def test_scale_rewards_strings_match_the_booleans() -> None:
    for word, flag in (("group", True), ("none", False)):
        a = group_advantages(REWARDS, 3, scale_rewards=word).advantages
        assert torch.equal(a, group_advantages(REWARDS, 3, scale_rewards=flag).advantages)


def test_scale_rewards_batch_divides_by_the_batch_std() -> None:
    # All 9 rewards: mean 10.5 / 9 = 7/6; sum of squares 25.75, so the squared deviations sum to
    # 25.75 - 9 * (7/6)^2 = 13.5 -> sample var 13.5 / 8 = 1.6875, std 1.299038. The centring stays
    # per group ([-1, 0, 1], [-2, 0, 2], no signal), only the divisor is the batch's.
    out = group_advantages(REWARDS, group_size=3, scale_rewards="batch", eps=1e-4)
    d = math.sqrt(1.6875) + 1e-4
    expected = [-1 / d, 0, 1 / d, -2 / d, 0, 2 / d, 0, 0, 0]
    torch.testing.assert_close(out.advantages, torch.tensor(expected))
    assert out.has_signal.tolist() == [True, True, False]  # signal is still a property of the group


def test_unscored_rewards_are_left_out_of_the_group_statistics() -> None:
    # Group 0 [1, 0, NaN, 2]: scored [1, 0, 2] -> mean 1, sample std 1; the NaN row gets 0.
    #   (counted as 0 instead it would be mean 0.75, std 0.957 and advantage -0.78 for that row)
    # Group 1 [NaN, 3, NaN, NaN]: one scored member cannot be compared -> no signal.
    nan = float("nan")
    out = group_advantages(torch.tensor([1.0, 0.0, nan, 2.0, nan, 3.0, nan, nan]), group_size=4)
    d = 1.0 + 1e-4
    torch.testing.assert_close(out.advantages, torch.tensor([0.0, -1 / d, 0.0, 1 / d, 0, 0, 0, 0]))
    torch.testing.assert_close(out.group_mean, torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(out.group_std, torch.tensor([1.0, 0.0]))
    assert out.has_signal.tolist() == [True, False]
    assert out.scored.tolist() == [True, True, False, True, False, True, False, False]
    batch = group_advantages(torch.tensor([1.0, 0.0, nan, 2.0, nan, 3.0, nan, nan]), 4, "batch")
    # scored [1, 0, 2, 3]: mean 1.5, squared deviations 0.25 + 2.25 + 0.25 + 2.25 = 5 -> std sqrt(5/3)
    torch.testing.assert_close(batch.advantages[:4], torch.tensor([0.0, -1.0, 0.0, 1.0]) / (math.sqrt(5 / 3) + 1e-4))


def test_group_advantage_metrics() -> None:
    # group stds [1, 2, 0] -> reward_std 1; one group of three has zero std
    metrics = group_advantages(REWARDS, group_size=3).metrics()
    assert metrics == pytest.approx({"reward_std": 1.0, "frac_reward_zero_std": 1 / 3})


# --- token_logprobs and kl_k3 ----------------------------------------------------------------


def test_token_logprobs_hand_value() -> None:
    # logits [0, ln 3] -> softmax [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    out = token_logprobs(logits, torch.tensor([[1, 0]]))
    torch.testing.assert_close(out, torch.tensor([[math.log(0.75), math.log(0.25)]]))


def test_token_logprobs_matches_log_softmax_and_chunking() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, 11, generator=gen)
    targets = torch.randint(0, 11, (5, 4), generator=gen)
    reference = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    full = token_logprobs(logits, targets)
    torch.testing.assert_close(full, reference)
    for chunk in (1, 2, 5, 7):
        torch.testing.assert_close(token_logprobs(logits, targets, chunk_size=chunk), full)


def test_token_entropy_hand_values() -> None:
    # row 0: softmax [1/4, 3/4, 0-ish]: H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.562335 ; row 1 uniform over 3: ln 3
    logits = torch.tensor([[[0.0, math.log(3.0), -1e4]], [[1.0, 1.0, 1.0]]], requires_grad=True)
    logp, ent = token_logprobs_and_entropy(logits, torch.tensor([[1], [2]]), chunk_size=1)
    torch.testing.assert_close(logp, torch.tensor([[math.log(0.75)], [-math.log(3.0)]]))
    h0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(ent, torch.tensor([[h0], [math.log(3.0)]]))
    assert logp.requires_grad and not ent.requires_grad  # a diagnostic, never a loss term
    assert token_logprobs_and_entropy(logits, torch.tensor([[1], [2]]), entropy=False)[1] is None


def test_token_logprobs_upcasts_half_precision_and_keeps_grad() -> None:
    logits = torch.randn(2, 3, 7, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.zeros(2, 3, dtype=torch.long)
    out = token_logprobs(logits, targets, chunk_size=1)
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    out.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


def test_kl_k3_hand_values_and_no_clamp() -> None:
    logp = torch.tensor([-0.3, -1.2, 0.0, 0.0])
    assert torch.equal(kl_k3(logp, logp.clone()), torch.zeros(4))
    # d = ln 0.5: 0.5 - ln 0.5 - 1 = ln 2 - 0.5 ; d = 1: e - 2 ; d = 25: e^25 - 26 ; d = -25: e^-25 + 24
    ref = torch.tensor([-0.3 + math.log(0.5), -0.2, 25.0, -25.0])
    out = kl_k3(logp, ref)
    torch.testing.assert_close(out[:2], torch.tensor([math.log(2) - 0.5, math.e - 2]))
    torch.testing.assert_close(out[2], torch.tensor(math.exp(25) - 26))  # the old clamp gave e^20 - 21
    torch.testing.assert_close(out[3], torch.tensor(math.exp(-25) + 24))  # ... and e^-20 + 19
    assert (out[1:] > 0).all()


def test_kl_gradient_survives_a_25_nat_gap() -> None:
    """d(beta * k3)/d logp = beta * (1 - exp(ref - logp)), whatever the gap.

    logp - ref = 25 nats (policy far more confident than the reference): the gradient is
    beta * (1 - e^-25) = beta to 1e-11, pulling logp back down; the old clamp of ref - logp at -20
    made it exactly 0. logp - ref = -25: beta * (1 - e^25), finite and as large as it should be.
    """
    beta = 0.1
    logp = torch.zeros(2, 1, requires_grad=True)
    ref = torch.tensor([[-25.0], [25.0]])
    out = grpo_loss("bnpo", logp, torch.zeros(2), torch.ones(2, 1), ref_logp=ref, beta=beta)
    out.loss.backward()
    # the token mean over 2 tokens halves each token's gradient
    assert logp.grad[0, 0].item() == pytest.approx(beta * (1 - math.exp(-25)) / 2, rel=1e-6)
    assert logp.grad[0, 0].item() == pytest.approx(beta / 2, rel=1e-6)
    assert logp.grad[1, 0].item() == pytest.approx(beta * (1 - math.exp(25)) / 2, rel=1e-5)


def test_kl_k3_stays_finite_beyond_float32_range_and_upcasts_half() -> None:
    # d = 60 is continued along the tangent at 50: value e^50 (1 + 10) - 61, gradient 1 - e^50;
    # d = -1000 is exact: 999 with gradient 1 (exp underflows harmlessly).
    logp = torch.zeros(2, requires_grad=True)
    out = kl_k3(logp, torch.tensor([60.0, -1000.0]))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logp.grad).all()
    assert out[0].item() == pytest.approx(math.exp(50) * 11 - 61, rel=1e-5)
    assert out[1].item() == pytest.approx(999.0)
    assert logp.grad.tolist() == pytest.approx([1 - math.exp(50), 1.0], rel=1e-5)
    half = kl_k3(torch.zeros(1, dtype=torch.float16), torch.tensor([12.0], dtype=torch.float16))
    assert half.dtype == torch.float32 and half.item() == pytest.approx(math.exp(12) - 13, rel=1e-6)


# --- grpo_loss: 2 groups x 2 completions x 3 tokens ------------------------------------------

ADV = torch.tensor([2.0, -1.0, 1.0, -0.5])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])  # lengths 3, 2, 1, 3
PAD = -5.0  # values on padding must never matter
LOGP = [[-0.1, -0.2, -0.3], [-0.4, -0.5, PAD], [-0.6, PAD, PAD], [-0.7, -0.8, -0.9]]

# With old_logp=None the ratio is 1, so each live token contributes -A_i:
#   grpo    : mean_i(-A_i)                           = -(2 - 1 + 1 - 0.5) / 4          = -0.375
#   bnpo/dapo: sum_tokens(-A_i) / 9                  = -(6 - 2 + 1 - 1.5) / 9          = -3.5 / 9
#   dr_grpo : sum_tokens(-A_i) / (B * L=4)           = -3.5 / 16                       = -0.21875
#   gpg     : sum_tokens(-logp * A_i) / 9 * alpha, alpha = 2 groups / 2 with signal = 1
#             seq0: 0.6*2 = 1.2 ; seq1: -0.9 ; seq2: 0.6 ; seq3: -2.4*0.5 = -1.2 -> -0.3 / 9
#             (the per-sequence mean it replaced gave (0.4 - 0.45 + 0.6 - 0.4) / 4 = 0.0375)
#   vespo   : w = 1 so phi = exp(lam + k*0 - lam) = 1: -logp*A summed / 9 = gpg's -0.3 / 9
#   cispo   : weight sg(min(rho=1, eps_max)), eps_max = epsilon_high = 0.2 (TRL's default, which
#             caps even on-policy tokens): 0.2 * -0.3 / 9
#   sapo    : per token -sigmoid(0) * 4 / tau * A = -2A / tau, tau 1.0 (A > 0) or 1.05, sequence mean:
#             (-2*2 + 2*1/1.05 - 2*1 + 2*0.5/1.05) / 4 = (-6 + 3/1.05) / 4 = -0.785714
#   luspo   : per-sequence token sums -A_i*len_i = -6, 2, -1, 1.5, mean over 4 rows = -0.875
EXPECTED = {"grpo": -0.375, "bnpo": -3.5 / 9, "dapo": -3.5 / 9, "dr_grpo": -0.21875, "gpg": -0.3 / 9,
            "vespo": -0.3 / 9, "cispo": 0.2 * -0.3 / 9, "sapo": (-6 + 3 / 1.05) / 4, "luspo": -0.875}
# d loss / d logp on live tokens (0 on padding):
#   grpo, sapo: -A_i / (len_i * B) (sapo's gate has slope tau/4 at rho = 1: 4/tau * tau/4 = 1);
#   bnpo, dapo, gpg, vespo: -A_i / 9 ; cispo: 0.2 * -A_i / 9 ; dr_grpo: -A_i / 16 ; luspo: -A_i / 4
LENGTHS = torch.tensor([3.0, 2.0, 1.0, 3.0])[:, None]
EXPECTED_GRAD = {
    "grpo": -ADV[:, None] / (LENGTHS * 4),
    "bnpo": -ADV[:, None] / 9 * torch.ones(1, 3),
    "dapo": -ADV[:, None] / 9 * torch.ones(1, 3),
    "dr_grpo": -ADV[:, None] / 16 * torch.ones(1, 3),
    "gpg": -ADV[:, None] / 9 * torch.ones(1, 3),
    "vespo": -ADV[:, None] / 9 * torch.ones(1, 3),
    "cispo": 0.2 * -ADV[:, None] / 9 * torch.ones(1, 3),
    "sapo": -ADV[:, None] / (LENGTHS * 4),
    "luspo": -ADV[:, None] / 4 * torch.ones(1, 3),
}
COMMON = {"max_completion_length": 4, "has_signal": torch.tensor([True, True]), "group_size": 2}


def _logp() -> torch.Tensor:
    return torch.tensor(LOGP, requires_grad=True)


def test_every_loss_type_is_tested() -> None:
    assert set(LOSS_AGGREGATIONS) == set(EXPECTED) == set(POLICY_TERMS)


@pytest.mark.parametrize("loss_type", sorted(EXPECTED))
def test_loss_value_and_gradient_by_hand(loss_type: str) -> None:
    logp = _logp()
    out = grpo_loss(loss_type, logp, ADV, MASK, **COMMON)
    torch.testing.assert_close(out.loss, torch.tensor(EXPECTED[loss_type]))
    out.loss.backward()
    torch.testing.assert_close(logp.grad, EXPECTED_GRAD[loss_type] * MASK)
    assert out.metrics["kl"] == 0.0
    # cispo's eps_max 0.2 caps rho = 1: every token with A > 0 (3 + 1 of 9) counts as clipped
    assert out.metrics["clip_ratio/region_mean"] == pytest.approx(4 / 9 if loss_type == "cispo" else 0.0)
    assert ("alpha" in out.metrics) == (loss_type == "gpg")


@pytest.mark.parametrize("loss_type", sorted(EXPECTED))
def test_kl_term_adds_beta_times_k3(loss_type: str) -> None:
    # ref = logp + ln 2 on every live token: k3 = 2 - ln 2 - 1 = 1 - ln 2 per token.
    # With 9 live tokens of 4 x 4 slots, dr_grpo averages it over 16 slots: * 9/16; luspo sums each
    # row's tokens and averages over 4 rows: * 9/4.
    k = 1 - math.log(2)
    logp = _logp()
    ref = logp.detach() + math.log(2)
    ref[1, 2] = float("-inf")  # padding in the reference must not leak either
    out = grpo_loss(loss_type, logp, ADV, MASK, ref_logp=ref, beta=0.1, **COMMON)
    share = {"dr_grpo": 9 / 16, "luspo": 9 / 4}.get(loss_type, 1.0)
    torch.testing.assert_close(out.loss, torch.tensor(EXPECTED[loss_type] + 0.1 * k * share))
    assert out.metrics["kl"] == pytest.approx(k, rel=1e-5)
    out.loss.backward()
    assert torch.isfinite(logp.grad).all() and (logp.grad[MASK == 0] == 0).all()


def test_kl_metric_is_zero_when_beta_is_zero() -> None:
    out = grpo_loss("grpo", _logp(), ADV, MASK, ref_logp=_logp().detach() + 1.0, beta=0.0)
    assert out.metrics["kl"] == 0.0
    torch.testing.assert_close(out.loss, torch.tensor(-0.375))


def test_empty_sequences_are_left_out_of_the_sequence_mean() -> None:
    # Only sequence 0 has tokens: loss = -A_0 = -1, not the -0.5 a plain mean over 2 rows gives.
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    out = grpo_loss("grpo", torch.zeros(2, 3, requires_grad=True), torch.tensor([1.0, 5.0]), mask)
    assert out.loss.item() == pytest.approx(-1.0)


# --- several updates per generation: clipping --------------------------------------------------
# logp = 0 everywhere, old_logp chosen so that rho = exp(logp - old) is:
#   seq0 (A = +1): [1.5, 1.1]   -> token0 above 1 + 0.2, A > 0: clipped to 1.2 -> -1.2, grad 0
#                                 token1 inside the range: -1.1, grad -rho*A = -1.1
#   seq1 (A = -2): [0.5, 1.5]   -> token0 below 1 - 0.2, A < 0: min(-1, -1.6) = -1.6 -> 1.6, grad 0
#                                 token1: min(-3, -2.4) = -3 (unclipped) -> 3, grad -rho*A = 3
#   grpo loss = ((-1.2 - 1.1) / 2 + (1.6 + 3) / 2) / 2 = (-1.15 + 2.3) / 2 = 0.575
#   without clipping: ((-1.5 - 1.1) / 2 + (1 + 3) / 2) / 2 = 0.35
#   gradient: per-token grad / (len 2 * B 2) -> [[0, -0.275], [0, 0.75]]
RATIOS = torch.tensor([[1.5, 1.1], [0.5, 1.5]])
CLIP_ADV = torch.tensor([1.0, -2.0])


def test_clipping_changes_value_and_zeroes_gradient_on_clipped_tokens() -> None:
    logp = torch.zeros(2, 2, requires_grad=True)
    out = grpo_loss("grpo", logp, CLIP_ADV, torch.ones(2, 2), old_logp=-RATIOS.log())
    assert out.loss.item() == pytest.approx(0.575, abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.275], [0.0, 0.75]]))
    assert out.metrics["clip_ratio/low_mean"] == pytest.approx(0.25)
    assert out.metrics["clip_ratio/high_mean"] == pytest.approx(0.25)
    assert out.metrics["clip_ratio/region_mean"] == pytest.approx(0.5)

    wide = grpo_loss("grpo", logp, CLIP_ADV, torch.ones(2, 2), old_logp=-RATIOS.log(),
                     epsilon_low=0.9, epsilon_high=9.0)
    assert wide.loss.item() == pytest.approx(0.35, abs=1e-6)
    assert wide.metrics["clip_ratio/region_mean"] == 0.0


def test_asymmetric_clip_uses_epsilon_high_on_the_upper_side() -> None:
    # eps_high = 0.6 lets rho 1.5 through: seq0 = (-1.5 - 1.1) / 2; seq1 token1 still unclipped.
    logp = torch.zeros(2, 2, requires_grad=True)
    out = grpo_loss("grpo", logp, CLIP_ADV, torch.ones(2, 2), old_logp=-RATIOS.log(),
                    epsilon_high=0.6)
    assert out.loss.item() == pytest.approx((-1.3 + 2.3) / 2, abs=1e-6)
    assert out.metrics["clip_ratio/high_mean"] == 0.0


# --- the newer loss types off-policy, on RATIOS / CLIP_ADV (logp = -1 where the value needs logp) ------
OFF_OLD = -RATIOS.log()  # logp = 0: rho = RATIOS


def test_delta_caps_the_unclipped_ratio() -> None:
    """Two-sided clipping, delta = 1.3: seq1 token1 (A = -2, rho 1.5, inside the lower clip) was
    -min(-3, -2.4) = 3 with gradient 3; now rho is capped at 1.3: -min(-2.6, -2.4) = 2.6, gradient 0.
    grpo = ((-1.2 - 1.1) / 2 + (1.6 + 2.6) / 2) / 2 = 0.475 (0.575 without delta); flags unchanged."""
    logp = torch.zeros(2, 2, requires_grad=True)
    out = grpo_loss("grpo", logp, CLIP_ADV, torch.ones(2, 2), old_logp=OFF_OLD, delta=1.3)
    assert out.loss.item() == pytest.approx(0.475, abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.275], [0.0, 0.0]]))
    assert out.metrics["clip_ratio/region_mean"] == pytest.approx(0.5)
    luspo = grpo_loss("luspo", torch.zeros(2, 2), CLIP_ADV, torch.ones(2, 2), old_logp=OFF_OLD, delta=1.3)
    assert luspo.loss.item() == pytest.approx((-1.2 - 1.1 + 1.6 + 2.6) / 2, abs=1e-6)  # row sums, mean
    kw = {"old_logp": OFF_OLD, "has_signal": torch.tensor([True]), "group_size": 2}
    for loss_type in ("sapo", "cispo", "vespo", "gpg"):  # as in TRL, delta acts on the clipped surrogate only
        capped, plain = (grpo_loss(loss_type, torch.zeros(2, 2), CLIP_ADV, torch.ones(2, 2), delta=d, **kw).loss
                         for d in (1.3, None))
        assert capped.item() == plain.item(), loss_type


def test_cispo_clips_the_detached_weight_not_the_gradient() -> None:
    """eps_max = 1.2: weights sg(min(rho, 1.2)) = [[1.2, 1.1], [0.5, 1.2]]; per token -w*A*logp,
    token mean: value with logp = -1: (1.2 + 1.1 - 1.0 - 2.4) / 4 = -0.275; gradient -w*A/4 =
    [[-0.3, -0.275], [0.25, 0.6]]: a capped token keeps a gradient (a clipped surrogate zeroes it).
    Capped with A > 0: one token of four -> cispo_clip_ratio = clip_ratio/high_mean = 0.25."""
    logp = torch.full((2, 2), -1.0, requires_grad=True)
    out = grpo_loss("cispo", logp, CLIP_ADV, torch.ones(2, 2), old_logp=OFF_OLD - 1, epsilon_high=1.2)
    assert out.loss.item() == pytest.approx(-0.275, abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.3, -0.275], [0.25, 0.6]]))
    assert out.metrics["cispo_clip_ratio"] == out.metrics["clip_ratio/high_mean"] == 0.25
    assert out.metrics["clip_ratio/low_mean"] == 0.0


def test_sapo_gate_is_soft() -> None:
    """Per token -sigmoid(tau*(rho-1)) * 4/tau * A, gradient -4*A*s*(1-s)*rho (s the sigmoid), tau 1.0
    for A = +1, 1.05 for A = -2; grpo's sequence mean. Nothing is hard-clipped: rho = 1.5 with A > 0
    keeps a gradient, smaller than its unclipped rho*A."""
    logp = torch.zeros(2, 2, requires_grad=True)
    out = grpo_loss("sapo", logp, CLIP_ADV, torch.ones(2, 2), old_logp=OFF_OLD)
    tau = [[1.0, 1.0], [1.05, 1.05]]
    s = [[1 / (1 + math.exp(-tau[i][j] * (RATIOS[i, j].item() - 1))) for j in range(2)] for i in range(2)]
    a = CLIP_ADV.tolist()
    value = sum(-s[i][j] * 4 / tau[i][j] * a[i] for i in range(2) for j in range(2)) / 4
    grad = [[-4 * a[i] * s[i][j] * (1 - s[i][j]) * RATIOS[i, j].item() / 4 for j in range(2)] for i in range(2)]
    assert out.loss.item() == pytest.approx(value, abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor(grad))
    assert 0 > logp.grad[0, 0].item() > -1.5 / 4
    assert out.metrics["clip_ratio/region_mean"] == 0.0


def test_vespo_gamma_weight_per_sequence() -> None:
    """w = product of the token ratios: seq0 1.5 * 1.1 = 1.65 (A = +1: k 2, lam 3), seq1 0.75
    (A = -2: k 3, lam 2). phi = exp(lam + k ln w - lam w): 1.65^2 e^(3 - 4.95) = 0.387341,
    0.75^3 e^(2 - 1.5) = 0.695554. Per token -phi*A*logp, token mean; logp = -1:
    (2 * 0.387341 - 2 * 2 * 0.695554) / 4 = -0.501884; gradient -phi*A/4 per token."""
    phi = [1.65**2 * math.exp(3 - 3 * 1.65), 0.75**3 * math.exp(2 - 2 * 0.75)]
    assert phi == pytest.approx([0.387341, 0.695554], abs=1e-6)
    logp = torch.full((2, 2), -1.0, requires_grad=True)
    out = grpo_loss("vespo", logp, CLIP_ADV, torch.ones(2, 2), old_logp=OFF_OLD - 1)
    assert out.loss.item() == pytest.approx((2 * phi[0] - 4 * phi[1]) / 4, abs=1e-6)
    assert out.loss.item() == pytest.approx(-0.501884, abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-phi[0] / 4] * 2, [2 * phi[1] / 4] * 2]))
    assert out.metrics["vespo/phi_seq_mean"] == pytest.approx(sum(phi) / 2, abs=1e-6)
    assert out.metrics["clip_ratio/region_mean"] == 0.0


def test_luspo_weighs_each_sequence_by_its_length() -> None:
    """LUSPO sums a sequence's tokens (GSPO's per-sequence loss times its length), then averages over
    every row, empty ones included: rows of 3 and 1 tokens, A = +1 each, on-policy: (-3 - 1) / 2 = -2,
    where grpo gives -1 whatever the lengths."""
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    for level in ("token", "sequence"):
        out = grpo_loss("luspo", torch.zeros(2, 3, requires_grad=True), torch.ones(2), mask,
                        importance_sampling_level=level)
        assert out.loss.item() == pytest.approx(-2.0)
    empty_row = grpo_loss("luspo", torch.zeros(3, 3), torch.ones(3), torch.cat([mask, torch.zeros(1, 3)]))
    assert empty_row.loss.item() == pytest.approx(-4 / 3)
    assert chunk_weight("luspo", mask[:1], torch.cat([mask, torch.zeros(1, 3)])) == pytest.approx(1 / 3)


# --- gpg alpha ---------------------------------------------------------------------------------


def _gpg_batch() -> tuple[torch.Tensor, torch.Tensor]:
    # rewards [1, 0 | 1, 1], unscaled: group 0 -> A = [0.5, -0.5], group 1 no signal -> [0, 0]
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, scale_rewards=False)
    return adv.advantages, adv.has_signal


def test_gpg_alpha_rescales_for_groups_without_signal() -> None:
    # per-sequence means of -logp*A: [2*0.5, 1*-0.5, 0, 0] = [1.0, -0.5, 0, 0] -> batch mean
    # 0.125; one of two groups has signal, alpha = 2 / 1 -> loss 0.25
    advantages, has_signal = _gpg_batch()
    logp = torch.tensor([[-2.0, -2.0], [-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]],
                        requires_grad=True)
    out = grpo_loss("gpg", logp, advantages, torch.ones(4, 2), has_signal=has_signal, group_size=2)
    assert out.metrics["alpha"] == 2.0
    assert out.loss.item() == pytest.approx(0.25)
    out.loss.backward()  # d/dlogp = -A * alpha / (2 tokens * 4 seqs)
    torch.testing.assert_close(logp.grad[:, 0], torch.tensor([-0.125, 0.125, 0.0, 0.0]))


def test_gpg_alpha_reported_under_no_grad() -> None:
    advantages, has_signal = _gpg_batch()
    with torch.no_grad():
        out = grpo_loss("gpg", -torch.ones(4, 2), advantages, torch.ones(4, 2),
                        has_signal=has_signal, group_size=2)
    assert out.metrics["alpha"] == 2.0
    assert not out.loss.requires_grad and out.loss.item() == 0.0


def test_gpg_without_any_signal_is_alpha_times_kl() -> None:
    # alpha = 2 groups / max(1, 0) = 2 ; every token has k3 = 1 - ln 2 -> loss 2 * 0.1 * k3
    logp = torch.zeros(4, 2, requires_grad=True)
    out = grpo_loss("gpg", logp, torch.zeros(4), torch.ones(4, 2), ref_logp=torch.full((4, 2),
                    math.log(2)), beta=0.1, has_signal=torch.tensor([False, False]), group_size=2)
    assert out.metrics["alpha"] == 2.0
    assert out.loss.item() == pytest.approx(2 * 0.1 * (1 - math.log(2)))
    out.loss.backward()
    assert torch.isfinite(logp.grad).all()


def test_gpg_alpha_for_four_groups_one_with_signal() -> None:
    has_signal = torch.tensor([False, True, False, False])
    out = grpo_loss("gpg", torch.zeros(8, 1), torch.zeros(8), torch.ones(8, 1),
                    has_signal=has_signal, group_size=2)
    assert out.metrics["alpha"] == 4.0


# --- guards ------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", sorted(EXPECTED))
def test_all_masks_empty_gives_zero_loss_with_connected_grad(loss_type: str) -> None:
    logp = torch.full((4, 3), float("-inf"), requires_grad=True)
    out = grpo_loss(loss_type, logp, ADV, torch.zeros(4, 3), ref_logp=torch.zeros(4, 3),
                    beta=0.04, **COMMON)
    assert out.loss.item() == 0.0 and is_finite_loss(out.loss)
    out.loss.backward()
    assert torch.equal(logp.grad, torch.zeros(4, 3))
    assert all(math.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("loss_type", sorted(EXPECTED))
def test_all_equal_rewards_give_exactly_zero_loss(loss_type: str) -> None:
    adv = group_advantages(torch.full((4,), 0.7), group_size=2)
    logp = _logp()
    out = grpo_loss(loss_type, logp, adv.advantages, MASK, has_signal=adv.has_signal,
                    group_size=2, max_completion_length=4)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.equal(logp.grad, torch.zeros(4, 3))


def test_single_member_groups_give_zero_loss() -> None:
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.2]), group_size=1)
    out = grpo_loss("gpg", _logp(), adv.advantages, MASK, has_signal=adv.has_signal, group_size=1)
    assert out.loss.item() == 0.0 and out.metrics["alpha"] == 4.0


def test_padding_with_inf_logp_does_not_poison_value_or_grad() -> None:
    logp = torch.tensor(LOGP)
    logp[MASK == 0] = float("-inf")
    logp.requires_grad_(True)
    old = logp.detach().clone()
    old[MASK == 0] = float("nan")
    out = grpo_loss("grpo", logp, ADV, MASK, old_logp=old)
    assert out.loss.item() == pytest.approx(-0.375)
    out.loss.backward()
    assert torch.isfinite(logp.grad).all()


def test_is_finite_loss() -> None:
    assert is_finite_loss(torch.tensor(0.5))
    assert not is_finite_loss(torch.tensor(float("nan")))
    assert not is_finite_loss(torch.tensor(float("inf")))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "ppo"}, "unknown loss_type 'ppo'"),
        ({"loss_type": "dr_grpo", "max_completion_length": None}, "max_completion_length"),
        ({"loss_type": "gpg", "has_signal": None}, "has_signal"),
        ({"loss_type": "gpg", "group_size": 3}, "has 2 groups of 3"),
    ],
)
def test_loss_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    args = {**COMMON, **kwargs}
    loss_type = args.pop("loss_type")
    with pytest.raises(ValueError, match=message):
        grpo_loss(loss_type, _logp(), ADV, MASK, **args)


def test_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="mask must match logp"):
        grpo_loss("grpo", _logp(), ADV, torch.ones(4, 2))


@pytest.mark.parametrize("loss_type", sorted(EXPECTED))
def test_chunked_loss_equals_full_batch_loss(loss_type: str) -> None:
    """Chunk-by-chunk forward/backward (the memory knob) optimises exactly the full-batch objective."""
    from anatomy_lightning.grpo.advantages import group_advantages
    from anatomy_lightning.grpo.loss import chunk_weight, grpo_loss

    torch.manual_seed(0)
    G, N, T = 2, 3, 5
    logp = (-torch.rand(N * G, T)).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(N * G, T)
    ref = logp.detach() + 0.1 * torch.randn(N * G, T)
    mask = torch.ones(N * G, T)
    mask[1, 3:] = 0
    mask[4, :] = 0
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.5])
    adv = group_advantages(rewards, G)
    kw = dict(old_logp=old, ref_logp=ref, beta=0.1, max_completion_length=T, group_size=G)
    full = grpo_loss(loss_type, logp, adv.advantages, mask, has_signal=adv.has_signal, **kw).loss
    (g_full,) = torch.autograd.grad(full, logp)
    total = torch.zeros(())
    for s in range(0, N * G, G):  # one group per chunk
        sl = slice(s, s + G)
        grp = slice(s // G, s // G + 1)
        part = grpo_loss(
            loss_type, logp[sl], adv.advantages[sl], mask[sl], old_logp=old[sl], ref_logp=ref[sl], beta=0.1,
            max_completion_length=T, has_signal=adv.has_signal[grp], group_size=G,
        ).loss
        total = total + chunk_weight(loss_type, mask[sl], mask, adv.has_signal[grp], adv.has_signal) * part
    (g_chunk,) = torch.autograd.grad(total, logp)
    assert torch.allclose(total, full, atol=1e-6)
    assert torch.allclose(g_chunk, g_full, atol=1e-6)


# --- the authors' gpg on unequal lengths ----------------------------------------------------------


def test_gpg_is_the_authors_token_mean_times_alpha_on_unequal_lengths() -> None:
    """(-logp*A + beta*k3) summed over the 8 live tokens, / 8, * alpha = 2 groups / 1 with signal.

    rewards [1, 0 | 1, 1] unscaled -> A = [0.5, -0.5, 0, 0]; lengths 3, 1, 2, 2.
    -logp*A per sequence: 0.5 * (1 + 2 + 3) = 3 ; -0.5 * 4 = -2 ; 0 ; 0 -> sum 1.
    k3 = 1 - ln 2 on each of 8 tokens: beta * 8 * k3 = 0.8 * 0.306853 = 0.245482.
    loss = (1 + 0.245482) / 8 * 2 = 0.311371. The per-sequence mean it replaced:
    ((1 - 2 + 0 + 0) / 4 + 0.1 * k3) * 2 = (-0.25 + 0.030685) * 2 = -0.438629 (off by 0.75).
    """
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, scale_rewards="none")
    P = -7.0
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, P, P], [-1.0, -1.0, P], [-2.0, -2.0, P]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]])
    ref = logp.detach() + math.log(2)
    out = grpo_loss("gpg", logp, adv.advantages, mask, ref_logp=ref, beta=0.1,
                    has_signal=adv.has_signal, group_size=2)
    k = 1 - math.log(2)
    assert out.loss.item() == pytest.approx((1 + 0.8 * k) / 8 * 2, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.311371, abs=1e-6)
    out.loss.backward()
    # d/dlogp: (-A + beta * (1 - 2)) / 8 * 2 on live tokens
    expected = (-adv.advantages[:, None] - 0.1) / 4 * mask
    torch.testing.assert_close(logp.grad, expected)


# --- dapo: the global token normaliser --------------------------------------------------------------


def test_dapo_divides_by_the_global_token_count_times_processes() -> None:
    # 9 live tokens here, 18 in the whole batch over 2 ranks: loss = sum * 2 / 18 = sum / 9 when the
    # other rank holds as many tokens; with 30 in all, -3.5 * 2 / 30.
    logp = _logp()
    out = grpo_loss("dapo", logp, ADV, MASK, num_items_in_batch=torch.tensor(30.0), num_processes=2)
    torch.testing.assert_close(out.loss, torch.tensor(-3.5 * 2 / 30))
    out.loss.backward()
    torch.testing.assert_close(logp.grad, -ADV[:, None] * 2 / 30 * MASK)
    assert chunk_weight("dapo", MASK[:2], MASK, num_items_in_batch=30.0) == 1.0
    assert chunk_weight("dapo", MASK[:2], MASK) == pytest.approx(5 / 9)  # local normaliser: chunk share


def test_dapo_chunks_with_the_global_count_equal_the_full_batch() -> None:
    full = grpo_loss("dapo", _logp(), ADV, MASK, num_items_in_batch=MASK.sum())
    parts = [grpo_loss("dapo", _logp()[rows], ADV[rows], MASK[rows], num_items_in_batch=MASK.sum())
             for rows in (slice(0, 2), slice(2, 4))]
    total = sum(chunk_weight("dapo", MASK[r], MASK, num_items_in_batch=MASK.sum()) * p.loss
                for r, p in zip((slice(0, 2), slice(2, 4)), parts))
    torch.testing.assert_close(total, full.loss)
    torch.testing.assert_close(full.loss, torch.tensor(-3.5 / 9))


@pytest.mark.parametrize("loss_type", ["cispo", "vespo"])
def test_cispo_and_vespo_take_the_global_token_count_like_dapo(loss_type: str) -> None:
    """TRL aggregates both like dapo: the chunks' weight is 1 and they sum to the full-batch loss."""
    assert needs_global_token_count(loss_type) and needs_global_token_count("dapo")
    assert not any(needs_global_token_count(t) for t in ("grpo", "bnpo", "dr_grpo", "gpg", "sapo", "luspo"))
    old = torch.tensor(LOGP) + 0.3  # off-policy: rho = exp(-0.3) on every live token
    kw = {"num_items_in_batch": MASK.sum(), "epsilon_high": 5.0}
    full = grpo_loss(loss_type, _logp(), ADV, MASK, old_logp=old, **kw)
    rows = (slice(0, 2), slice(2, 4))
    total = sum(chunk_weight(loss_type, MASK[r], MASK, num_items_in_batch=MASK.sum())
                * grpo_loss(loss_type, _logp()[r], ADV[r], MASK[r], old_logp=old[r], **kw).loss for r in rows)
    torch.testing.assert_close(total, full.loss)
    assert chunk_weight(loss_type, MASK[:2], MASK, num_items_in_batch=30.0) == 1.0
    with pytest.raises(ValueError, match=f"loss_type '{loss_type}' on 2 processes needs num_items_in_batch"):
        grpo_loss(loss_type, _logp(), ADV, MASK, num_processes=2)


# --- GSPO: sequence-level importance sampling ---------------------------------------------------------


def test_sequence_level_ratio_is_exp_of_the_mean_log_ratio() -> None:
    """rho_i = exp(mean_t log(pi / pi_old)), one per sequence, clipped as a whole.

    seq0 (A = +1): token ratios 1.5, 1.1 -> rho = sqrt(1.65) = 1.284523 > 1.2: clipped, -1.2, grad 0
    seq1 (A = -2): token ratios 0.5, 1.5 -> rho = sqrt(0.75) = 0.866025, inside: 2 * 0.866025
    grpo loss = (-1.2 + 1.732051) / 2 = 0.266025 (token level gave 0.575)
    grad seq1 tokens: (1 / B) * (-A) * rho * (1 / len) = 0.5 * 2 * 0.866025 / 2 = 0.433013
    clip ratios are per sequence: high 1 of 2 rows, low 0.
    """
    logp = torch.zeros(2, 2, requires_grad=True)
    out = grpo_loss("grpo", logp, CLIP_ADV, torch.ones(2, 2), old_logp=-RATIOS.log(),
                    importance_sampling_level="sequence")
    assert out.loss.item() == pytest.approx((-1.2 + 2 * math.sqrt(0.75)) / 2, abs=1e-6)
    out.loss.backward()
    r = math.sqrt(0.75) / 2
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0], [r, r]]))
    assert out.metrics["clip_ratio/high_mean"] == 0.5 and out.metrics["clip_ratio/low_mean"] == 0.0
    assert out.metrics["clip_ratio/high_max"] == 1.0 and out.metrics["clip_ratio/region_mean"] == 0.5


def test_sequence_level_on_policy_gradient_is_the_token_level_one_for_grpo() -> None:
    # rho = 1 with old = logp.detach(): d rho_i / d logp_it = 1 / len_i, the same as the token mean
    # of per-token ratios, so for grpo the two levels agree exactly on-policy.
    grads = []
    for level in ("token", "sequence"):
        logp = _logp()
        grpo_loss("grpo", logp, ADV, MASK, importance_sampling_level=level).loss.backward()
        grads.append(logp.grad)
    torch.testing.assert_close(grads[0], grads[1])


# --- the importance-weighted (bias-corrected) KL ----------------------------------------------------


def test_bias_corrected_kl_is_k3_times_the_ratio() -> None:
    """TRL's use_bias_correction_kl: kl * rho, gradient through both factors.

    One token, logp = 0, old = -ln 2 (rho = 2), ref = ln 2 (d = ln 2, k3 = 1 - ln 2 = 0.306853),
    A = 0, beta = 0.1: value 0.1 * 2 * k3 = 0.061371 (plain 0.030685); gradient
    0.1 * ((1 - e^d) * rho + k3 * rho) = 0.1 * (-2 + 0.613706) = -0.138629 (plain -0.1).
    """
    k = 1 - math.log(2)
    for corrected, value, grad in ((True, 0.2 * k, 0.1 * (-2 + 2 * k)), (False, 0.1 * k, -0.1)):
        logp = torch.zeros(1, 1, requires_grad=True)
        out = grpo_loss("bnpo", logp, torch.zeros(1), torch.ones(1, 1), old_logp=torch.full((1, 1), -math.log(2)),
                        ref_logp=torch.full((1, 1), math.log(2)), beta=0.1, use_bias_correction_kl=corrected)
        out.loss.backward()
        assert out.loss.item() == pytest.approx(value, rel=1e-6)
        assert logp.grad.item() == pytest.approx(grad, rel=1e-6)
        assert out.metrics["kl"] == pytest.approx(value / 0.1, rel=1e-6)  # logged as TRL does


# --- entropy and top_entropy_quantile ------------------------------------------------------------------

ENT = torch.tensor([[0.1, 0.5, 99.0], [0.9, 0.3, 99.0]])  # 99 on padding must never count
ENT_MASK = torch.tensor([[1, 1, 0], [1, 1, 0]])


def test_top_entropy_quantile_keeps_only_the_high_entropy_tokens() -> None:
    """rho = 0.5: threshold = quantile([0.1, 0.5, 0.9, 0.3], 0.5) = 0.4 -> keep 0.5 and 0.9.

    A = [2, -1], rho_ratio = 1: bnpo loss = (-2 [token 0,1] + 1 [token 1,0]) / 4 = -0.25; the KL
    (k3 = 1 - ln 2 on every live token, beta 0.1) stays on all four: + 0.1 * (1 - ln 2).
    Entropy metric: token mean over live tokens (0.1 + 0.5 + 0.9 + 0.3) / 4 = 0.45.
    """
    logp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    assert high_entropy_threshold(ENT, ENT_MASK, 0.5).item() == pytest.approx(0.4)
    out = grpo_loss("bnpo", logp, adv, ENT_MASK, entropy=ENT, top_entropy_quantile=0.5,
                    ref_logp=torch.full((2, 3), math.log(2)), beta=0.1)
    assert out.loss.item() == pytest.approx(-0.25 + 0.1 * (1 - math.log(2)), abs=1e-6)
    assert out.metrics["entropy"] == pytest.approx(0.45)
    out.loss.backward()
    kl_grad = 0.1 * (1 - 2) / 4
    expected = torch.tensor([[kl_grad, -0.5 + kl_grad, 0.0], [0.25 + kl_grad, kl_grad, 0.0]])
    torch.testing.assert_close(logp.grad, expected)


def test_top_entropy_quantile_bounds() -> None:
    # rho = 0 keeps only the highest live entropy (0.9, row 1); rho = 1 keeps every token.
    logp = torch.zeros(2, 3, requires_grad=True)
    out = grpo_loss("bnpo", logp, torch.tensor([2.0, -1.0]), ENT_MASK, entropy=ENT, top_entropy_quantile=0.0)
    assert out.loss.item() == pytest.approx(1 / 4)
    every = grpo_loss("bnpo", logp, torch.tensor([2.0, -1.0]), ENT_MASK, entropy=ENT, top_entropy_quantile=1.0)
    assert every.loss.item() == pytest.approx((-4 + 2) / 4)
    assert high_entropy_threshold(ENT, ENT_MASK, 1.0).item() == -math.inf
    assert high_entropy_threshold(ENT, torch.zeros(2, 3), 0.5).item() == math.inf
    # a threshold from the whole micro-batch overrides the rows' own: 0.2 keeps 0.5, 0.9, 0.3
    given = grpo_loss("bnpo", logp, torch.tensor([2.0, -1.0]), ENT_MASK, entropy=ENT, entropy_threshold=0.2)
    assert given.loss.item() == pytest.approx((-2 + 1 + 1) / 4)
    with pytest.raises(ValueError, match="needs the per-token entropy"):
        grpo_loss("bnpo", logp, torch.tensor([2.0, -1.0]), ENT_MASK, top_entropy_quantile=0.5)
    with pytest.raises(ValueError, match=r"top_entropy_quantile must be in \[0, 1\]"):
        grpo_loss("bnpo", logp, torch.tensor([2.0, -1.0]), ENT_MASK, entropy=ENT, top_entropy_quantile=1.5)
    with pytest.raises(ValueError, match="importance_sampling_level='seq'"):
        grpo_loss("bnpo", logp, torch.tensor([2.0, -1.0]), ENT_MASK, importance_sampling_level="seq")


# --- metrics by token, combined over row chunks ---------------------------------------------------------


def test_chunk_metrics_are_weighted_by_token_not_by_row() -> None:
    """Chunk A: 1 row of 4 tokens with k3 = 1 - ln 2 = 0.306853; chunk B: 1 row of 1 token with
    k3 = 3 - ln 3 - 1 = 0.901388. Token mean (4 * 0.306853 + 0.901388) / 5 = 0.425760; the row
    share average the module used gave (0.306853 + 0.901388) / 2 = 0.604121.
    """
    logp = torch.zeros(2, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    ref = torch.tensor([[math.log(2)] * 4, [math.log(3), 0, 0, 0]])
    old = torch.tensor([[0.0, 0.0, 0.0, -math.log(1.5)], [-math.log(1.5), 0, 0, 0]])  # rho 1.5 -> clipped
    ent = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0, 0, 0]])
    kw = dict(old_logp=old, ref_logp=ref, beta=0.1, entropy=ent)
    adv = torch.tensor([1.0, 1.0])
    chunks = [grpo_loss("bnpo", logp[r], adv[r], mask[r], **{k: v[r] for k, v in kw.items() if k != "beta"},
                        beta=0.1) for r in (slice(0, 1), slice(1, 2))]
    full = grpo_loss("bnpo", logp, adv, mask, **kw)
    combined = combine_chunk_metrics(chunks)
    k_a, k_b = 1 - math.log(2), 3 - math.log(3) - 1
    assert combined["kl"] == pytest.approx((4 * k_a + k_b) / 5)
    assert combined["kl"] == pytest.approx(0.425760, abs=1e-6)
    assert combined["entropy"] == pytest.approx((4 + 3) / 5)
    # 2 of 5 tokens clipped high; per sequence 1/4 and 1/1 -> high_max 1; nothing low -> low_min 0
    assert combined["clip_ratio/high_mean"] == pytest.approx(2 / 5)
    assert combined["clip_ratio/high_max"] == 1.0 and combined["clip_ratio/low_min"] == 0.0
    for key, value in full.metrics.items():
        assert combined[key] == pytest.approx(value), key
    assert combine_chunk_metrics([LossOutput(loss=torch.zeros(()))]) == {}


def test_completion_length_metrics() -> None:
    # lengths 3, 5 terminated; 8, 8 cut at the limit
    out = completion_length_metrics(torch.tensor([3, 5, 8, 8]), torch.tensor([False, False, True, True]))
    assert out == {
        "completions/mean_length": 6.0, "completions/min_length": 3.0, "completions/max_length": 8.0,
        "completions/clipped_ratio": 0.5, "completions/mean_terminated_length": 4.0,
        "completions/min_terminated_length": 3.0, "completions/max_terminated_length": 5.0,
    }
    none = completion_length_metrics(torch.tensor([8, 8]), torch.tensor([True, True]))
    assert none["completions/mean_terminated_length"] == 0.0 and none["completions/clipped_ratio"] == 1.0
