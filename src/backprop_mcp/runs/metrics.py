"""Metric histories as answers (`RunControl.metrics`, the get_metrics tool, `backprop metrics`):
each run's joined curve per metric (see `history`), downsampled to a few points that keep the
first, the last and the best, with numbers rounded so that an agent pays few bytes for them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from backprop_mcp.core.answers import MetricsAnswer, RunMetrics, Series
from backprop_mcp.core.errors import UsageError
from backprop_mcp.core.records import ACTIVE_STATES, RunRecord
from backprop_mcp.core.store import Store
from backprop_mcp.runs import history
from backprop_mcp.runs.compare import lower_is_better, metric_of, read_runs, some_names

# Runs per call: each costs a few files to read, and the answer grows with them.
MAX_METRIC_RUNS = 20
# Metric names per call, for the same reason.
MAX_ASKED_METRICS = 16
DEFAULT_POINTS = 50
# Without names asked for: the loss and the run's first other metrics, this many in all, so the
# default answer for a few runs stays a few KB.
DEFAULT_METRICS = 3
# Values are rounded to this many significant digits: enough to rank and to draw, and each number
# costs an agent about 8 bytes instead of 20.
SIGNIFICANT_DIGITS = 5


def run_metrics(
    get: Callable[[str], RunRecord],
    store: Store,
    run_ids: Sequence[str],
    *,
    metrics: Sequence[str] | None = None,
    points: int = DEFAULT_POINTS,
) -> MetricsAnswer:
    """The metric histories of `run_ids` (read with `get`, the reader that marks a dead run lost)."""
    if isinstance(run_ids, str) or not run_ids:
        raise UsageError("give a list of 1 or more run ids")
    if len(run_ids) > MAX_METRIC_RUNS:
        raise UsageError(f"ask for the metrics of at most {MAX_METRIC_RUNS} runs at once, got {len(run_ids)}")
    asked = check_names(metrics)
    if isinstance(points, bool) or not isinstance(points, int) or not 1 <= points <= history.MAX_POINTS:
        raise UsageError(f"points must be a whole number from 1 to {history.MAX_POINTS}, got {points!r}")
    return MetricsAnswer(runs=[_run(store, record, asked, points) for record in read_runs(get, run_ids)])


def check_names(metrics: Sequence[str] | None) -> list[str] | None:
    """The metric names asked for, checked, without repeats; None when none were (the default)."""
    if metrics is None or (not isinstance(metrics, str) and len(metrics) == 0):
        return None
    if isinstance(metrics, str):
        raise UsageError('metrics must be a list of metric names, e.g. ["loss", "val_acc"]')
    from backprop_mcp.runs.events import MAX_METRIC_NAME_CHARS  # only when names are asked for

    if len(metrics) > MAX_ASKED_METRICS:
        raise UsageError(f"ask for at most {MAX_ASKED_METRICS} metrics at once, got {len(metrics)}")
    for name in metrics:
        if not isinstance(name, str) or not 0 < len(name) <= MAX_METRIC_NAME_CHARS:
            raise UsageError(
                f"a metric name must be a string of 1 to {MAX_METRIC_NAME_CHARS} characters, got {name!r}"
            )
    return list(dict.fromkeys(metrics))


def _run(store: Store, record: RunRecord, asked: list[str] | None, points: int) -> RunMetrics:
    stored = history.load(store, record)
    if not stored.attempts:
        return _fallback(record, asked, stored.problems)
    names = stored.names()
    found: dict[str, Series] = {}
    missing: list[str] = []
    for name in asked if asked is not None else names[:DEFAULT_METRICS]:
        curve = stored.series(name)
        if curve:
            found[name] = summarise(name, curve, points, stored.reported(name))
        else:
            missing.append(name)
    answer = RunMetrics(
        run_id=record["run_id"], metrics=found, joins=[_step(x) for x in stored.joins()], missing=missing
    )
    if missing:
        answer["available"] = some_names(names)
    notes = list(stored.problems)
    if stored.restarted is not None:
        notes.append(
            f"attempt {stored.restarted} started from scratch; the attempts before it are not on the curve"
        )
    if not names:  # else an answer of the run id alone, which explains nothing
        live = record["status"] in ACTIVE_STATES
        notes.append(
            "the script reported no metrics" + (" yet" if live else " (no progress or metric lines)")
        )
    if stored.values_dropped():
        notes.append(
            f"{stored.values_dropped()} value(s) of metrics past the first {history.MAX_NAMES} names "
            "were not kept"
        )
    if notes:
        answer["note"] = "; ".join(notes)
    return answer


def _fallback(record: RunRecord, asked: list[str] | None, problems: list[str]) -> RunMetrics:
    """A run without a readable history: its record's last values, each as a one-point series."""
    reported = (["loss"] if record["loss"] is not None else []) + [
        m for m in record["metrics"] if m != "loss"
    ]
    step = record["step"] or 0
    found: dict[str, Series] = {}
    missing: list[str] = []
    for name in asked if asked is not None else reported[:DEFAULT_METRICS]:
        value = metric_of(dict(record), name)
        if value is None:
            missing.append(name)
        else:
            found[name] = summarise(name, [(step, value)], 1, 1)
    if problems:
        why = "; ".join(problems)
    elif record["status"] in ACTIVE_STATES:
        why = "no metric history written yet (the run has just started)"
    else:
        why = "no metric history was recorded (the run predates it)"
    answer = RunMetrics(
        run_id=record["run_id"],
        metrics=found,
        joins=[],
        missing=missing,
        note=f"{why}: only the last values are shown, as last and best",
    )
    if missing:
        answer["available"] = some_names(reported)
    return answer


def summarise(name: str, curve: list[tuple[float, float]], points: int, reported: int) -> Series:
    """A curve (step ascending, not empty) as a Series of at most `points` points."""
    lower = lower_is_better(name)
    values = [value for _, value in curve]
    best = values.index(min(values) if lower else max(values))
    shown = downsample(len(curve), points, best)
    return Series(
        steps=[_step(curve[i][0]) for i in shown],
        values=[_round(values[i]) for i in shown],
        last=_round(values[-1]),
        last_step=_step(curve[-1][0]),
        best=_round(values[best]),
        best_step=_step(curve[best][0]),
        lower_is_better=lower,
        reported=reported,
    )


def downsample(n: int, points: int, best: int) -> list[int]:
    """At most `points` indices of 0..n-1, ascending, evenly spread, always keeping the last, the
    best and the first (in that order of need when `points` is smaller than three)."""
    if n <= points:
        return list(range(n))
    protected = list(dict.fromkeys([n - 1, best, 0]))[:points]
    chosen = set(protected)
    if points > len(protected):
        even = {round(j * (n - 1) / (points - 1)) for j in range(points)}
        # Those farthest from the protected points first: the ones a protected point replaces go.
        for index in sorted(even, key=lambda i: min(abs(i - p) for p in protected), reverse=True):
            if len(chosen) >= points:
                break
            chosen.add(index)
    return sorted(chosen)


def _round(value: float) -> float:
    rounded = float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    # Whole numbers as integers: `3` costs an agent fewer bytes than `3.0`.
    return int(rounded) if rounded.is_integer() and abs(rounded) < 2**53 else rounded


def _step(step: float) -> float:
    # Steps are counts: whole ones are shown exactly, never rounded to a few digits.
    step = float(step)
    return int(step) if step.is_integer() else _round(step)
