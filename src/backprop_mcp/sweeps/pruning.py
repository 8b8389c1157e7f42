"""Early stopping by the median rule: a trial whose best value of the metric up to its latest
step is worse than the median of the earlier trials' best values up to that same step (each read
from the metric history) is stopped, gracefully, as `pruned`. A pure function of the series."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

# The rule judges only against at least this many earlier trials that reached the step: the
# median of one or two trials is noise (Optuna's MedianPruner waits for 5 by default; sweeps
# started by agents are short, so 3).
MIN_EARLIER_TRIALS = 3
# Nor before a trial has reported this many points: its first value may be an untrained start.
MIN_POINTS = 2

Points = Sequence[tuple[float, float]]


def best_until(points: Points, step: float, mode: str) -> float | None:
    values = [v for s, v in points if s <= step]
    if not values:
        return None
    return min(values) if mode == "min" else max(values)


def verdict(mine: Points, earlier: Sequence[Points], mode: str, metric: str) -> str | None:
    """Why the trial should be pruned now (in words), or None to let it run."""
    if len(mine) < MIN_POINTS:
        return None
    step = mine[-1][0]
    value = best_until(mine, step, mode)
    # Only trials that got at least as far count: one stopped earlier says nothing about this step.
    others = [
        b for p in earlier if p and p[-1][0] >= step for b in [best_until(p, step, mode)] if b is not None
    ]
    if value is None or len(others) < MIN_EARLIER_TRIALS:
        return None
    median = statistics.median(others)
    worse = value > median if mode == "min" else value < median
    if not worse:
        return None
    return (
        f"pruned at step {step:g}: best {metric} {value:.4g} so far is worse than the median "
        f"{median:.4g} of {len(others)} earlier trials at that step"
    )
