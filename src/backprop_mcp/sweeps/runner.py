"""The sweep runner: a detached process per sweep (`python -m backprop_mcp.sweeps HOME SWEEP_ID
--await-go`) that asks the sampler for parameters, starts each trial as an ordinary run through
the service (the queue, the governor and the time box apply unchanged; it never holds a queue slot
itself), scores and prunes trials from their metric history, and keeps `sweep.json` current. It
is the only writer of its sweep's record while it lives; readers find it `lost` if it dies."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.errors import BackpropError, NoCheckpoint, RunNotFound, StoreError
from backprop_mcp.core.records import ACTIVE_STATES, RunRecord, SweepRef
from backprop_mcp.runs.launch import HELD_SIGNALS
from backprop_mcp.runs.requests import RunRequest
from backprop_mcp.runs.service import Service
from backprop_mcp.sweeps import objective, pruning
from backprop_mcp.sweeps.samplers import suggest
from backprop_mcp.sweeps.shapes import STARTING, SweepRecord, Trial
from backprop_mcp.sweeps.space import parse_space, trial_args, trial_name
from backprop_mcp.sweeps.store import SweepStore

log = logging.getLogger("backprop_mcp.sweeps.runner")

# How often the runner looks at its trials: a trial's end or a prune is seen within this, and
# each look reads only the records of the active trials. BACKPROP_SWEEP_POLL_SECONDS shrinks it.
POLL_SECONDS = 0.5
# The record is rewritten at most this often while nothing but the elapsed time changes.
WRITE_SECONDS = 2.0
# After asking its trials to stop, the runner waits this long past their grace for them to end,
# so that its final record says how they ended (a supervisor ends its run within the grace).
STOP_MARGIN_SECONDS = 30.0


def poll_seconds() -> float:
    try:
        value = float(os.environ.get("BACKPROP_SWEEP_POLL_SECONDS", ""))
    except ValueError:
        return POLL_SECONDS
    return value if 0.02 <= value <= 60 else POLL_SECONDS


def trial_id(sweep_id: str, number: int) -> str:
    return f"{sweep_id}-t{number}"


def signed(value: float, mode: str) -> float:
    """The objective as a loss (lower is better), for the samplers."""
    return value if mode == "min" else -value


class Runner:
    """One sweep, from its first trial to its final record."""

    def __init__(self, home: Path, sweep_id: str) -> None:
        self.sweeps = SweepStore(home)
        self.sweep_id = sweep_id
        self.record: SweepRecord = self.sweeps.read(sweep_id)
        record = self.record
        config = Path(record["config_file"]) if record["config_file"] else None
        self.service = Service(home, cwd=Path(record["cwd"]), config_file=config)
        self.space = parse_space(record["params"])
        self.roots = (
            [Path(r) for r in record["allowed_roots"]] if record["allowed_roots"] is not None else None
        )
        self.stopping = False
        self.pruned_at: dict[str, float] = {}  # run id -> the step last judged, so each step is judged once
        # Run id -> the metric history of a trial that has ended (it changes no more until resumed):
        # each look at a live trial then reads only its own history, not every earlier trial's.
        self.ended_series: dict[str, list[tuple[float, float]]] = {}
        self.poll = poll_seconds()
        self.started = time.monotonic()
        self.elapsed_before = record["elapsed_seconds"]
        self.last_write = 0.0

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # Started with these held (see `entry.spawn`): a stop sent before now is handled now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        record = self.record
        record["started_at"] = record["started_at"] or now_iso()
        self._write()
        budget = record["budget_minutes"]
        try:
            while True:
                self._refresh()
                if self.stopping or self.sweeps.stop_requested(self.sweep_id):
                    self._end_all("stopped", "stopped on request")
                    break
                if budget is not None and self._elapsed() >= budget * 60:
                    self._end_all("completed", f"its time budget of {budget:g} minutes ran out")
                    break
                if record["prune"]:
                    self._prune()
                failed = self._fill()
                if failed is not None:
                    self._end_all("failed", failed)
                    break
                if not self._active() and not self._more():
                    # A sweep none of whose trials ran to a result found nothing: it failed.
                    none_ran = bool(record["trials"]) and all(
                        t["status"] in objective.UNSCORED_STATES for t in record["trials"]
                    )
                    self._finish("failed" if none_ran else "completed", self._done_detail())
                    break
                if time.monotonic() - self.last_write >= WRITE_SECONDS:
                    self._write()
                time.sleep(self.poll)
        except BaseException as exc:
            # A bug or a store that fails for good: say so in the record rather than leave it
            # "running" for the next reader to call lost; the trials run on under their supervisors.
            detail = exc.message if isinstance(exc, BackpropError) else f"the runner failed: {exc!r}"
            log.exception("sweep %s: %s", self.sweep_id, detail)
            self._finish("failed", detail)
            return 1
        return 0

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def _write(self) -> None:
        self.record["elapsed_seconds"] = round(self._elapsed(), 3)
        self.last_write = time.monotonic()
        try:
            self.sweeps.write(self.record)
        except StoreError as exc:
            log.warning("sweep %s: %s; retried at the next change", self.sweep_id, exc.message)

    def _finish(self, status: str, detail: str) -> None:
        self.record["status"], self.record["status_detail"] = status, detail
        self.record["ended_at"] = now_iso()
        self._write()

    def _active(self) -> list[Trial]:
        return [t for t in self.record["trials"] if t["status"] in ACTIVE_STATES or t["status"] == STARTING]

    def _more(self) -> bool:
        """Whether a trial is left to start or resume."""
        trials = self.record["trials"]
        if any(t.get("resume") for t in trials):
            return True
        if len(trials) >= self.record["max_trials"]:
            return False
        return self._next_params(len(trials) + 1) is not None

    def _done_detail(self) -> str:
        counts: dict[str, int] = {}
        for trial in self.record["trials"]:
            counts[trial["status"]] = counts.get(trial["status"], 0) + 1
        ended = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        if counts and all(state in objective.UNSCORED_STATES for state in counts):
            return f"every trial failed ({ended}); no parameters were scored"
        return "all trials ended: " + ended

    # -- trials -----------------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Bring the active trials' states and scores up to date from their runs."""
        changed = False
        for trial in self._active():
            try:
                run = self.service.get(trial["run_id"])
            except RunNotFound:
                continue  # "starting": created by `_fill` below, or the runner died before it
            except BackpropError as exc:
                log.warning("sweep %s: trial %s: %s", self.sweep_id, trial["run_id"], exc.message)
                continue
            changed |= self._update(trial, run)
        if changed:
            self._write()

    def _update(self, trial: Trial, run: RunRecord) -> bool:
        before = dict(trial)
        record = self.record
        trial["status"] = run["status"]
        if run["step"] is not None:
            trial["step"] = run["step"]
        reason = run["termination_reason"]
        if reason and reason != "exit_zero" and run["status"] not in ACTIVE_STATES:
            trial["reason"] = reason
        else:
            trial.pop("reason", None)
        result = objective.score(run, record["metric"], record["mode"], record["objective"], self._series)
        trial["objective"] = objective.short(result.objective) if result.objective is not None else None
        if result.unfinished:
            trial["unfinished"] = True
        else:
            trial.pop("unfinished", None)
        return dict(trial) != before

    def _series(self, run: RunRecord, metric: str) -> list[tuple[float, float]]:
        return objective.read_series(self.service.store, run, metric)

    def _next_params(self, number: int) -> dict[str, str | int | float | bool] | None:
        record = self.record
        history = [
            (t["params"], signed(t["objective"], record["mode"]) if t["objective"] is not None else None)
            for t in record["trials"]
            if t["status"] not in ACTIVE_STATES and t["status"] != STARTING
        ]
        return suggest(
            record["method"], self.space, record["seed"], number, history, budget=record["max_trials"]
        )

    def _fill(self) -> str | None:
        """Start or resume trials up to the sweep's parallelism; the reason when the sweep must end."""
        record = self.record
        try:
            for trial in [t for t in record["trials"] if t["status"] == STARTING]:
                self._start(trial)  # taken by a runner that died before its run existed
        except BackpropError as exc:
            return f"a trial could not be started: {exc.message}"
        while len(self._active()) < record["parallel"] and not self.stopping:
            waiting = next((t for t in record["trials"] if t.get("resume")), None)
            try:
                if waiting is not None:
                    self._resume(waiting)
                elif len(record["trials"]) < record["max_trials"]:
                    number = len(record["trials"]) + 1
                    params = self._next_params(number)
                    if params is None:
                        return None
                    trial = Trial(
                        number=number,
                        run_id=trial_id(self.sweep_id, number),
                        params=params,
                        status=STARTING,
                        objective=None,
                    )
                    record["trials"].append(trial)
                    self._write()  # the number and run id are taken before the run exists
                    self._start(trial)
                else:
                    return None
            except BackpropError as exc:
                return f"a trial could not be started: {exc.message}"
        return None

    def _start(self, trial: Trial) -> None:
        record = self.record
        try:
            run = self.service.get(trial["run_id"])  # started before this runner died
        except RunNotFound:
            request = RunRequest(
                script=record["script"],
                args=trial_args(record["args"], trial["params"]),
                name=trial_name(record["name"], trial["number"]),
                run_id=trial["run_id"],
                cwd=record["cwd"],
                python=record["python"],
                options=record["options"],
                source=record["source"],
                sweep=SweepRef(id=self.sweep_id, trial=trial["number"], params=trial["params"]),
                tags=record.get("tags", []),
                note=record.get("note"),
            )
            try:
                run = self.service.start(request, allowed_roots=self.roots)
            except BackpropError as exc:
                trial["status"], trial["reason"] = "failed", "start_failed"
                self._write()
                raise exc from None
        self._update(trial, run)
        self._write()

    def _resume(self, trial: Trial) -> None:
        trial.pop("resume", None)
        self.ended_series.pop(trial["run_id"], None)
        record = self.record
        try:
            run = self.service.resume(
                trial["run_id"], options=record["options"], source=record["source"], allowed_roots=self.roots
            )
        except NoCheckpoint:
            run = self.service.resume(
                trial["run_id"],
                options=record["options"],
                source=record["source"],
                allowed_roots=self.roots,
                from_scratch=True,
            )
        self._update(trial, run)
        self._write()

    def _prune(self) -> None:
        record = self.record
        metric, mode = record["metric"], record["mode"]
        for trial in self._active():
            if trial["status"] != "running" or trial.get("step") is None:
                continue
            step = float(trial.get("step") or 0)
            if self.pruned_at.get(trial["run_id"]) == step:
                continue
            self.pruned_at[trial["run_id"]] = step
            try:
                run = self.service.get(trial["run_id"])
                mine = objective.with_latest(self._series(run, metric), run, metric)
                earlier = [
                    pruning.Earlier(self._earlier_series(t), t["status"], t.get("reason"), t["objective"])
                    for t in record["trials"]
                    if t["number"] < trial["number"] and t["status"] != STARTING
                ]
            except BackpropError as exc:
                log.warning("sweep %s: pruning skipped: %s", self.sweep_id, exc.message)
                continue
            why = pruning.verdict(record["method"], mine, earlier, mode, metric)
            if why is not None:
                try:
                    self.service.stop(trial["run_id"], pruned=why)
                except BackpropError:
                    continue  # it ended meanwhile: its own outcome stands

    def _earlier_series(self, trial: Trial) -> list[tuple[float, float]]:
        """An earlier trial's history to judge a later one by: read once when it has ended."""
        cached = self.ended_series.get(trial["run_id"])
        if cached is not None:
            return cached
        run = self.service.get(trial["run_id"])
        points = objective.with_latest(self._series(run, self.record["metric"]), run, self.record["metric"])
        if run["status"] not in ACTIVE_STATES:
            self.ended_series[trial["run_id"]] = points
        return points

    def _end_all(self, status: str, detail: str) -> None:
        """Stop every active trial gracefully (queued ones never start), wait for them to end
        (bounded), and record the sweep's end."""
        for trial in self._active():
            try:
                self.service.stop(trial["run_id"])
            except BackpropError:
                continue  # ended meanwhile, or never created: the refresh below says which
        grace = self.service.settings(self.record["options"], self.record["source"]).grace_seconds
        deadline = time.monotonic() + grace + STOP_MARGIN_SECONDS
        while time.monotonic() < deadline:
            self._refresh()
            left = [t for t in self._active() if t["status"] != STARTING]
            if not left:
                break
            time.sleep(self.poll)
        for trial in self._active():
            if trial["status"] == STARTING:
                trial["status"], trial["reason"] = "stopped", "stop_requested"
        self._finish(status, detail)
