"""Small statistics helpers and metric look-ups for run results.

Writing results (atomically) is `utils.atomic_io`'s job.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

__all__ = [
    "wilson_interval",
    "bootstrap_mean_interval",
    "summarize_outcomes",
    "lookup",
    "as_number",
]

Z95 = 1.959964
"""Two-sided 95% normal quantile."""


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``.

    Returns ``(low, high)`` clamped to [0, 1]; with ``n == 0`` nothing is known
    and the interval is ``(0.0, 1.0)``.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = (z / denom) * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n))
    # The exact bounds at k=0 and k=n are 0 and 1; round-off can miss them
    # (e.g. 0.9999999999999999 for 10/10), which would exclude p itself.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def bootstrap_mean_interval(
    values: Sequence[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile-bootstrap interval for the mean of ``values`` (e.g. one success rate per seed).

    Resamples the values with replacement ``resamples`` times and returns the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled means.
    Why this and not mean +- t * s / sqrt(n): a resampled mean never leaves
    ``[min(values), max(values)]``, so the interval of rates stays inside [0, 1]
    by construction, with no clipping. With few values it is narrower than the
    t interval (it cannot reach past the extreme seeds), which a caption should say.
    The stream is seeded, so the same values always give the same interval.
    Returns None for fewer than two values (no spread to resample).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    data = [float(v) for v in values]
    n = len(data)
    if n < 2:
        return None
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(data, k=n)) / n for _ in range(resamples))

    def quantile(q: float) -> float:  # linear interpolation between order statistics (numpy's default)
        position = q * (resamples - 1)
        below = math.floor(position)
        above = min(below + 1, resamples - 1)
        return means[below] + (means[above] - means[below]) * (position - below)

    # Round-off in a resampled mean can step past the extreme value (3 x 0.1 / 3 > 0.1): keep the promise.
    lowest, highest = min(data), max(data)
    low, high = quantile((1.0 - level) / 2.0), quantile((1.0 + level) / 2.0)
    return min(max(low, lowest), highest), min(max(high, lowest), highest)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values)) / len(values) if values else 0.0


def summarize_outcomes(
    successes: Sequence[bool] | Sequence[int],
    turns: Sequence[int],
    returns: Sequence[float],
) -> dict[str, Any]:
    """Summarize evaluation episodes.

    ``successes[i]`` is truthy when episode i reached the goal, ``turns[i]`` its
    number of agent turns and ``returns[i]`` its return. The three sequences
    must be equally long. Returns ``success_rate``, ``ci95`` (Wilson, as a
    2-element list), ``mean_turns``, ``mean_return`` and ``episodes``; means of
    zero episodes are 0.0.
    """
    n = len(successes)
    if len(turns) != n or len(returns) != n:
        raise ValueError(f"length mismatch: {n} successes, {len(turns)} turns, {len(returns)} returns")
    k = sum(1 for s in successes if s)
    low, high = wilson_interval(k, n)
    return {
        "success_rate": k / n if n else 0.0,
        "ci95": [low, high],
        "mean_turns": _mean(turns),
        "mean_return": _mean(returns),
        "episodes": n,
    }


def lookup(record: dict | None, key: str) -> Any:
    """``record[key]``, where a dotted key (``"critic.val_auroc"``) walks nested dicts.

    Returns None when any part is missing.
    """
    value: Any = record
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def as_number(value: Any) -> float | None:
    """``value`` as a float (numpy / torch scalars included), or None if missing or NaN."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number
