"""Runs side by side on one metric, ranked in the metric's direction by each run's last value or by
its best one.

The best is read from the metric history (`history`), which keeps every attempt's true lowest and
highest value whatever its length, along the curve the run's final weights went through (an
attempt resumed from a checkpoint replaces what came after it). A run recorded before the history
existed has only its last value, which then stands for its best too.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from backprop_mcp.core.answers import ComparedRun, Comparison
from backprop_mcp.core.clock import parse_iso
from backprop_mcp.core.errors import RunNotFound, UsageError
from backprop_mcp.core.records import ACTIVE_STATES, RunRecord
from backprop_mcp.core.store import Store
from backprop_mcp.runs import history

# Metrics whose names say "lower is better"; every other metric (acc, f1, bleu...) ranks higher-first.
LOWER_IS_BETTER = re.compile(r"loss|err|perplex|mse|mae|rmse|nll|wer|cer", re.I)
MAX_COMPARED = 50
RANKINGS = ("last", "best")
# Metric names an answer or an error lists ("they reported: ...") are cut to this many characters
# in all: a script may report 65 names of 200 characters, and an answer stays within 4 KB.
NAMES_CHARS = 600


def lower_is_better(metric: str) -> bool:
    """The direction of a metric, read from its name."""
    return bool(LOWER_IS_BETTER.search(metric))


def compare_runs(
    get: Callable[[str], RunRecord],
    store: Store,
    run_ids: Sequence[str],
    metric: str,
    by: Literal["last", "best"] = "last",
) -> Comparison:
    """The runs (read with `get`, the service's reader that marks a dead run lost) ranked on `metric`."""
    if isinstance(run_ids, str) or not run_ids:
        raise UsageError("give at least one run id to compare")
    if len(run_ids) > MAX_COMPARED:
        raise UsageError(f"compare at most {MAX_COMPARED} runs at once, got {len(run_ids)}")
    if by not in RANKINGS:
        raise UsageError(f"rank by one of {', '.join(RANKINGS)}, got {by!r}")
    lower = lower_is_better(metric)
    runs: list[ComparedRun] = []
    reported: dict[str, None] = {}
    for record in read_runs(get, run_ids):
        run_id = record["run_id"]
        stored = history.load(store, record)
        reported.update(dict.fromkeys(stored.names()))
        reported.update(
            dict.fromkeys((["loss"] if record["loss"] is not None else []) + list(record["metrics"]))
        )
        last = metric_of(dict(record), metric)
        curve = [value for _, value in stored.series(metric)]
        best = (min(curve) if lower else max(curve)) if curve else last
        runs.append(
            ComparedRun(
                run_id=run_id,
                name=record["name"],
                status=record["status"],
                step=record["step"],
                loss=record["loss"],
                last_value=last,
                best_value=best,
                value=best if by == "best" else last,
                ended_early=ended_early(record),
                metrics=record["metrics"],
                duration_seconds=duration(record),
            )
        )
    if metric not in reported:
        active = sum(1 for r in runs if r["status"] in ACTIVE_STATES)
        later = f" ({active} of them still active: it may come later)" if active else ""
        named = ", ".join(some_names(list(reported))) if reported else "none yet" if active else "none"
        raise UsageError(f"no run of these reported the metric {metric!r}{later}; they reported: {named}")
    ranked = sorted(runs, key=lambda r: (r["value"] is None, (r["value"] or 0.0) * (1 if lower else -1)))
    top = ranked[0]["run_id"] if ranked and ranked[0]["value"] is not None else None
    return Comparison(metric=metric, lower_is_better=lower, ranked_by=by, runs=ranked, top_run_id=top)


def read_runs(get: Callable[[str], RunRecord], run_ids: Sequence[str]) -> list[RunRecord]:
    """The records of `run_ids` (without repeats); one RunNotFound naming every id that has no run,
    so an agent fixes its list in one call, not one id per call."""
    records: list[RunRecord] = []
    missing: list[str] = []
    for run_id in dict.fromkeys(run_ids):
        try:
            records.append(get(run_id))
        except RunNotFound:
            missing.append(run_id)
    if missing:
        raise not_found(missing)
    return records


def not_found(missing: Sequence[str]) -> RunNotFound:
    """The error for run ids without a run."""
    hint = "list runs with `backprop list` (or the list_experiments tool)"
    if len(missing) == 1:
        return RunNotFound(f"no run with id {missing[0]!r}", hint=hint)
    shown = ", ".join(some_names([repr(one) for one in missing]))
    return RunNotFound(f"no run with these {len(missing)} ids: {shown}", hint=hint)


def some_names(names: Sequence[str], chars: int = NAMES_CHARS) -> list[str]:
    """`names` cut to about `chars` characters in all (each kept whole), then "...(+N more)"."""
    kept: list[str] = []
    used = 0
    for name in names:
        used += len(name) + 2
        if used > chars and kept:
            return [*kept, f"...(+{len(names) - len(kept)} more)"]
        kept.append(name)
    return kept


def ended_early(record: RunRecord) -> bool:
    """An ended run that did not complete its steps: not completed, or short of its total."""
    if record["status"] in ACTIVE_STATES:
        return False
    if record["status"] != "completed":
        return True
    total, step = record["total"], record["step"]
    return total is not None and (step is None or step < total)


def duration(record: RunRecord) -> float | None:
    """Running time summed over the attempts (a live attempt counts until now)."""
    total = 0.0
    for attempt in record["attempts"]:
        start, end = parse_iso(attempt["started_at"]), parse_iso(attempt["ended_at"])
        if start is not None:
            total += (end or time.time()) - start
    return round(total, 3) if total else None


def metric_of(entry: dict[str, Any], metric: str) -> float | None:
    """A metric's value in a record ('loss' is also a top-level field); anything but a finite
    number counts as absent."""
    if metric == "loss" and (loss := _finite(entry.get("loss"))) is not None:
        return loss
    metrics = entry.get("metrics")
    return _finite(metrics.get(metric)) if isinstance(metrics, dict) else None


def _finite(value: Any) -> float | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return number if math.isfinite(number) else None
