"""GRPO maths checked against numbers worked out by hand in the comments."""

from __future__ import annotations

import math
import re

import pytest
import torch

from anatomy_lightning.grpo.loss import (
    LOSS_AGGREGATIONS,
    group_advantages,
    grpo_loss,
    is_finite_loss,
    kl_k3,
    token_logprobs,
)

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
        (torch.tensor([0.0, float("nan")]), 2, "NaN/inf"),
    ],
)
def test_advantages_reject_bad_input(rewards: torch.Tensor, group_size: int, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        group_advantages(rewards, group_size)


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


def test_token_logprobs_upcasts_half_precision_and_keeps_grad() -> None:
    logits = torch.randn(2, 3, 7, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.zeros(2, 3, dtype=torch.long)
    out = token_logprobs(logits, targets, chunk_size=1)
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    out.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


def test_kl_k3_zero_positive_and_clamped() -> None:
    logp = torch.tensor([-0.3, -1.2, 0.0, 0.0, 0.0])
    assert torch.equal(kl_k3(logp, logp.clone()), torch.zeros(5))
    # d = ln 0.5: 0.5 - ln 0.5 - 1 = ln 2 - 0.5 ; d = 1: e - 2 ; d = 100 clamped to 20 / to 5
    ref = torch.tensor([-0.3 + math.log(0.5), -0.2, 100.0, -100.0, 100.0])
    out = kl_k3(logp, ref)
    torch.testing.assert_close(out[:2], torch.tensor([math.log(2) - 0.5, math.e - 2]))
    torch.testing.assert_close(out[2], torch.tensor(math.exp(20) - 21))
    torch.testing.assert_close(out[3], torch.tensor(math.exp(-20) + 19))
    torch.testing.assert_close(kl_k3(logp, ref, clamp=5.0)[4], torch.tensor(math.exp(5) - 6))
    assert (out > 0).all()


# --- grpo_loss: 2 groups x 2 completions x 3 tokens ------------------------------------------

ADV = torch.tensor([2.0, -1.0, 1.0, -0.5])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])  # lengths 3, 2, 1, 3
PAD = -5.0  # values on padding must never matter
LOGP = [[-0.1, -0.2, -0.3], [-0.4, -0.5, PAD], [-0.6, PAD, PAD], [-0.7, -0.8, -0.9]]

# With old_logp=None the ratio is 1, so each live token contributes -A_i:
#   grpo    : mean_i(-A_i)                           = -(2 - 1 + 1 - 0.5) / 4          = -0.375
#   bnpo/dapo: sum_tokens(-A_i) / 9                  = -(6 - 2 + 1 - 1.5) / 9          = -3.5 / 9
#   dr_grpo : sum_tokens(-A_i) / (B * L=4)           = -3.5 / 16                       = -0.21875
#   gpg     : mean_i(mean_t(-logp * A_i)), alpha = 2 groups / 2 with signal = 1
#             seq0: 0.6*2/3 = 0.4 ; seq1: -0.9/2 = -0.45 ; seq2: 0.6 ; seq3: -2.4*0.5/3 = -0.4
#             -> (0.4 - 0.45 + 0.6 - 0.4) / 4 = 0.0375
EXPECTED = {"grpo": -0.375, "bnpo": -3.5 / 9, "dapo": -3.5 / 9, "dr_grpo": -0.21875, "gpg": 0.0375}
# d loss / d logp on live tokens (0 on padding):
#   grpo: -A_i / (len_i * B) ; bnpo: -A_i / 9 ; dr_grpo: -A_i / 16 ; gpg: -A_i / (len_i * B)
LENGTHS = torch.tensor([3.0, 2.0, 1.0, 3.0])[:, None]
EXPECTED_GRAD = {
    "grpo": -ADV[:, None] / (LENGTHS * 4),
    "bnpo": -ADV[:, None] / 9 * torch.ones(1, 3),
    "dapo": -ADV[:, None] / 9 * torch.ones(1, 3),
    "dr_grpo": -ADV[:, None] / 16 * torch.ones(1, 3),
    "gpg": -ADV[:, None] / (LENGTHS * 4),
}
COMMON = {"max_completion_length": 4, "has_signal": torch.tensor([True, True]), "group_size": 2}


def _logp() -> torch.Tensor:
    return torch.tensor(LOGP, requires_grad=True)


def test_every_loss_type_is_tested() -> None:
    assert set(LOSS_AGGREGATIONS) == set(EXPECTED)


@pytest.mark.parametrize("loss_type", sorted(EXPECTED))
def test_loss_value_and_gradient_by_hand(loss_type: str) -> None:
    logp = _logp()
    out = grpo_loss(loss_type, logp, ADV, MASK, **COMMON)
    torch.testing.assert_close(out.loss, torch.tensor(EXPECTED[loss_type]))
    out.loss.backward()
    torch.testing.assert_close(logp.grad, EXPECTED_GRAD[loss_type] * MASK)
    assert out.metrics["kl"] == 0.0
    assert out.metrics["clip_ratio/region_mean"] == 0.0
    assert ("alpha" in out.metrics) == (loss_type == "gpg")


@pytest.mark.parametrize("loss_type", sorted(EXPECTED))
def test_kl_term_adds_beta_times_k3(loss_type: str) -> None:
    # ref = logp + ln 2 on every live token: k3 = 2 - ln 2 - 1 = 1 - ln 2 per token.
    # With 9 live tokens of 4 x 4 slots, dr_grpo averages it over 16 slots: * 9/16.
    k = 1 - math.log(2)
    logp = _logp()
    ref = logp.detach() + math.log(2)
    ref[1, 2] = float("-inf")  # padding in the reference must not leak either
    out = grpo_loss(loss_type, logp, ADV, MASK, ref_logp=ref, beta=0.1, **COMMON)
    share = 9 / 16 if loss_type == "dr_grpo" else 1.0
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


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo", "gpg"])
def test_chunked_loss_equals_full_batch_loss(loss_type: str) -> None:
    """Chunk-by-chunk forward/backward (the memory knob) optimises exactly the full-batch objective."""
    from anatomy_lightning.grpo.loss import chunk_weight, group_advantages, grpo_loss

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
