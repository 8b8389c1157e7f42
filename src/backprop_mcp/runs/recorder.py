"""The recording half of the metric history (see `history`): the supervisor's `Recorder` folds every
value its script reports into a bounded `Series` per metric and writes the attempt's file.

Stdlib only, and light: the supervisor imports it at start-up, before the training script runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from backprop_mcp.core.files import atomic_write, storage_error
from backprop_mcp.runs.events import CheckpointEvent, DoneEvent, Event, MetricEvent, ProgressEvent
from backprop_mcp.runs.history import LOSS, MAX_NAMES, MAX_POINTS, SCHEMA_VERSION

if TYPE_CHECKING:
    from pathlib import Path

# The first, last, lowest and highest points may lie off the sampled stride; the sample is halved
# early enough that they always fit within MAX_POINTS.
_PROTECTED = 3
_SAMPLE_CAP = MAX_POINTS - _PROTECTED
# The parts of a plain progress line (see `events.plain_runs`) that the history needs: only these
# keys, "total" and "event" can occur in one. The loss as a character class, not the number's
# grammar (which the fast check already applied): it scans about twice as fast.
_STEP = re.compile(rb'"step"[ \t]*:[ \t]*([0-9]+)')
_LOSS = re.compile(rb'"loss"[ \t]*:[ \t]*([-+0-9.eE]+)')


class Series:
    """One metric's bounded points within one attempt, in the order they were reported."""

    __slots__ = ("count", "high", "last", "low", "seqs", "stride", "xs", "ys")

    def __init__(self) -> None:
        self.xs: list[float] = []
        self.ys: list[float] = []
        self.seqs: list[int] = []
        self.stride = 1
        self.count = 0  # points reported, kept or not
        # (seq, x, y) of the protected points off the stride.
        self.last: tuple[int, float, float] | None = None
        self.low: tuple[int, float, float] | None = None
        self.high: tuple[int, float, float] | None = None

    def add(self, x: float, y: float) -> None:
        seq = self.count
        self.count += 1
        if seq % self.stride == 0:
            self._keep(seq, x, y)
        point = (seq, x, y)
        self.last = point
        if self.low is None or y < self.low[2]:
            self.low = point
        if self.high is None or y > self.high[2]:
            self.high = point

    def add_many(self, ys: Sequence[float], x_of: Callable[[int], float]) -> None:
        """Add len(ys) points at once; `x_of(i)` gives the x of the i-th, and is called only for
        the points kept (a flood of lines costs a few C-level passes, not one call per line)."""
        n = len(ys)
        if not n:
            return
        start = self.count
        self.count += n
        i = (-start) % self.stride
        while i < n:
            self._keep(start + i, x_of(i), ys[i])
            # On to the next multiple of the stride, which that point may have doubled.
            i += self.stride - (start + i) % self.stride
        self.last = (start + n - 1, x_of(n - 1), ys[n - 1])
        low, high = min(ys), max(ys)
        if self.low is None or low < self.low[2]:
            at = ys.index(low)
            self.low = (start + at, x_of(at), low)
        if self.high is None or high > self.high[2]:
            at = ys.index(high)
            self.high = (start + at, x_of(at), high)

    def _keep(self, seq: int, x: float, y: float) -> None:
        self.xs.append(x)
        self.ys.append(y)
        self.seqs.append(seq)
        if len(self.xs) >= _SAMPLE_CAP:
            # The kept seqs are consecutive multiples of the stride: every other one is a multiple
            # of the doubled stride, and seq 0 (the first point) always stays.
            del self.xs[1::2], self.ys[1::2], self.seqs[1::2]
            self.stride *= 2

    def points(self) -> tuple[list[float], list[float]]:
        """The kept points (sample and protected ones), in the order they were reported."""
        extra = {p[0]: p for p in (self.last, self.low, self.high) if p is not None}
        for seq in self.seqs:
            extra.pop(seq, None)
        if not extra:
            return list(self.xs), list(self.ys)
        merged = sorted([*zip(self.seqs, self.xs, self.ys, strict=True), *extra.values()])
        return [p[1] for p in merged], [p[2] for p in merged]


class Recorder:
    """The history of one attempt, as its supervisor sees the events; `write` stores it."""

    def __init__(self, path: Path, run_id: str, attempt: int) -> None:
        self.path = path
        self.run_id = run_id
        self.attempt = attempt
        self.series: dict[str, Series] = {}
        self.step: int | None = None  # the last step seen (as the record's `step` is kept)
        self.steps_seen = False
        self.events = 0  # events that carried values: the x of a script that never gives steps
        self.values_dropped = 0  # values of metrics whose names came past the bound
        self.dirty = False

    def _series(self, name: str) -> Series | None:
        found = self.series.get(name)
        if found is None:
            # The loss always has its place; the other names share the rest.
            if name != LOSS and len(self.series) - (LOSS in self.series) >= MAX_NAMES - 1:
                self.values_dropped += 1
                return None
            found = self.series[name] = Series()
        return found

    def _x(self) -> float:
        return self.events if self.step is None else self.step

    def _see_step(self, step: int | None, *, progress: bool) -> None:
        # As `Progress.apply` keeps the record's step: progress sets it, the others only move it on.
        if step is not None and (progress or self.step is None or step > self.step):
            self.step = step
            self.steps_seen = True

    def _add(self, name: str, x: float, value: float) -> None:
        series = self._series(name)
        if series is not None:
            series.add(x, value)

    def observe(self, event: Event) -> None:
        """Record the values of one parsed event."""
        if isinstance(event, CheckpointEvent):
            self._see_step(event.step, progress=False)
            return
        if isinstance(event, ProgressEvent):
            self._see_step(event.step, progress=True)
            if event.loss is None and not event.metrics:
                return
            self.events += 1
            x = self._x()
            if event.loss is not None:
                self._add(LOSS, x, event.loss)
            for name, value in event.metrics.items():
                self._add(name, x, value)
        elif isinstance(event, MetricEvent):
            self._see_step(event.step, progress=False)
            self.events += 1
            self._add(event.name, self._x() if event.step is None else event.step, event.value)
        elif isinstance(event, DoneEvent):
            if not event.metrics:
                return
            self.events += 1
            x = self._x()
            for name, value in event.metrics.items():
                self._add(name, x, value)
        self.dirty = True

    def observe_plain(self, lines: list[bytes], batch: bytes | None = None) -> None:
        """Record a run of plain progress lines (`events.plain_runs`; `batch` is them joined by
        "\\n") without parsing each one: the same points as `observe` of each line's event, from
        one regular expression over the batch and one `map(float, ...)`, both in C."""
        batch = b"\n".join(lines) if batch is None else batch
        losses = _LOSS.findall(batch)
        if not losses:  # steps and totals only: nothing to record but the last step
            if b'"step"' in batch:
                self._see_step(_StepFinder(lines, self.step).at(len(lines) - 1), progress=True)
            return
        if len(losses) != len(lines):  # some lines without a loss: one by one
            for line in lines:
                step, loss = _STEP.findall(line), _LOSS.findall(line)
                event = ProgressEvent(
                    step=int(step[-1]) if step else None,  # JSON keeps the last of a repeated key
                    total=None,
                    loss=float(loss[-1]) if loss else None,
                    metrics={},
                )
                self.observe(event)
            return
        steps, counted_from = _StepFinder(lines, self.step), self.events

        def x_of(i: int) -> float:
            step = steps.at(i)
            return counted_from + i + 1 if step is None else step

        self.events += len(lines)
        series = self._series(LOSS)
        if series is not None:
            series.add_many(list(map(float, losses)), x_of)
        if b'"step"' in batch:
            self.steps_seen = True
            self.step = steps.at(len(lines) - 1)
        self.dirty = True

    def document(self) -> dict[str, Any]:
        metrics = {}
        for name, series in self.series.items():
            xs, ys = series.points()
            metrics[name] = {"reported": series.count, "steps": xs, "values": ys}
        return {
            "schema_version": SCHEMA_VERSION,
            "run_id": self.run_id,
            "attempt": self.attempt,
            "counted": not self.steps_seen,
            "values_dropped": self.values_dropped,
            "metrics": metrics,
        }

    def write(self) -> None:
        """Replace the attempt's file atomically (0600); raises StoreError (a full disk)."""
        try:
            self.path.parent.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise storage_error("create", self.path.parent, exc) from None
        data = json.dumps(self.document(), separators=(",", ":"), allow_nan=False)
        atomic_write(self.path, data.encode("utf-8"))
        self.dirty = False


class _StepFinder:
    """The step each line of a batch stands at: its own, else the nearest earlier line's, else the
    step before the batch. Asked mostly for growing indices, so a batch costs O(lines) at worst."""

    def __init__(self, lines: list[bytes], before: int | None) -> None:
        self.lines = lines
        self.before = before
        self.known = (-1, before)  # (index, its step): no step line between a lookup and its answer

    def at(self, index: int) -> int | None:
        floor, answer = self.known if index >= self.known[0] else (-1, self.before)
        for j in range(index, floor, -1):
            found = _STEP.findall(self.lines[j])
            if found:
                answer = int(found[-1])  # JSON keeps the last of a repeated key
                break
        self.known = (index, answer)
        return answer
