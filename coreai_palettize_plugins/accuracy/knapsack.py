"""Exact multiple-choice knapsack: one option per item, least total error within a bit budget.

Why exact (dynamic programming) and not greedy: the greedy marginal error-per-bit rule is only
optimal when each item's error is convex in its cost, and k-means errors over {2, 3, 4, 6, 8} bits
with grouped/per-tensor LUT overheads often are not (a 6-bit LUT of 64 entries per group can cost
more than it saves on a small layer). The DP over cost buckets is exact for the bucketed costs,
costs O(items x options x buckets) vectorized numpy work (milliseconds for hundreds of layers),
and rounds every cost *up* to its bucket, so the exact total never exceeds the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["MAX_BUCKETS", "solve"]

MAX_BUCKETS = 200_000
"""Upper bound on the DP's capacity (bucket count); sets the bucket size for big models."""


def solve(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int, *,
          unit: int | None = None) -> list[int] | None:
    """The option index per item minimizing ``sum(errors[i][c_i])`` subject to
    ``sum(costs[i][c_i]) <= budget``; None if even the cheapest options exceed it.

    ``unit``: the bucket size in cost units (default: the smallest that keeps the capacity under
    ``MAX_BUCKETS``). With ``unit=1`` the answer is exactly optimal; otherwise it is optimal
    for the costs rounded up to whole buckets (never over ``budget``). Ties go to the earlier
    option, so list options cheapest first to prefer smaller models at equal error.
    """
    if len(costs) != len(errors) or any(len(c) != len(e) or not c for c, e in zip(costs, errors)):
        raise ValueError("costs and errors need the same non-empty option lists per item")
    if not all(math.isfinite(float(e)) for item in errors for e in item):
        raise ValueError("every error must be finite (a NaN would make every allocation look "
                         "infeasible)")
    if budget < 0:
        return None
    if unit is None:
        unit = max(1, math.ceil(budget / MAX_BUCKETS))
    capacity = budget // unit
    dp = np.zeros(capacity + 1, dtype=np.float64)  # least error with at most s buckets
    picks = np.empty((len(costs), capacity + 1), dtype=np.int16)
    for i, (item_costs, item_errors) in enumerate(zip(costs, errors)):
        new = np.full(capacity + 1, np.inf)
        pick = np.full(capacity + 1, -1, dtype=np.int16)
        for c, (cost, error) in enumerate(zip(item_costs, item_errors)):
            w = -(-int(cost) // unit)  # ceil: never over the budget
            if w > capacity:
                continue
            candidate = dp[: capacity + 1 - w] + float(error)
            better = candidate < new[w:]
            new[w:][better] = candidate[better]
            pick[w:][better] = c
        dp, picks[i] = new, pick
    if not np.isfinite(dp[capacity]):
        return None
    chosen = [0] * len(costs)
    s = capacity
    for i in range(len(costs) - 1, -1, -1):
        c = int(picks[i, s])
        chosen[i] = c
        s -= -(-int(costs[i][c]) // unit)
    return chosen
