"""A run's live progress: folding parsed script events into its record (step, loss, metrics,
ETA, checkpoints), ignoring duplicates and resolving checkpoint paths."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.records import Checkpoint, RunRecord
from backprop_mcp.runs.events import CheckpointEvent, DoneEvent, Event, MetricEvent, ProgressEvent

# A record keeps this many checkpoints (newest last); older ones stay in events.jsonl.
MAX_CHECKPOINTS = 50
# Metrics kept per record: a script inventing a new metric name per line must not grow it forever.
MAX_METRICS = 64


def _resolve(path: str, cwd: str) -> str:
    # Normalise without following symlinks: the script's own view of the path is what it reported.
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(path)))


class Progress:
    """Applies events to a record held in memory; the supervisor decides when to write it."""

    def __init__(self, record: RunRecord) -> None:
        self.record = record
        self.rate_origin: tuple[float, int] | None = None  # (time, step) of the first progress

    def apply(self, event: Event, *, now: float | None = None) -> dict[str, object] | None:
        """Apply one event; returns a history entry worth keeping (checkpoints), else None."""
        now = time.time() if now is None else now
        record = self.record
        if isinstance(event, ProgressEvent):
            if event.step is not None:
                record["step"] = event.step
                self._update_eta(event.step, now)
            if event.total is not None:
                record["total"] = event.total
            if event.loss is not None:
                record["loss"] = event.loss
            self._merge(event.metrics)
        elif isinstance(event, MetricEvent):
            self._merge({event.name: event.value})
            if event.step is not None and (record["step"] is None or event.step > record["step"]):
                record["step"] = event.step
        elif isinstance(event, DoneEvent):
            self._merge(event.metrics)
        elif isinstance(event, CheckpointEvent):
            return self._checkpoint(event)
        return None

    def _merge(self, metrics: dict[str, float]) -> None:
        current = self.record["metrics"]
        for name, value in metrics.items():
            if name in current or len(current) < MAX_METRICS:
                current[name] = value

    def _update_eta(self, step: int, now: float) -> None:
        record = self.record
        if self.rate_origin is None or step < self.rate_origin[1]:
            self.rate_origin = (now, step)
            record["eta_seconds"] = None
            return
        t0, s0 = self.rate_origin
        total = record["total"]
        if total is None or step <= s0 or now <= t0:
            return
        rate = (step - s0) / (now - t0)
        record["eta_seconds"] = round(max(total - step, 0) / rate, 1)

    def _checkpoint(self, event: CheckpointEvent) -> dict[str, object] | None:
        record = self.record
        path = _resolve(event.path, record["cwd"])
        checkpoints = record["checkpoints"]
        for existing in checkpoints:
            if existing["path"] == path and existing["step"] == event.step:
                return None  # the same checkpoint reported twice
        # A path saved again (e.g. "latest.pt" overwritten) moves to the newest position.
        checkpoints[:] = [c for c in checkpoints if c["path"] != path]
        entry = Checkpoint(path=path, step=event.step, attempt=record["attempt"], saved_at=now_iso())
        checkpoints.append(entry)
        del checkpoints[:-MAX_CHECKPOINTS]
        record["latest_checkpoint"] = path
        if event.step is not None and (record["step"] is None or event.step > record["step"]):
            record["step"] = event.step
        return {"type": "checkpoint", **entry}


def newest_existing_checkpoint(
    record: RunRecord, usable: Callable[[Path], Path | None] | None = None
) -> str | None:
    """The newest reported checkpoint that still exists on disk. With `usable` (through MCP: where
    a path leads when it stays inside the allowed roots, else None), a checkpoint it refuses is
    skipped without being looked at."""
    for entry in reversed(record["checkpoints"]):
        where = Path(entry["path"]) if usable is None else usable(Path(entry["path"]))
        if where is not None and os.path.exists(where):
            return entry["path"]
    return None
