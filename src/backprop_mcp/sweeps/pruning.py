"""Early stopping: whether a live trial is stopped, gracefully, as `pruned`, judged from the
metric history of the earlier trials (`verdict`, the one call the runner makes). Grid and random
sweeps use the median rule written here: a trial whose best value of the metric up to its latest
step is worse than the median of the earlier trials' best values up to that same step. TPE sweeps
ask Optuna's own pruner (`optuna_pruner`), fed from the same series. Pure functions of the series."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import NamedTuple

from backprop_mcp.sweeps import optuna_pruner

# The rule judges only against at least this many earlier trials that reached the step: the
# median of one or two trials is noise (Optuna's MedianPruner waits for 5 by default; sweeps
# started by agents are short, so 3).
MIN_EARLIER_TRIALS = 3
# Nor before a trial has reported this many points: its first value may be an untrained start.
MIN_POINTS = 2

Points = Sequence[tuple[float, float]]


class Earlier(NamedTuple):
    """An earlier trial as a pruner sees it: its metric history and how it stands."""

    points: Points
    status: str
    """Its run's state ("starting" and the active states while it runs)."""
    reason: str | None = None
    """Why it ended (`pruned`, ...); None while it runs."""
    objective: float | None = None


def verdict(method: str, mine: Points, earlier: Sequence[Earlier], mode: str, metric: str) -> str | None:
    """Why the trial should be pruned now (in words), or None to let it run."""
    if len(mine) < MIN_POINTS:
        return None
    if method == "tpe":
        return optuna_pruner.verdict(mine, earlier, mode, metric, min_trials=MIN_EARLIER_TRIALS)
    return median_rule(mine, [e.points for e in earlier], mode, metric)


def best_until(points: Points, step: float, mode: str) -> float | None:
    values = [v for s, v in points if s <= step]
    if not values:
        return None
    return min(values) if mode == "min" else max(values)


def median_rule(mine: Points, earlier: Sequence[Points], mode: str, metric: str) -> str | None:
    """The median rule of grid and random sweeps (see the module's docstring)."""
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
