"""Runs side by side on one metric: each run's last reported value, ranked in the metric's direction.

Only the last value is kept per run (the record's loss and metrics; the events hold one sample per
attempt), so a comparison ranks last values and never calls one "best": a run whose loss dipped
and rose again is shown at its last loss. A true best needs a history of every value.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from backprop_mcp.core.answers import ComparedRun, Comparison
from backprop_mcp.core.clock import parse_iso
from backprop_mcp.core.errors import UsageError
from backprop_mcp.core.records import RunRecord

# Metrics whose names say "lower is better"; every other metric (acc, f1, bleu...) ranks higher-first.
LOWER_IS_BETTER = re.compile(r"loss|err|perplex|mse|mae|rmse|nll|wer|cer", re.I)
MAX_COMPARED = 50


def compare_runs(get: Callable[[str], RunRecord], run_ids: Sequence[str], metric: str) -> Comparison:
    """The runs (read with `get`, the service's reader that marks a dead run lost) ranked on `metric`."""
    if not run_ids:
        raise UsageError("give at least one run id to compare")
    if len(run_ids) > MAX_COMPARED:
        raise UsageError(f"compare at most {MAX_COMPARED} runs at once, got {len(run_ids)}")
    lower = bool(LOWER_IS_BETTER.search(metric))
    runs: list[ComparedRun] = []
    for run_id in dict.fromkeys(run_ids):
        record = get(run_id)
        runs.append(
            ComparedRun(
                run_id=run_id,
                name=record["name"],
                status=record["status"],
                step=record["step"],
                loss=record["loss"],
                last_value=metric_of(dict(record), metric),
                metrics=record["metrics"],
                duration_seconds=duration(record),
            )
        )
    ranked = sorted(
        runs, key=lambda r: (r["last_value"] is None, (r["last_value"] or 0.0) * (1 if lower else -1))
    )
    top = ranked[0]["run_id"] if ranked and ranked[0]["last_value"] is not None else None
    return Comparison(
        metric=metric, lower_is_better=lower, ranked_by="last_value", runs=ranked, top_run_id=top
    )


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
