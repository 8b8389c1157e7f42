"""Runs side by side on one metric: its latest and best values, ranked in the metric's direction."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from backprop_mcp.errors import UsageError
from backprop_mcp.models import ComparedRun, Comparison, RunRecord
from backprop_mcp.store import parse_iso

if TYPE_CHECKING:
    from backprop_mcp.service import Service

# Metrics whose names say "lower is better"; every other metric (acc, f1, bleu...) ranks higher-first.
LOWER_IS_BETTER = re.compile(r"loss|err|perplex|mse|mae|rmse|nll|wer|cer", re.I)
MAX_COMPARED = 50
# History entries read per run for the best value: samples are written at most once a second.
HISTORY_LIMIT = 5000


def compare_runs(service: Service, run_ids: Sequence[str], metric: str) -> Comparison:
    if not run_ids:
        raise UsageError("give at least one run id to compare")
    if len(run_ids) > MAX_COMPARED:
        raise UsageError(f"compare at most {MAX_COMPARED} runs at once, got {len(run_ids)}")
    lower = bool(LOWER_IS_BETTER.search(metric))
    runs: list[ComparedRun] = []
    for run_id in dict.fromkeys(run_ids):
        record = service.get(run_id)
        history = service.store.read_events(run_id, limit=HISTORY_LIMIT)
        latest = metric_of(dict(record), metric)
        values = [metric_of(e, metric) for e in history if e.get("type") == "sample"] + [latest]
        present = [v for v in values if v is not None]
        runs.append(
            ComparedRun(
                run_id=run_id,
                name=record["name"],
                status=record["status"],
                step=record["step"],
                loss=record["loss"],
                metric=latest,
                best_metric=(min(present) if lower else max(present)) if present else None,
                metrics=record["metrics"],
                duration_seconds=duration(record),
            )
        )
    ranked = sorted(
        runs, key=lambda r: (r["best_metric"] is None, (r["best_metric"] or 0.0) * (1 if lower else -1))
    )
    best_id = ranked[0]["run_id"] if ranked and ranked[0]["best_metric"] is not None else None
    return Comparison(metric=metric, lower_is_better=lower, runs=ranked, best_run_id=best_id)


def duration(record: RunRecord) -> float | None:
    """Running time summed over the attempts (a live attempt counts until now)."""
    total = 0.0
    for attempt in record["attempts"]:
        start, end = parse_iso(attempt["started_at"]), parse_iso(attempt["ended_at"])
        if start is not None:
            total += (end or time.time()) - start
    return round(total, 3) if total else None


def metric_of(entry: dict[str, Any], metric: str) -> float | None:
    """A metric's value in a record or history sample ('loss' is also a top-level field).

    History lines are read back from disk unchecked: anything but a finite number counts as absent.
    """
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
