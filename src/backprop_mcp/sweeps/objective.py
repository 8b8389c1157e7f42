"""Scoring trials and summing up a sweep: a trial's objective from its run (the metric's final
value, or its best over the run from the metric history), which trials count, the best trial, the
spread, and for each parameter how it related to the objective (its best value; Spearman's rank
correlation for numbers, in the standard library). Pure functions over records and series."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import NamedTuple

from backprop_mcp.core.records import ACTIVE_STATES, RunRecord
from backprop_mcp.core.store import Store
from backprop_mcp.runs import history
from backprop_mcp.sweeps.shapes import Best, ParamSummary, Spread, Trial
from backprop_mcp.sweeps.space import Dimension, format_value

MODES = ("min", "max")
OBJECTIVES = ("final", "best")
# States whose trial is scored by what it reached but did not run to its end: resumable.
UNFINISHED_STATES = frozenset({"timed_out", "stopped"})
# States whose trial is reported, never scored: the value it left is not a result.
UNSCORED_STATES = frozenset({"failed", "lost", "rejected"})
# A parameter with more listed values than this gets no per-value table (answers stay small).
MAX_BY_VALUE = 10

Series = Callable[[RunRecord, str], list[tuple[float, float]]]
"""A run's metric history: (step, value) points, all attempts joined, step ascending."""


def read_series(store: Store, record: RunRecord, metric: str) -> list[tuple[float, float]]:
    """The run's metric history (see `runs.history.series`)."""
    return history.series(store, record, metric)


def with_latest(
    points: list[tuple[float, float]], record: RunRecord, metric: str
) -> list[tuple[float, float]]:
    """`points` (the run's history) and, when the record is ahead of it, the record's latest value
    at the record's step: a supervisor rewrites the history every few seconds but the record every
    second, so a live trial is judged by what it reached, not by what was last written."""
    value, step = latest_value(record, metric), record["step"]
    if value is None or step is None or (points and points[-1][0] >= step):
        return points
    return [*points, (float(step), value)]


class Score(NamedTuple):
    objective: float | None
    unfinished: bool


def latest_value(record: RunRecord, metric: str) -> float | None:
    """The metric's latest value in the record (`loss` is the record's own field)."""
    if metric == "loss":
        return record["loss"]
    return record["metrics"].get(metric)


def score(record: RunRecord, metric: str, mode: str, objective: str, series: Series) -> Score:
    """The trial's objective: None for a failed trial and while nothing was reported."""
    status = record["status"]
    if status in UNSCORED_STATES:
        return Score(None, False)
    value = latest_value(record, metric)
    if objective == "best":
        points = [v for _, v in series(record, metric)] + ([value] if value is not None else [])
        value = (min(points) if mode == "min" else max(points)) if points else None
    unfinished = status in UNFINISHED_STATES and record["termination_reason"] != "pruned"
    return Score(value, unfinished and value is not None)


def scored(trials: Sequence[Trial]) -> list[Trial]:
    """Trials that ended with a score (a live trial's value is progress, not a result)."""
    return [t for t in trials if t["objective"] is not None and t["status"] not in ACTIVE_STATES]


def signed_key(value: float | None, mode: str) -> float:
    """A sort key that puts the best objective first (None last)."""
    if value is None:
        return math.inf
    return value if mode == "min" else -value


def better(a: float, b: float, mode: str) -> bool:
    return a < b if mode == "min" else a > b


def best_trial(trials: Sequence[Trial], mode: str) -> Best | None:
    best: tuple[Trial, float] | None = None
    for trial in scored(trials):
        value = trial["objective"]
        if value is not None and (best is None or better(value, best[1], mode)):
            best = (trial, value)
    if best is None:
        return None
    trial, value = best
    return Best(
        run_id=trial["run_id"],
        number=trial["number"],
        params=trial["params"],
        objective=value,
        status=trial["status"],
    )


def spread(trials: Sequence[Trial]) -> Spread | None:
    values = [t["objective"] for t in scored(trials) if t["objective"] is not None]
    if not values:
        return None
    return Spread(
        min=short(min(values)),
        median=short(statistics.median(values)),
        max=short(max(values)),
        scored=len(values),
    )


def param_summary(
    space: list[Dimension], trials: Sequence[Trial], best: Best | None, mode: str
) -> dict[str, ParamSummary]:
    if best is None:
        return {}
    done = [t for t in scored(trials) if t["objective"] is not None]
    out: dict[str, ParamSummary] = {}
    for dim in space:
        summary = ParamSummary(best=best["params"][dim.name])
        pairs = [(t["params"].get(dim.name), t["objective"]) for t in done]
        numbers = [
            (float(p), o)
            for p, o in pairs
            if isinstance(p, int | float) and not isinstance(p, bool) and o is not None
        ]
        if dim.numeric and len(numbers) >= 3:
            rho = spearman([p for p, _ in numbers], [o for _, o in numbers])
            if rho is not None:
                summary["rho"] = round(rho, 3)
        if dim.discrete and len(dim.values) <= MAX_BY_VALUE:
            by_value: dict[str, float] = {}
            for value, objective in pairs:
                if value is None or objective is None:
                    continue
                key = format_value(value)
                if key not in by_value or better(objective, by_value[key], mode):
                    by_value[key] = short(objective)
            summary["by_value"] = by_value
        out[dim.name] = summary
    return out


def ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation; None when either side is constant or fewer than 2 pairs."""
    if len(xs) != len(ys) or len(xs) < 2:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / math.sqrt(vx * vy)


def short(value: float) -> float:
    """A number for an answer: 6 significant digits."""
    return float(f"{value:.6g}")
