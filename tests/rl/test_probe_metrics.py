"""Hand-checked tests for iterppo_lightning.rl.probe_metrics (the critic probe's metrics).

Every expected value below is worked out by hand in a comment, not produced by calling the function under test.
"""

from __future__ import annotations

import math

import pytest

from iterppo_lightning.rl.probe_metrics import (
    corr_ceiling,
    decision,
    errors,
    mean,
    pairwise_accuracy,
    pearson,
    spread_ratio,
    standard_error,
    state_correlations,
    std,
    within_state_corr,
    within_state_error,
)


def test_mean_std_and_standard_error() -> None:
    # mean (0+1+1+0)/4 = 0.5; population variance 4 * 0.25 / 4 = 0.25 -> std 0.5
    assert mean([0, 1, 1, 0]) == 0.5
    assert std([0, 1, 1, 0]) == 0.5
    # sample variance 1 / 3; standard error sqrt(1/3 / 4) = sqrt(1/12) = 0.288675...
    assert standard_error([0, 1, 1, 0]) == pytest.approx(0.2886751346)
    assert math.isnan(mean([])) and math.isnan(std([])) and math.isnan(standard_error([1.0]))


def test_pearson_by_hand() -> None:
    # x = 1, 2, 3 (mean 2): dx = -1, 0, 1.  y = 2, 4, 7 (mean 13/3): dy = -7/3, -1/3, 8/3.
    # sum dx dy = 7/3 + 8/3 = 5; sum dx^2 = 2; sum dy^2 = (49 + 1 + 64) / 9 = 114/9
    # r = 5 / sqrt(2 * 114/9) = 15 / sqrt(228) = 0.993399...
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(15 / math.sqrt(228))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))  # no spread in x
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])


def test_within_state_corr_skips_flat_truth_and_counts_flat_q_as_zero() -> None:
    groups = [
        ([1, 2, 3], [2, 4, 7]),  # r = 15 / sqrt(228) (above)
        ([0.5, 0.5], [0.0, 1.0]),  # Q cannot tell the replies apart: 0
        ([0.1, 0.9], [0.3, 0.3]),  # the truth has no spread: skipped
        ([0.2], [1.0]),  # one reply: skipped
    ]
    corr, states = within_state_corr(groups)
    assert states == 2
    assert corr == pytest.approx((15 / math.sqrt(228) + 0.0) / 2)
    assert state_correlations(groups) == pytest.approx([15 / math.sqrt(228), 0.0])
    assert math.isnan(within_state_corr([])[0]) and within_state_corr([])[1] == 0


def test_pairwise_accuracy_by_hand() -> None:
    groups = [
        # pairs (0,1): dV -1.0 > 0.1, dQ -0.4 -> right; (0,2): |dV| 0.05 -> not counted; (1,2): dV 0.95, dQ 0.2 -> right
        ([0.1, 0.5, 0.3], [0.0, 1.0, 0.05]),
        # one pair, dV -1.0, Q tied -> half
        ([0.2, 0.2], [0.0, 1.0]),
        # one pair, dV 0.5, dQ -0.1 -> wrong
        ([0.3, 0.4], [0.6, 0.1]),
    ]
    acc, pairs = pairwise_accuracy(groups, threshold=0.1)
    # (1 + 1 + 0.5 + 0) / 4
    assert pairs == 4
    assert acc == pytest.approx(2.5 / 4)
    acc, pairs = pairwise_accuracy(groups, threshold=0.99)  # only |dV| > 0.99: the two pairs with |dV| = 1.0
    assert pairs == 2 and acc == pytest.approx((1 + 0.5) / 2)
    assert math.isnan(pairwise_accuracy([([0.1, 0.2], [0.5, 0.5])], 0.1)[0])


def test_spread_ratio_by_hand() -> None:
    # state 1: std Q [0, 1] = 0.5, std V [0, 2] = 1; state 2: std Q [1, 1] = 0, std V [1, 3] = 1
    # mean Q spread 0.25, mean V spread 1 -> ratio 0.25; a one-reply state is left out
    ratio, q_spread, v_spread = spread_ratio([([0, 1], [0, 2]), ([1, 1], [1, 3]), ([5], [9])])
    assert (ratio, q_spread, v_spread) == pytest.approx((0.25, 0.25, 1.0))
    assert spread_ratio([([0.2, 0.4], [0.2, 0.4])])[0] == pytest.approx(1.0)  # Q = V
    assert spread_ratio([([0.5, 0.5], [0.0, 1.0])])[0] == 0.0  # a constant critic
    assert math.isnan(spread_ratio([([0.1, 0.2], [0.3, 0.3])])[0])  # no true spread to compare with


def test_errors_by_hand() -> None:
    # Q - V: 0.5 - 0.25 = 0.25, 0.2 - 0.4 = -0.2, 0.1 - 0.1 = 0 -> bias 0.05 / 3, mae 0.45 / 3
    bias, mae = errors([([0.5, 0.2], [0.25, 0.4]), ([0.1], [0.1])])
    assert bias == pytest.approx(0.05 / 3)
    assert mae == pytest.approx(0.45 / 3)


def test_within_state_error_ignores_offsets() -> None:
    # state 1: Q - V = 0.25, -0.2 -> mean 0.025, std 0.225; state 2: Q - V = 0.2, 0.2, 0.2 (an offset) -> std 0
    # mean over the two states 0.1125; a one-reply state is left out
    groups = [([0.5, 0.2], [0.25, 0.4]), ([0.3, 0.5, 0.7], [0.1, 0.3, 0.5]), ([0.9], [0.0])]
    assert within_state_error(groups) == pytest.approx(0.1125)


def test_corr_ceiling_by_hand() -> None:
    # halves agree r = 0.5: reliability 2 * 0.5 / 1.5 = 2/3, ceiling sqrt(2/3) = 0.816...; r = 1: 1
    assert corr_ceiling(0.5) == pytest.approx(math.sqrt(2 / 3))
    assert corr_ceiling(1.0) == pytest.approx(1.0)
    assert math.isnan(corr_ceiling(0.0)) and math.isnan(corr_ceiling(-0.3)) and math.isnan(corr_ceiling(float("nan")))


def test_decision_by_hand() -> None:
    pairs = [
        (0.3, 0.2, 0.9, 0.5),  # dQ +0.1, dV +0.4: decided, agrees
        (0.25, 0.3, 1.0, 0.4),  # dQ -0.05, dV +0.6: decided, disagrees
        (0.4, 0.4, 0.5, 0.45),  # dV +0.05 <= 0.1: not decided
    ]
    d = decision(pairs, threshold=0.1)
    assert d["states"] == 3 and d["decided"] == 2
    assert d["sign_agree"] == pytest.approx(0.5)
    assert d["q_a"] == pytest.approx(0.95 / 3) and d["q_b"] == pytest.approx(0.9 / 3)
    assert d["true_a"] == pytest.approx(2.4 / 3) and d["true_b"] == pytest.approx(1.35 / 3)
    assert d["q_diff"] == pytest.approx((0.1 - 0.05 + 0.0) / 3)
    assert d["true_diff"] == pytest.approx((0.4 + 0.6 + 0.05) / 3)
    tie = decision([(0.3, 0.3, 1.0, 0.0)], threshold=0.1)
    assert tie["sign_agree"] == 0.5
    empty = decision([], threshold=0.1)
    assert empty["states"] == 0 and math.isnan(empty["sign_agree"]) and math.isnan(empty["q_diff"])
