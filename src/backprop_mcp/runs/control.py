"""The use-cases over runs that exist: read one (marking it `lost` when its supervisor is gone),
the machine's status, list, stop, read logs, compare, metric histories. `Service` (in `service`)
adds starting and resuming; both talk to the runs' supervisors only through a `Backend`."""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from backprop_mcp.backends.base import Backend, SupervisorId
from backprop_mcp.backends.choice import of_record, remote_backend
from backprop_mcp.backends.local import LocalBackend
from backprop_mcp.core import notebook
from backprop_mcp.core.answers import (
    RunPage,
    StopReport,
    StopResult,
    SystemStatus,
)
from backprop_mcp.core.clock import age_seconds, now_iso
from backprop_mcp.core.config import resolve_settings
from backprop_mcp.core.errors import (
    BackpropError,
    RunNotFound,
    RunStateError,
    StoreCorrupt,
    StoreError,
    UsageError,
)
from backprop_mcp.core.files import atomic_write
from backprop_mcp.core.ids import check_run_id
from backprop_mcp.core.records import ACTIVE_STATES, ALL_STATES, RunRecord, RunRow, close_attempt, row_of
from backprop_mcp.core.settings import Settings
from backprop_mcp.core.store import STOP_REQUEST_FILE, Store, default_home
from backprop_mcp.core.stored import UNKNOWN_STATUS
from backprop_mcp.governor import decisions, proctree
from backprop_mcp.governor.admission import Admission
from backprop_mcp.governor.probe_choice import make_probe
from backprop_mcp.runs.launch import limits_of
from backprop_mcp.runs.listing import Order, complete_row, is_old_row, needs_metrics, ordered, parse_sort
from backprop_mcp.runs.notes import Notebooks

# A run whose supervisor has not yet written its pid is "launching", not lost, for this long:
# the gap between creating the record and the supervisor's first write is normally ~0.1 s.
LAUNCH_GRACE_SECONDS = 30.0
MAX_LIST_LIMIT = 1000
# A page cursor is an offset: ASCII digits, short enough that int() takes it at once.
_CURSOR_RE = re.compile(r"[0-9]{1,18}")
# `stop --force` waits this long for a supervisor (continued if it was stopped) to kill its run
# before killing the run itself: a responsive supervisor does it in well under a second.
FORCE_STOP_WAIT_SECONDS = 5.0
FORCE_STOP_POLL_SECONDS = 0.05
# Runs one `stop_runs` call takes: a page of a listing, not a whole store.
MAX_STOP_RUNS = 100


class RunControl(Notebooks):
    """The use-cases over one store's existing runs. Cheap to construct; holds no open resources."""

    def __init__(
        self,
        home: Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        config_file: Path | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.env: Mapping[str, str] = dict(os.environ) if env is None else env
        self.store = Store(home or default_home(dict(self.env)))
        self.cwd = cwd or Path.cwd()
        self.config_file = config_file
        """An explicit config file (`--config`), read instead of the project file."""
        self.on_settings: Callable[[Settings, dict[str, str]], None] | None = None
        """Called with every resolved configuration and the origin of each setting (--verbose)."""
        self.backend: Backend = backend or LocalBackend()
        """Where the runs' supervisors run: this machine unless another backend is given."""

    # -- settings ---------------------------------------------------------------------------------

    def settings(
        self,
        options: Mapping[str, object] | None = None,
        source: str = "option",
        *,
        base: Mapping[str, object] | None = None,
        cwd: Path | None = None,
    ) -> Settings:
        settings, origins = resolve_settings(
            cwd or self.cwd, self.env, options, source=source, base=base, config_file=self.config_file
        )
        if self.on_settings is not None:
            self.on_settings(settings, origins)
        return settings

    # -- reading ----------------------------------------------------------------------------------

    def get(self, run_id: str) -> RunRecord:
        """The run's record, marking it `lost` first if its supervisor is gone (a run on a cluster:
        what its job reported since the last read folded in first, see `RemoteBackend.follow`)."""
        check_run_id(run_id)
        record = self.store.read(run_id)
        remote = of_record(record["options"]) if record["status"] in ACTIVE_STATES else None
        if remote is not None:
            with self.store.run_lock(run_id):
                return remote.follow(self.store, self.store.read(run_id))
        if record["status"] in ACTIVE_STATES and not self._supervised(record):
            with self.store.run_lock(run_id):
                record = self.store.read(run_id)
                if record["status"] in ACTIVE_STATES and not self._supervised(record):
                    self._mark_lost(record)
        return record

    def _supervisor(self, record: RunRecord) -> SupervisorId | None:
        """The supervisor serving the run, as its backend knows it; None while it is launched."""
        return self.backend.supervisor(self.store, record)

    def _supervised(self, record: RunRecord) -> bool:
        """True while the run's supervisor lives and can still end the run in time: a supervisor
        stopped (SIGSTOP) or hung past the run's end is treated like a dead one."""
        supervisor = self._supervisor(record)
        if supervisor is None:
            return age_seconds(record["updated_at"]) < LAUNCH_GRACE_SECONDS
        return self.backend.is_alive(supervisor) and self._wedged(record, supervisor) is None

    def _ledger(self, record: RunRecord) -> Path:
        return proctree.ledger_path(self.store.run_dir(record["run_id"]), record["attempt"])

    def _wedged(self, record: RunRecord, supervisor: tuple[int, float | None]) -> str | None:
        must_end_by = proctree.read_ledger(self._ledger(record)).must_end_by
        return proctree.wedged(*supervisor, must_end_by, time.time())

    def _mark_lost(
        self, record: RunRecord, *, status: str = "lost", reason: str = "supervisor_lost", why: str = ""
    ) -> None:
        """End a run whose supervisor is gone (or wedged, or unable to act on a forced stop): kill
        the supervisor if it still lives, then every process of the run, and record the end."""
        supervisor = self._supervisor(record)
        wedged = self._wedged(record, supervisor) if supervisor else None
        # A cleanup by another process (a queued supervisor) may have killed it already.
        wedged = wedged or proctree.read_ledger(self._ledger(record)).wedged
        if not why:
            why = (
                f"its supervisor was {wedged} past the run's end and was killed"
                if wedged
                else "its supervisor process died"
            )
        killed, left = proctree.end_run(self._ledger(record), supervisor=supervisor, wedged=wedged)
        if supervisor is not None and not left:
            Admission(self.store.governor_dir).release(record["run_id"], supervisor)
        detail = why + (f"; {killed} process(es) of the run were killed" if killed else "")
        detail += f"; {left} process(es) could not be killed" if left else ""
        close_attempt(record, status, reason, detail, now_iso())
        # The slot released and the event written before the final record: whoever sees the run
        # ended finds the store quiescent for it (see `SupervisorBase.set_state`).
        self.store.append_event(
            record["run_id"], {"type": "state", "status": status, "detail": record["status_detail"]}
        )
        self.store.write(record)

    def system_status(
        self, options: Mapping[str, object] | None = None, source: str = "option"
    ) -> SystemStatus:
        """The machine, live and queued runs, and the verdict for a new run."""
        settings = self.settings(options, source)
        self.store.ensure()
        probe = make_probe(settings.gpu_probe, cpu_cache=self.store.governor_dir / "cpu_sample.json")
        snapshot = probe.snapshot()
        admission = Admission(self.store.governor_dir)
        active = admission.active()
        live = self._rows(a["run_id"] for a in active)
        queued = self._rows(admission.queued())
        verdict = decisions.evaluate(snapshot, limits_of(settings), active, now=time.time())
        status = SystemStatus(
            snapshot=snapshot, limits=limits_of(settings), live_runs=live, queued_runs=queued, verdict=verdict
        )
        remote = remote_backend(settings.backend, settings.ray_address)
        if remote is not None:  # a new run goes to the cluster: its resources, its runs, its verdict
            status["cluster"], on, waiting, status["verdict"] = remote.overview(self.store, settings)
            status["live_runs"] += self._rows(on)
            status["queued_runs"] += self._rows(waiting)
        return status

    def _rows(self, run_ids: Iterator[str] | list[str]) -> list[RunRow]:
        rows = []
        for run_id in run_ids:
            try:
                record = self.get(run_id)
            except (StoreError, RunNotFound, UsageError):
                continue
            if record["status"] in ACTIVE_STATES:
                rows.append(row_of(record))
        return rows

    def list_runs(
        self,
        *,
        status: str | None = None,
        name: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
        sort: str | None = None,
        sweep: str | None = None,
        tags: Sequence[str] = (),
    ) -> RunPage:
        """Runs filtered by state, name glob, sweep id and tags (all of them), paged. Newest first by
        default; `sort` orders by a metric's last value ("loss" lowest first, "-val_acc" highest
        first) or by "created", "name" or "step" ("-" for descending). Runs without it come last; ties
        stay newest first, so a cursor pages through a sorted list stably. Every row carries the
        run's `args` and `metrics` (filled from the record for rows an older version indexed)."""
        if status is not None and status not in ALL_STATES:
            raise UsageError(f"unknown status {status!r}; choose one of {', '.join(ALL_STATES)}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise UsageError(f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}, got {limit!r}")
        order = parse_sort(sort)
        tags = notebook.check_tags(tags)
        offset = 0
        if cursor is not None:
            # ASCII digits only, and few of them: str.isdigit() also takes "²", which int() refuses.
            if not isinstance(cursor, str) or not _CURSOR_RE.fullmatch(cursor):
                raise UsageError(f"invalid cursor {cursor!r}; pass the next_cursor of a previous page")
            offset = int(cursor)
        page, complete = self._page(status, name, limit, offset, order, sweep, tags)
        if complete is False or self.store.index_damaged:
            # A full scan saw another number of runs than the store holds (a starter died between
            # creating a run and indexing it; a record was moved aside), or the index had a bad
            # line. Rebuild it from the run folders, which gives every run folder a row, and list
            # again trusting that: one rebuild, never one per call, and never "no runs" when there are.
            self.store.rebuild_index()
            page, _ = self._page(status, name, limit, offset, order, sweep, tags)
        elif complete is None:
            # A sorted listing filled rows an earlier version indexed from their records: write
            # them whole once, so the next sorted listing reads the index alone (a store that
            # cannot be written is listed all the same).
            with contextlib.suppress(StoreError):
                self.store.rebuild_index()
        return page

    def _page(
        self,
        status: str | None,
        name: str | None,
        limit: int,
        offset: int,
        order: Order | None,
        sweep: str | None = None,
        tags: Sequence[str] = (),
    ) -> tuple[RunPage, bool | None]:
        """A page, and False when a full scan saw another number of runs than the store holds
        (None when it was complete but had to fill rows of an earlier version from records)."""
        counts = [0, 0]  # index rows read, rows matching
        matching = self._matching(status, name, counts, sweep, tags)
        if order is None:
            # Newest first is the index's own order: read only as far back as the page needs.
            runs = list(itertools.islice(matching, offset, offset + limit + 1))
        else:
            found = list(matching)
            old_rows = sum(1 for row in found if is_old_row(row))
            if needs_metrics(order):
                found = [complete_row(row, self.store.read) for row in found]
            runs = ordered(found, order)[offset : offset + limit + 1]
        more = len(runs) > limit
        page = [cast(RunRow, complete_row(row, self.store.read)) for row in runs[:limit]]
        complete: bool | None = more or counts[0] == self.store.count_runs()
        if complete and order is not None and needs_metrics(order) and old_rows:
            complete = None
        next_cursor = str(offset + limit) if more else None
        total = None if more and order is None else counts[1]
        return RunPage(runs=page, next_cursor=next_cursor, total_matching=total), complete

    def _matching(
        self, status: str | None, name: str | None, counts: list[int], sweep: str | None, tags: Sequence[str]
    ) -> Iterator[dict[str, Any]]:
        """Index rows newest first (live ones fresh from their record), with their tags, that pass
        the filters; counts the rows read in `counts[0]` and those that passed in `counts[1]`."""
        tagged: dict[str, tuple[str, list[str]]] | None = None
        for indexed in self.store.index_rows():  # (which may rebuild the tag index: read it after)
            tagged = notebook.tag_map(self.store) if tagged is None else tagged  # once, not per run
            counts[0] += 1
            stale = indexed["status"] in ACTIVE_STATES or indexed["status"] == UNKNOWN_STATUS
            row = self._fresh_row(indexed) if stale else indexed
            if status is not None and row.get("status") != status:
                continue
            if name is not None and not fnmatch.fnmatchcase(row.get("name") or "", name):
                continue
            if sweep is not None and row.get("sweep") != sweep:
                continue
            if row_tags := notebook.tags_of(tagged, row["run_id"], row["created_at"]):
                row["tags"] = row_tags
            if not set(tags) <= set(row_tags):
                continue
            row.pop("new", None)  # the index's creation marker; the rest is a RunRow
            counts[1] += 1
            yield row

    def _fresh_row(self, row: dict[str, Any]) -> dict[str, Any]:
        # Live rows come from the record itself: it has the current step and the liveness check.
        # So do "unknown" ones, in case the record has become readable (permissions fixed).
        try:
            return dict(row_of(self.get(row["run_id"])))
        except StoreCorrupt as exc:  # moved aside just now: the next listing rebuilds the index
            return {**row, "status": UNKNOWN_STATUS, "note": exc.message}
        except (StoreError, RunNotFound, UsageError):
            return row

    def stop(self, run_id: str, *, force: bool = False, pruned: str | None = None) -> RunRecord:
        """Ask the run to stop gracefully (or kill it at once with force). `pruned` (why, in words)
        makes it a sweep's early stop: the run ends `stopped` with the reason `pruned`."""
        supervisor = self._send_stop(run_id, force, pruned)
        if force and supervisor is not None:
            self._end_forced(run_id, supervisor)
        return self.get(run_id)

    def stop_runs(self, run_ids: Sequence[str], *, force: bool = False) -> StopReport:
        """Stop several runs: each one is tried and reported, one that cannot be stopped (ended
        already, unknown) does not keep the others from stopping. Malformed ids are refused
        before anything is stopped. Forced stops are all sent before any is waited for."""
        if isinstance(run_ids, str) or not 1 <= len(run_ids) <= MAX_STOP_RUNS:
            raise UsageError(f"give 1 to {MAX_STOP_RUNS} run ids to stop")
        wanted = list(dict.fromkeys(check_run_id(run_id) for run_id in run_ids))
        sent: dict[str, SupervisorId | None] = {}
        errors: dict[str, str] = {}
        for run_id in wanted:
            try:
                sent[run_id] = self._send_stop(run_id, force)
            except BackpropError as exc:
                errors[run_id] = exc.message
        results: list[StopResult] = []
        for run_id in wanted:
            supervisor = sent.get(run_id)
            record: RunRecord | None = None
            try:
                if force and supervisor is not None:
                    self._end_forced(run_id, supervisor)
                record = self.get(run_id)
            except BackpropError as exc:
                errors.setdefault(run_id, exc.message)
            error = errors.get(run_id)
            results.append(StopResult(run_id=run_id, stopped=error is None, error=error, record=record))
        return StopReport(runs=results, all_stopped=not errors)

    def _send_stop(self, run_id: str, force: bool, pruned: str | None = None) -> SupervisorId | None:
        """Leave the stop request and signal the run's supervisor; returns that supervisor (None
        while it is being launched: it reads the request itself)."""
        record = self.get(run_id)
        if record["status"] not in ACTIVE_STATES:
            raise RunStateError(f"run {run_id} has already ended ({record['status']}); nothing to stop")
        remote = of_record(record["options"])
        if remote is not None:  # its supervisor is a cluster job's: the backend reaches it
            remote.stop(self.store, record, force=force, pruned=pruned)
            with contextlib.suppress(StoreError):
                self.store.append_event(run_id, {"type": "stop_requested", "force": force})
            return None
        # First the request in the run folder, then the signal to whatever supervisor is known by
        # then: a supervisor reads this file after making its pid known, so a stop at any moment
        # of a launch reaches it one way or the other (see `Supervisor.run`).
        requested = self._request_stop(record, force, pruned)
        supervisor = self._supervisor(self.store.read(run_id))
        if supervisor is None and not requested:
            raise RunStateError(f"run {run_id} is still launching; try again in a moment")
        if supervisor is not None:
            self.backend.stop(supervisor, force=force)
        with contextlib.suppress(StoreError):  # the stop is on its way; a full disk loses only this note
            self.store.append_event(run_id, {"type": "stop_requested", "force": force})
        return supervisor

    def _end_forced(self, run_id: str, supervisor: SupervisorId) -> None:
        """After a forced stop: end the run here if its supervisor does not, in time."""
        if self._ended_by_supervisor(run_id, supervisor):
            return
        with self.store.run_lock(run_id):
            record = self.store.read(run_id)
            if record["status"] in ACTIVE_STATES:
                self._mark_lost(
                    record,
                    status="stopped",
                    reason="stop_requested",
                    why="killed by a forced stop: its supervisor did not act on it",
                )

    def _request_stop(self, record: RunRecord, force: bool, pruned: str | None = None) -> bool:
        request: dict[str, object] = {"attempt": record["attempt"], "force": force, "at": now_iso()}
        if pruned is not None:
            request.update(reason="pruned", detail=pruned)
        path = self.store.run_dir(record["run_id"]) / STOP_REQUEST_FILE
        try:
            atomic_write(path, json.dumps(request).encode("utf-8"))
        except StoreError:
            return False
        return True

    def _ended_by_supervisor(self, run_id: str, supervisor: tuple[int, float | None]) -> bool:
        """Wait (bounded) for a forcibly stopped run's supervisor to end it; False when it did
        not (it was stopped again, or hangs)."""
        deadline = time.monotonic() + FORCE_STOP_WAIT_SECONDS
        while time.monotonic() < deadline:
            if self.store.read(run_id)["status"] not in ACTIVE_STATES:
                return True
            if not self.backend.is_alive(supervisor):
                return True  # it died: the lost cleanup of the next read ends the run
            time.sleep(FORCE_STOP_POLL_SECONDS)
        return False
