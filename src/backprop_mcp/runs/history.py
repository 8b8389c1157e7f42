"""A run's metric history: its stored form, `runs/<run_id>/history/<attempt>.json` (written by the
supervisor's `recorder.Recorder`), and the readers that join the attempts into one curve
(`series`, `names`, `joins`, `load`), which compare, get_metrics, plots and sweep pruning use.

Stdlib only: the supervisor imports its constants at start-up, before the training script runs.

Recording. Each metric keeps at most `MAX_POINTS` points per attempt. A point is (x, value); x is
the step: the event's own step, else the last step seen in the attempt, else (a script that never
gives steps) a running count of the events that carried values. Points are sampled at a stride
that doubles whenever the sample fills up (every other one is dropped then), so each point costs
O(1) amortised; the first, the last, the lowest and the highest points are always kept, whatever
the stride (the direction of "best" is known only to the reader).

Joining. An attempt resumed from a checkpoint continues the curve: its points replace those of
the earlier attempts at steps at or after its first step, so the joined series is the curve the
final weights went through. An attempt resumed from scratch (no checkpoint) restarts the curve:
the earlier attempts' points are left out of the joined series (their files stay). An attempt
whose script never gave steps is appended after the curve so far. Attempts without a history file
(never started, or recorded before the history existed) contribute nothing.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from pathlib import Path

    from backprop_mcp.core.records import RunRecord
    from backprop_mcp.core.store import Store

SCHEMA_VERSION = 1
# Points kept per metric per attempt: enough for a smooth curve and a true best at any run length,
# while a file of every metric stays a few hundred KB at most.
MAX_POINTS = 1000
# Metric names kept per attempt: the loss and as many others as the record keeps
# (`progress.MAX_METRICS`, not imported: readers such as `status RUN_ID` need not load the event
# parser): a script inventing a new name per line must not grow the history forever. Values of
# later names are counted, not kept.
MAX_NAMES = 1 + 64
LOSS = "loss"
HISTORY_DIR = "history"


# -- reading ----------------------------------------------------------------------------------------


def history_path(store: Store, run_id: str, attempt: int) -> Path:
    return store.run_dir(run_id) / HISTORY_DIR / f"{attempt}.json"


class Attempt(NamedTuple):
    """One attempt's stored history, checked."""

    attempt: int
    counted: bool
    values_dropped: int
    metrics: dict[str, tuple[list[float], list[float], int]]  # name: (steps, values, reported)

    def first_step(self) -> float | None:
        starts = [steps[0] for steps, _, _ in self.metrics.values() if steps]
        return min(starts) if starts else None

    def last_step(self) -> float | None:
        ends = [max(steps) for steps, _, _ in self.metrics.values() if steps]
        return max(ends) if ends else None


class _Segment:
    """One attempt's place on the joined curve."""

    __slots__ = ("attempt", "offset", "start", "until")

    def __init__(self, attempt: Attempt, start: float, offset: float = 0.0) -> None:
        self.attempt = attempt
        self.start = start  # where it begins on the joined curve
        self.offset = offset  # added to its steps (an attempt that counted instead of giving steps)
        self.until = math.inf  # its points at or after this step were replaced by a later attempt

    def keeps(self, metric: str) -> bool:
        """Whether any point of `metric` in this attempt lies on the joined curve."""
        found = self.attempt.metrics.get(metric)
        return found is not None and any(x + self.offset < self.until for x in found[0])


class RunHistory:
    """A run's stored history: each attempt's file, and the attempts joined into one curve.
    (Plain classes here, not dataclasses: `status RUN_ID` reads it and must start fast.)"""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []
        self.problems: list[str] = []
        """What could not be read (a corrupt file moved aside, one of a newer schema), in words."""
        self.segments: list[_Segment] = []
        self.restarted: int | None = None
        """The attempt that last restarted from scratch, leaving the earlier ones off the curve."""

    def names(self) -> list[str]:
        """Every metric with a point on the joined curve, the loss first, then in the order first
        seen. A metric only attempts left off the curve reported (before a restart from scratch,
        or wholly replaced by a later attempt) is not one: it has no curve to show or rank."""
        seen: dict[str, None] = {}
        for segment in self.segments:
            seen.update((name, None) for name in segment.attempt.metrics if segment.keeps(name))
        names = list(seen)
        if LOSS in seen:
            names.remove(LOSS)
            names.insert(0, LOSS)
        return names

    def joins(self) -> list[float]:
        """Steps where the attempts after the first begin on the joined curve."""
        return [segment.start for segment in self.segments[1:]]

    def series(self, metric: str) -> list[tuple[float, float]]:
        """(step, value) of `metric` over the joined curve, step ascending."""
        points: list[tuple[float, float]] = []
        for segment in self.segments:
            found = segment.attempt.metrics.get(metric)
            if found is None:
                continue
            steps, values, _ = found
            shifted = (
                (x + segment.offset, y)
                for x, y in zip(steps, values, strict=True)
                if x + segment.offset < segment.until
            )
            points.extend(sorted(shifted, key=lambda p: p[0]))  # stable: a step's points keep their order
        return points

    def reported(self, metric: str) -> int:
        """Points of `metric` the script reported in all attempts, kept or not."""
        return sum(a.metrics[metric][2] for a in self.attempts if metric in a.metrics)

    def values_dropped(self) -> int:
        return sum(a.values_dropped for a in self.attempts)


def load(store: Store, record: RunRecord) -> RunHistory:
    """Read every attempt's history file and join them; never raises on a bad file (a corrupt one
    is moved aside, and each problem is said in `problems`)."""
    history = RunHistory()
    for summary in record["attempts"]:
        number = summary["attempt"]
        path = history_path(store, record["run_id"], number)
        attempt = _read(store, path, record["run_id"], number, history.problems)
        if attempt is None:
            continue
        history.attempts.append(attempt)
        from_scratch = number > 1 and summary["resume_from"] is None
        if from_scratch and history.segments and attempt.first_step() is not None:
            history.restarted = number  # the earlier attempts' points leave the curve
        _join(history.segments, attempt, from_scratch=from_scratch)
    return history


def _join(segments: list[_Segment], attempt: Attempt, *, from_scratch: bool) -> None:
    first = attempt.first_step()
    if first is None:
        return  # no points: it changes nothing
    if not segments:
        segments.append(_Segment(attempt, first))
        return
    if from_scratch:
        segments[:] = [_Segment(attempt, first)]
        return
    if attempt.counted:
        ends = [s.attempt.last_step() for s in segments]
        offset = max(
            (e + s.offset for s, e in zip(segments, ends, strict=True) if e is not None), default=0.0
        )
        segments.append(_Segment(attempt, first + offset, offset=offset))
        return
    # A later attempt replaces what the earlier ones reported from its first step on.
    kept = [s for s in segments if s.start < first]
    for segment in kept:
        segment.until = min(segment.until, first)
    segments[:] = [*kept, _Segment(attempt, first)]


def _read(store: Store, path: Path, run_id: str, number: int, problems: list[str]) -> Attempt | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        problems.append(f"the metric history of attempt {number} cannot be read: {exc.strerror or exc}")
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        data = None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        problems.append(
            f"the metric history of attempt {number} was written by a newer backprop (schema {version}); "
            "upgrade backprop-mcp to read it"
        )
        return None
    try:
        return _check(data, run_id, number)
    except ValueError as exc:
        aside = store.quarantine(path)
        problems.append(
            f"the metric history of attempt {number} was corrupt ({exc}); it was moved to {aside}"
        )
        return None


def _check(data: object, run_id: str, number: int) -> Attempt:
    """The stored document as an Attempt; ValueError says what is wrong with it."""
    if not isinstance(data, dict):
        raise ValueError("it is not a JSON object")
    if data.get("run_id") != run_id or data.get("attempt") != number:
        raise ValueError("it is not this attempt's history")
    metrics = data.get("metrics")
    if not isinstance(metrics, dict) or not isinstance(data.get("counted"), bool):
        raise ValueError('"metrics" or "counted" is missing or of the wrong type')
    dropped = data.get("values_dropped", 0)
    checked: dict[str, tuple[list[float], list[float], int]] = {}
    for name, entry in metrics.items():
        if not isinstance(entry, dict):
            raise ValueError(f"metric {name!r} is not an object")
        steps, values = _numbers(entry.get("steps")), _numbers(entry.get("values"))
        if steps is None or values is None or len(steps) != len(values):
            raise ValueError(f"metric {name!r} needs as many finite steps as values")
        reported = _count(entry.get("reported"))
        if reported is None or reported < len(values):
            raise ValueError(f"metric {name!r} has a bad count of points reported")
        checked[name] = (steps, values, reported)
    return Attempt(number, data["counted"], _count(dropped) or 0, checked)


def _numbers(value: object) -> list[float] | None:
    if not isinstance(value, list):
        return None
    out = []
    for item in value:
        if not isinstance(item, int | float) or isinstance(item, bool):
            return None
        try:
            number = float(item)
        except OverflowError:  # an integer beyond any float
            return None
        if not math.isfinite(number):
            return None
        out.append(number)
    return out


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


# -- the interface other parts use -------------------------------------------------------------------


def series(store: Store, record: RunRecord, metric: str) -> list[tuple[float, float]]:
    """(step, value) of one metric over all attempts joined (see the module's docstring), step
    ascending; empty when the run never reported it or has no readable history."""
    return load(store, record).series(metric)


def names(store: Store, record: RunRecord) -> list[str]:
    """The metrics a run reported, in any attempt, the loss first."""
    return load(store, record).names()


def joins(store: Store, record: RunRecord) -> list[float]:
    """Steps where attempts 2.. begin on the joined curve."""
    return load(store, record).joins()
