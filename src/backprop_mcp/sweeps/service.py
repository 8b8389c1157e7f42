"""The sweep use-cases both adapters call (`Sweeps`): start a sweep (checked whole before its
runner is spawned), read it (`get`, marking it `lost` when its runner is gone; `wait`), stop it,
resume it, list them. Answers are bounded in size: a few trials, the best, the spread and a line
per parameter, whatever the sweep's length."""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from backprop_mcp.backends.local import abandon, release
from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.errors import BackpropError, RunStateError, StoreError, UsageError
from backprop_mcp.core.records import ACTIVE_STATES, SweepRef
from backprop_mcp.governor import proctree
from backprop_mcp.runs.requests import RunRequest, new_run_id
from backprop_mcp.runs.service import Service
from backprop_mcp.sweeps import objective
from backprop_mcp.sweeps.answers import answer
from backprop_mcp.sweeps.entry import spawn
from backprop_mcp.sweeps.samplers import check_method, suggest
from backprop_mcp.sweeps.shapes import (
    MAX_BUDGET_MINUTES,
    MAX_PARALLEL,
    MAX_SEED,
    MAX_TRIALS,
    STARTING,
    SWEEP_SCHEMA_VERSION,
    SweepAnswer,
    SweepRecord,
    SweepRow,
    Trial,
)
from backprop_mcp.sweeps.space import grid_size, parse_space, trial_args, trial_name
from backprop_mcp.sweeps.store import SweepStore, check_sweep_id

# Without max_trials, a sweep over distributions runs this many trials (a grid runs all its points).
DEFAULT_TRIALS = 10
# A runner that is spawned writes nothing before the record naming it exists; this bounds the
# wait for one whose start is rolled back.
ABANDON_WAIT_SECONDS = 30.0
# `wait` looks at the sweep this often, and waits at most this long in one call.
WAIT_POLL_SECONDS = 0.25
MAX_WAIT_SECONDS = 3600.0
MAX_METRIC_CHARS = 200
# The longest run name `runs.service` takes; a trial's run is named after its sweep.
MAX_RUN_NAME_CHARS = 200
# A refusal to stop an ended sweep names at most this many of its still running trials.
SHOWN_RUN_IDS = 8


class SweepRequest(NamedTuple):
    """A request to start a sweep: the script, the space, the objective and the budget.

    `params` maps each name to a list of values (a grid axis) or a distribution string
    (see `space`); `options` are the run options of every trial (as in `RunRequest`).
    """

    script: str
    params: Mapping[str, object]
    metric: str
    mode: str = "min"
    method: str | None = None
    max_trials: int | None = None
    args: Sequence[str] = ()
    name: str | None = None
    sweep_id: str | None = None
    cwd: str | None = None
    python: str | None = None
    options: Mapping[str, object] | None = None
    source: str = "option"
    seed: int | None = None
    parallel: int | None = None
    budget_minutes: float | None = None
    objective: str = "final"
    prune: bool = True
    tags: Sequence[str] = ()
    """Tags and a note that every trial's notebook starts with (see `RunRequest`)."""
    note: str | None = None


def _whole(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(f"{what} must be a whole number from {low} to {high}, got {value!r}")
    return value


def _minutes(value: object) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 < float(value) <= MAX_BUDGET_MINUTES:  # type: ignore[arg-type]
        raise UsageError(
            f"the time budget must be minutes above 0 and at most {MAX_BUDGET_MINUTES:g}, got {value!r}"
        )
    return float(value)  # type: ignore[arg-type]  # checked just above


class Sweeps:
    """The sweeps of one service's store."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.store = SweepStore(service.store.home)

    # -- starting ---------------------------------------------------------------------------------

    def start(self, request: SweepRequest, *, allowed_roots: Sequence[Path] | None = None) -> SweepAnswer:
        """Check the whole sweep, spawn its runner and return at once (its first trials may not
        exist yet)."""
        space = parse_space(request.params)
        metric = request.metric
        if (
            not isinstance(metric, str)
            or not metric.strip()
            or len(metric) > MAX_METRIC_CHARS
            or "\0" in metric
        ):
            raise UsageError(
                f"metric must name a metric the script reports (e.g. val_loss or loss), got {metric!r}"
            )
        if request.mode not in objective.MODES:
            raise UsageError(
                f"mode must be min (lower is better) or max (higher is better), got {request.mode!r}"
            )
        if request.objective not in objective.OBJECTIVES:
            raise UsageError(
                "objective must be final (the last value) or best (the best over the run), "
                f"got {request.objective!r}"
            )
        size = grid_size(space)
        method = request.method or ("grid" if size is not None else "random")
        check_method(method, space)
        if request.max_trials is None:
            max_trials = size if method == "grid" and size is not None else DEFAULT_TRIALS
        else:
            max_trials = _whole(request.max_trials, "max_trials", 1, MAX_TRIALS)
        if method == "grid" and size is not None:
            max_trials = min(max_trials, size)
        seed = (
            secrets.randbelow(MAX_SEED + 1)
            if request.seed is None
            else _whole(request.seed, "seed", 0, MAX_SEED)
        )
        budget = None if request.budget_minutes is None else _minutes(request.budget_minutes)
        if any("\0" in a for a in request.args):
            raise UsageError("script arguments cannot contain NUL bytes")
        longest = trial_name(request.name, max_trials)
        if longest is not None and len(longest) > MAX_RUN_NAME_CHARS:
            raise UsageError(
                f"a sweep name must be at most {MAX_RUN_NAME_CHARS - len(longest) + len(str(request.name))} "
                f"characters here: its trials' runs are named 'NAME #N' (at most {MAX_RUN_NAME_CHARS})"
            )
        first = suggest(method, space, seed, 1, [], budget=max_trials) or {}
        sweep_id = (
            check_sweep_id(request.sweep_id)
            if request.sweep_id is not None
            else new_run_id(f"sweep {request.name or ''}")
        )
        # Every check a trial's start makes, now: a bad script, option or root fails the sweep
        # here rather than its first trial in a detached process.
        checked = self.service.check(
            RunRequest(
                script=request.script,
                args=trial_args(list(request.args), first),
                # The longest name a trial gets: a name too long for one fails here, not in every trial.
                name=trial_name(request.name, max_trials),
                run_id=f"{sweep_id}-t1",
                cwd=request.cwd,
                python=request.python,
                options=request.options,
                source=request.source,
                sweep=SweepRef(id=sweep_id, trial=1, params=first),
                tags=request.tags,
                note=request.note,
            ),
            allowed_roots=allowed_roots,
        )
        settings = self.service.settings(request.options, request.source, cwd=Path(checked["cwd"]))
        if request.parallel is None:
            parallel = max(1, min(settings.max_parallel, max_trials))
        else:
            parallel = _whole(request.parallel, "parallel", 1, MAX_PARALLEL)
        now = now_iso()
        record = SweepRecord(
            schema_version=SWEEP_SCHEMA_VERSION,
            sweep_id=sweep_id,
            name=request.name,
            status="running",
            status_detail="starting its first trials",
            script=checked["script"],
            args=list(request.args),
            cwd=checked["cwd"],
            python=checked["python"] if checked["python_source"] == "option" else None,
            options=dict(request.options or {}),
            source=request.source,
            config_file=str(self.service.config_file) if self.service.config_file else None,
            allowed_roots=[str(r) for r in allowed_roots] if allowed_roots is not None else None,
            params=dict(request.params),
            metric=metric,
            mode=request.mode,
            objective=request.objective,
            method=method,
            seed=seed,
            max_trials=max_trials,
            parallel=parallel,
            budget_minutes=budget,
            prune=bool(request.prune),
            created_at=now,
            started_at=None,
            ended_at=None,
            elapsed_seconds=0.0,
            runner_pid=None,
            runner_started=None,
            trials=[],
            updated_at=now,
        )
        if request.tags:
            record["tags"] = list(request.tags)
        if request.note is not None:
            record["note"] = request.note
        self.store.make_folder(sweep_id)
        try:
            self._launch(record)
        except BaseException:
            self.store.remove(sweep_id)
            raise
        return self.get(sweep_id)

    def _launch(self, record: SweepRecord) -> None:
        """Spawn the runner, record it, then tell it to go; all or nothing."""
        try:
            proc = spawn(self.store.home, record["sweep_id"], self.service.env)
        except OSError as exc:
            raise StoreError(f"could not start the runner of sweep {record['sweep_id']}: {exc}") from None
        try:
            record["runner_pid"], record["runner_started"] = proc.pid, proctree.start_time(proc.pid)
            self.store.write(record)
            release(proc)
        except BaseException:
            abandon(proc, ABANDON_WAIT_SECONDS)
            raise

    # -- reading ----------------------------------------------------------------------------------

    def record(self, sweep_id: str) -> SweepRecord:
        """The stored record, marked `lost` first if it claims to run but its runner is gone."""
        record = self.store.read(check_sweep_id(sweep_id))
        if record["status"] == "running" and not self._runner_alive(record):
            with self.store.lock(sweep_id):
                record = self.store.read(sweep_id)
                if record["status"] == "running" and not self._runner_alive(record):
                    record["status"] = "lost"
                    record["status_detail"] = (
                        "its runner process died; trials already started run on under their own "
                        "supervisors; resume the sweep to continue it"
                    )
                    record["ended_at"] = now_iso()
                    self.store.write(record)
        return record

    def _runner_alive(self, record: SweepRecord) -> bool:
        return proctree.is_alive(record["runner_pid"], record["runner_started"])

    def get(self, sweep_id: str, *, all_trials: bool = False) -> SweepAnswer:
        """The sweep's state and results (bounded: see `answer`)."""
        record = self.record(sweep_id)
        if record["status"] != "running":
            self._refresh_live(record)
        return answer(record, all_trials=all_trials)

    def _refresh_live(self, record: SweepRecord) -> None:
        """A sweep without a runner still has trials that run: show their runs' states now."""
        for trial in record["trials"]:
            # A "starting" trial's run may exist: its runner died before recording that it did.
            if trial["status"] in ACTIVE_STATES or trial["status"] == STARTING:
                with contextlib.suppress(BackpropError):
                    run = self.service.get(trial["run_id"])
                    trial["status"] = run["status"]
                    if run["step"] is not None:
                        trial["step"] = run["step"]

    def wait(
        self,
        sweep_id: str,
        wait_seconds: float,
        *,
        all_trials: bool = False,
        on_progress: Callable[[int, int, str], None] | None = None,
    ) -> SweepAnswer:
        """Wait (bounded) until the sweep ends; `on_progress(ended, total, line)` on each change."""
        if (
            isinstance(wait_seconds, bool)
            or not isinstance(wait_seconds, int | float)
            or not (0 <= wait_seconds <= MAX_WAIT_SECONDS)
        ):
            raise UsageError(f"wait_seconds must be from 0 to {MAX_WAIT_SECONDS:g}, got {wait_seconds!r}")
        deadline = time.monotonic() + wait_seconds
        seen: tuple[int, int] | None = None
        while True:
            record = self.record(sweep_id)
            ended = sum(
                1 for t in record["trials"] if t["status"] not in ACTIVE_STATES and t["status"] != STARTING
            )
            if on_progress is not None and (ended, len(record["trials"])) != seen:
                seen = (ended, len(record["trials"]))
                on_progress(ended, record["max_trials"], f"{ended} of {record['max_trials']} trials ended")
            if record["status"] != "running" or time.monotonic() >= deadline:
                return self.get(sweep_id, all_trials=all_trials)
            time.sleep(WAIT_POLL_SECONDS)

    def list(self, *, limit: int = 20) -> list[SweepRow]:
        """Sweeps, newest first."""
        _whole(limit, "limit", 1, 1000)
        rows: list[SweepRow] = []
        for sweep_id in self.store.ids():
            try:
                record = self.record(sweep_id)
            except BackpropError:
                continue
            best = objective.best_trial(record["trials"], record["mode"])
            rows.append(
                SweepRow(
                    sweep_id=sweep_id,
                    name=record["name"],
                    status=record["status"],
                    metric=record["metric"],
                    mode=record["mode"],
                    trials=len(record["trials"]),
                    best_objective=best["objective"] if best else None,
                    created_at=record["created_at"],
                )
            )
        rows.sort(key=lambda r: r["created_at"], reverse=True)
        return rows[:limit]

    # -- stopping and resuming ----------------------------------------------------------------------

    def stop(self, sweep_id: str) -> SweepAnswer:
        """Stop the sweep as a whole: no new trials, running ones stopped gracefully (they can
        checkpoint, and a resume continues them), queued ones never start."""
        record = self.record(sweep_id)
        if record["status"] != "running":
            self._refresh_live(record)
            live = [t["run_id"] for t in record["trials"] if t["status"] in ACTIVE_STATES]
            if live:
                # A lost sweep's trials run on under their own supervisors: say how to stop them.
                more = len(live) - SHOWN_RUN_IDS
                shown = " ".join(live[:SHOWN_RUN_IDS]) + (f" (and {more} more)" if more > 0 else "")
                raise RunStateError(
                    f"sweep {sweep_id} has already ended ({record['status']}), but {len(live)} of its "
                    f"trials still run: {shown}",
                    hint="they are ordinary runs: stop them by id (`backprop stop RUN_ID...`, MCP stop_run)",
                )
            raise RunStateError(f"sweep {sweep_id} has already ended ({record['status']}); nothing to stop")
        self.store.request_stop(sweep_id)
        if record["runner_pid"] is not None and self._runner_alive(record):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record["runner_pid"], signal.SIGTERM)
        return self.get(sweep_id)

    def resume(
        self,
        sweep_id: str,
        *,
        max_trials: int | None = None,
        budget_minutes: float | None = None,
        options: Mapping[str, object] | None = None,
        source: str = "option",
    ) -> SweepAnswer:
        """Continue an ended sweep: its unfinished trials (timed out, stopped, lost) get their
        next attempt, then new trials up to `max_trials`, within the rest of its time budget (or
        a new one)."""
        self.record(sweep_id)  # marks it lost first if its runner died
        with self.store.lock(sweep_id):
            record = self.store.read(sweep_id)
            if record["status"] == "running":
                raise RunStateError(
                    f"sweep {sweep_id} is running; only an ended sweep can be resumed",
                    hint=f"stop it first with `backprop sweep-stop {sweep_id}`",
                )
            space = parse_space(record["params"])
            if max_trials is not None:
                max_trials = _whole(max_trials, "max_trials", 1, MAX_TRIALS)
                if max_trials < len(record["trials"]):
                    raise UsageError(
                        f"sweep {sweep_id} has started {len(record['trials'])} trials; "
                        "max_trials cannot be lower"
                    )
                size = grid_size(space)
                record["max_trials"] = (
                    min(max_trials, size) if record["method"] == "grid" and size else max_trials
                )
            if budget_minutes is not None:
                record["budget_minutes"], record["elapsed_seconds"] = _minutes(budget_minutes), 0.0
            elif (
                record["budget_minutes"] is not None
                and record["elapsed_seconds"] >= record["budget_minutes"] * 60
            ):
                raise UsageError(
                    f"sweep {sweep_id} has spent its time budget of {record['budget_minutes']:g} minutes; "
                    "give a new one (--budget-minutes, budget_minutes)"
                )
            if options:
                merged = {**record["options"], **options}
                self.service.settings(merged, source, cwd=Path(record["cwd"]))  # checked now, not per trial
                record["options"], record["source"] = merged, source
            self._refresh_live(record)
            unfinished = [t for t in record["trials"] if _resumable(t)]
            for trial in unfinished:
                trial["resume"] = True
            left = len(record["trials"]) < record["max_trials"]
            active = any(t["status"] in ACTIVE_STATES or t["status"] == STARTING for t in record["trials"])
            if not (unfinished or left or active):
                size = grid_size(space)
                spent = record["method"] == "grid" and size is not None and len(record["trials"]) >= size
                raise RunStateError(
                    f"sweep {sweep_id} has nothing left to run: its {len(record['trials'])} trials ended "
                    "and none is unfinished"
                    + (f", and they were every point of its grid ({size})" if spent else ""),
                    hint=(
                        "resume its best trial's run, or start a sweep over a new grid"
                        if spent
                        else "give a larger max_trials (--trials) to run more, or resume its best trial's run"
                    ),
                )
            self.store.clear_stop(sweep_id)
            record["status"], record["ended_at"] = "running", None
            record["status_detail"] = f"resumed: {len(unfinished)} unfinished trial(s) to continue"
            self._launch(record)
        return self.get(sweep_id)


def _resumable(trial: Trial) -> bool:
    if trial["status"] == "lost":
        return True
    return trial["status"] in ("timed_out", "stopped") and trial.get("reason") != "pruned"
