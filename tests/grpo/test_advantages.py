"""Advantage estimators (grpo, rloo, reinforce_plus_plus) and GDPO's normalize_then_sum, against numbers
worked out by hand in the comments and against TRL 1.16's formula (its code is inline in
`GRPOTrainer._generate_and_score_completions`, not a function this test could call)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from anatomy_lightning.grpo.advantages import (
    ADVANTAGE_ESTIMATORS,
    DEFAULT_SCALE_REWARDS,
    group_advantages,
    normalize_then_sum,
    resolve_scale_rewards,
)

nan = float("nan")
EPS = 1e-4


def test_rloo_is_the_leave_one_out_baseline_and_unscored_members_are_left_out() -> None:
    # G = 4. Group 0 [1, 0, 0, 1]: r_i minus the mean of the other three: 1 - 1/3, 0 - 2/3, 0 - 2/3, 1 - 1/3.
    # Group 1 [2, 2, 2, 2]: no signal, 0. Group 2 [1, 0, NaN, 0]: three scored, 1 - 0, 0 - 1/2, -, 0 - 1/2.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 1.0, 0.0, nan, 0.0])
    out = group_advantages(rewards, 4, estimator="rloo")  # scale_rewards None: rloo's own, "none"
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0, 1.0, -0.5, 0.0, -0.5])
    torch.testing.assert_close(out.advantages, expected)
    assert out.has_signal.tolist() == [True, False, True]
    # scale_rewards "group" divides by the group's reward std, as ms-swift does (group 0: sample std 1/sqrt(3))
    grouped = group_advantages(rewards, 4, scale_rewards="group", estimator="rloo")
    torch.testing.assert_close(grouped.advantages[:4], expected[:4] / (math.sqrt(1 / 3) + EPS))


def test_reinforce_plus_plus_divides_group_centred_rewards_by_their_batch_std() -> None:
    # Group 0 [1, 0, 0, 0] - 0.25 = [.75, -.25, -.25, -.25]; group 1 [1, 1, 1, 0] - .75 = [.25, .25, .25, -.75];
    # group 2 [3, 3, 3, 3]: no signal, 0. The 12 advantages have mean 0 and squared sum
    # 2 * (.5625 + 3 * .0625) = 1.5 -> sample std sqrt(1.5 / 11). (GRPO's "batch" uses the rewards' std instead.)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 3.0, 3.0, 3.0, 3.0])
    out = group_advantages(rewards, 4, estimator="reinforce_plus_plus")  # None: reinforce_plus_plus's "batch"
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75, 0, 0, 0, 0])
    torch.testing.assert_close(out.advantages, centred / (math.sqrt(1.5 / 11) + EPS))
    grpo_batch = group_advantages(rewards, 4, scale_rewards="batch")
    assert not torch.allclose(out.advantages, grpo_batch.advantages)
    # "group": the group std of the advantages is the group std of the rewards: GRPO's advantages
    same = group_advantages(rewards, 4, scale_rewards="group", estimator="reinforce_plus_plus")
    torch.testing.assert_close(same.advantages, group_advantages(rewards, 4).advantages)
    # an unscored completion is left out of the batch std: group 0 with a NaN member is [1, 0, 0] - 1/3
    with_nan = group_advantages(torch.tensor([1.0, 0.0, 0.0, nan]), 4, estimator="reinforce_plus_plus")
    c = torch.tensor([2 / 3, -1 / 3, -1 / 3])  # sample std over three: sqrt((4/9 + 2/9) / 2) = sqrt(1/3)
    torch.testing.assert_close(with_nan.advantages, torch.cat([c / (math.sqrt(1 / 3) + EPS), torch.zeros(1)]))


@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS)
@pytest.mark.parametrize("scale", [None, "group", "batch", "none"])
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_groups_without_signal_get_exactly_zero_under_every_estimator(estimator: str, scale, aggregation: str) -> None:
    # group 0 has spread; group 1 is 0.3 three times (float noise ~1e-8); group 2 has one scored member only
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.1 + 0.2, 0.3, 0.3, nan, 0.7, nan])
    out = group_advantages(rewards, 3, scale_rewards=scale, estimator=estimator, aggregation=aggregation,
                           per_function=rewards[:, None], weights=[1.0])
    assert out.has_signal.tolist() == [True, False, False]
    assert torch.equal(out.advantages[3:], torch.zeros(6))
    assert (out.advantages[:3] != 0).sum() >= 2
    assert out.metrics()["frac_reward_zero_std"] == pytest.approx(2 / 3)


def test_estimator_defaults_follow_ms_swift() -> None:
    assert DEFAULT_SCALE_REWARDS == {"grpo": "group", "rloo": "none", "reinforce_plus_plus": "batch"}
    assert resolve_scale_rewards(None, "rloo") == "none" and resolve_scale_rewards(False, "grpo") is False
    with pytest.raises(ValueError, match="advantage_estimator='ppo'"):
        group_advantages(torch.zeros(4), 2, estimator="ppo")


def test_normalize_then_sum_by_hand() -> None:
    # G = 2, accuracy [1, 0 | 1, 1], format [1, 1 | 0, 1], weights [1, 0.5]. A column with spread [1, 0] becomes
    # +-a with a = 0.5 / (std + eps), std = sqrt(0.5); a constant column becomes 0. So the aggregate is
    # [a, -a, -a/2, a/2]: batch mean 0, sample std a * sqrt(2.5 / 3); the advantage is aggregate / (std + eps).
    acc, fmt = [1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]
    per_function = torch.tensor([acc, fmt]).T
    a = 0.5 / (math.sqrt(0.5) + EPS)
    aggregate = torch.tensor([a, -a, -a / 2, a / 2])
    torch.testing.assert_close(normalize_then_sum(per_function, [1.0, 0.5], 2), aggregate)
    total = per_function @ torch.tensor([1.0, 0.5])
    out = group_advantages(total, 2, aggregation="normalize_then_sum", per_function=per_function, weights=[1.0, 0.5])
    torch.testing.assert_close(out.advantages, aggregate / (a * math.sqrt(2.5 / 3) + EPS))
    # scale_rewards is not used there (TRL): every spelling gives the same
    for scale in ("group", "none", "batch"):
        again = group_advantages(total, 2, scale, aggregation="normalize_then_sum", per_function=per_function,
                                 weights=[1.0, 0.5])
        assert torch.equal(again.advantages, out.advantages)
    # accuracy [1, 0] with format [0, 2] at weights [1, 0.5] sums to [1, 1] (no signal), but the normalised
    # columns do not cancel: +-a - 0.5 * (+-a') with a' = 1 / (sqrt(2) + eps)
    pf = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    flat = pf @ torch.tensor([1.0, 0.5])
    assert not group_advantages(flat, 2).has_signal.item()
    gdpo = group_advantages(flat, 2, aggregation="normalize_then_sum", per_function=pf, weights=[1.0, 0.5])
    assert gdpo.has_signal.item() and gdpo.advantages[0] > 0 > gdpo.advantages[1]


def _trl_normalize_then_sum(per_function: np.ndarray, weights: np.ndarray, G: int) -> np.ndarray:
    """TRL 1.16's normalize_then_sum advantages, from its formula: per function and group, (r - nanmean) /
    (nanstd + 1e-4) (Bessel; one scored member -> NaN, dropped); weighted nansum; NaN where no function
    scored; minus the batch nanmean, over the batch nanstd + 1e-4; NaN -> 0."""
    grouped = per_function.reshape(-1, G, per_function.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: NaN, as TRL's torch.nanmean gives
        count = (~np.isnan(grouped)).sum(1, keepdims=True)
        mean = np.nanmean(grouped, 1, keepdims=True)
        std = np.sqrt(np.nansum((grouped - mean) ** 2, 1, keepdims=True) / np.where(count > 1, count - 1, np.nan))
        reward = np.nansum((grouped - mean) / (std + 1e-4) * weights, -1).reshape(-1)
        reward[np.isnan(per_function).all(1)] = np.nan
        adv = (reward - np.nanmean(reward)) / (np.nanstd(reward, ddof=1) + 1e-4)
    return np.nan_to_num(adv, nan=0.0)


def test_normalize_then_sum_matches_trl_with_unscored_rewards() -> None:
    rng = np.random.default_rng(0)
    weights = np.array([1.0, 0.5, 2.0])
    checked = 0
    for _ in range(40):
        per_function = rng.integers(0, 3, size=(12, 3)).astype(np.float64)
        per_function[rng.random((12, 3)) < 0.25] = np.nan
        total = np.where(np.isnan(per_function).all(1), np.nan, np.nansum(per_function * weights, 1))
        out = group_advantages(torch.tensor(total), 4, aggregation="normalize_then_sum",
                               per_function=torch.tensor(per_function), weights=weights.tolist())
        if not bool(out.has_signal.all()):
            continue  # TRL gives those groups -(batch mean) / std (~0 without NaN); ours are exactly 0
        checked += 1
        np.testing.assert_allclose(out.advantages.numpy(), _trl_normalize_then_sum(per_function, weights, 4),
                                   rtol=1e-6, atol=1e-7)
    assert checked >= 5
