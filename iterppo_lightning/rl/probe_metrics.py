"""The critic probe's metrics as pure functions: how Q_k ranks the replies at one state, against their true values.

A *group* is one state: the critic's Q and the true value V (a Monte Carlo mean) of each candidate reply
there, in the same order. Theorem 2's eps_Q bounds |Q_k(s, a) - Q^pi_k(s, a)| at the replies PPO compares
at a state, so these metrics look inside states. AUROC looks across them instead: it asks whether good
states score above bad ones, and a critic that ranks every state well can still get the order of the
replies at each state wrong. docs/critic.md says what each number means.

Every function returns NaN (and a count of 0) when nothing qualifies, never raises on an empty input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Group = tuple[Sequence[float], Sequence[float]]
"""(Q, V) of one state's candidate replies, in the same order."""

ZERO_SPREAD = 1e-12
"""A state whose values all lie within this of each other has no spread to rank."""


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if len(values) else float("nan")


def std(values: Sequence[float]) -> float:
    """Population standard deviation (divides by n); NaN for no values."""
    if not len(values):
        return float("nan")
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def standard_error(samples: Sequence[float]) -> float:
    """Standard error of the mean of i.i.d. samples: sample std (n - 1) / sqrt(n); NaN below 2 samples."""
    n = len(samples)
    if n < 2:
        return float("nan")
    m = mean(samples)
    return math.sqrt(sum((s - m) ** 2 for s in samples) / (n - 1) / n)


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side has (numerically) no spread."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} x values for {len(ys)} y values")
    sx, sy = std(xs), std(ys)
    if not len(xs) or sx <= ZERO_SPREAD or sy <= ZERO_SPREAD:
        return float("nan")
    mx, my = mean(xs), mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (len(xs) * sx * sy)


def state_correlations(groups: Sequence[Group]) -> list[float]:
    """corr(Q, V) across each state's candidates, for the states `within_state_corr` counts.

    States whose true values have no spread are skipped (there is nothing to rank). A state where Q has no
    spread but V has counts as 0: a critic that cannot tell the replies apart has no ranking information.
    """
    corrs = []
    for q, v in groups:
        if len(v) < 2 or std(v) <= ZERO_SPREAD:
            continue
        corrs.append(0.0 if std(q) <= ZERO_SPREAD else pearson(q, v))
    return corrs


def within_state_corr(groups: Sequence[Group]) -> tuple[float, int]:
    """Mean over states of corr(Q, V) across the state's candidates (`state_correlations`), and how many
    states counted."""
    corrs = state_correlations(groups)
    return mean(corrs), len(corrs)


def pairwise_accuracy(groups: Sequence[Group], threshold: float) -> tuple[float, int]:
    """Over pairs of replies at one state whose true values differ by more than `threshold`: the share Q orders
    the same way (a tie in Q counts half), and how many pairs counted."""
    score, pairs = 0.0, 0
    for q, v in groups:
        for a in range(len(v)):
            for b in range(a + 1, len(v)):
                dv = v[a] - v[b]
                if abs(dv) <= threshold:
                    continue
                pairs += 1
                dq = q[a] - q[b]
                score += 0.5 if dq == 0 else float((dq > 0) == (dv > 0))
    return (score / pairs if pairs else float("nan")), pairs


def spread_ratio(groups: Sequence[Group]) -> tuple[float, float, float]:
    """(mean within-state std of Q / that of V, the Q spread, the V spread), over states with >= 2 replies.

    1 = Q separates the replies as much as their true values differ; below 1 it is too flat, 0 is a constant.
    """
    used = [(q, v) for q, v in groups if len(v) >= 2]
    q_spread = mean([std(q) for q, _ in used])
    v_spread = mean([std(v) for _, v in used])
    ratio = q_spread / v_spread if used and v_spread > ZERO_SPREAD else float("nan")
    return ratio, q_spread, v_spread


def within_state_error(groups: Sequence[Group]) -> float:
    """Mean over states (with >= 2 replies) of the std of Q - V across the state's replies.

    The part of Q's error that can reorder the replies at a state: an error shared by every reply at a state
    (an offset) gives 0 here, and it cancels out of policy improvement (docs/critic.md).
    """
    return mean([std([qi - vi for qi, vi in zip(q, v)]) for q, v in groups if len(v) >= 2])


def corr_ceiling(split_half_corr: float) -> float:
    """About the within-state correlation a perfect critic would score against a noisy truth: sqrt of the
    truth's reliability, the Spearman-Brown step-up 2r / (1 + r) of the correlation r between two halves of
    its continuations. NaN when r <= 0 (the truth is mostly noise)."""
    if not split_half_corr > 0:
        return float("nan")
    return math.sqrt(2 * split_half_corr / (1 + split_half_corr))


def errors(groups: Sequence[Group]) -> tuple[float, float]:
    """(bias = mean Q - V, mean absolute error |Q - V|) over every candidate of every state."""
    diffs = [qi - vi for q, v in groups for qi, vi in zip(q, v)]
    return mean(diffs), mean([abs(d) for d in diffs])


def decision(pairs: Sequence[tuple[float, float, float, float]], threshold: float) -> dict:
    """One decisive choice between reply A and reply B, at each state where it arises: (Q_A, Q_B, V_A, V_B).

    Returns the mean Q and V of each reply, the mean differences A - B, and over the states where the true
    difference exceeds `threshold`, the share where Q's difference has the same sign (a tie counts half).
    """
    decided = [(qa - qb, va - vb) for qa, qb, va, vb in pairs if abs(va - vb) > threshold]
    agree = [0.5 if dq == 0 else float((dq > 0) == (dv > 0)) for dq, dv in decided]
    return {
        "states": len(pairs),
        "q_a": mean([p[0] for p in pairs]),
        "q_b": mean([p[1] for p in pairs]),
        "true_a": mean([p[2] for p in pairs]),
        "true_b": mean([p[3] for p in pairs]),
        "q_diff": mean([p[0] - p[1] for p in pairs]),
        "true_diff": mean([p[2] - p[3] for p in pairs]),
        "sign_agree": mean(agree),
        "decided": len(decided),
    }
