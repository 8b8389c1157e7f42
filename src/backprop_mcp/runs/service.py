"""The use-cases of backprop-mcp (start, resume, status, list, stop, logs, compare, import):
the one API that the CLI and the MCP server both call."""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

from backprop_mcp.backends.base import Backend, SupervisorId
from backprop_mcp.backends.local import LocalBackend
from backprop_mcp.core.answers import Comparison, DryRun, ImportReport, LogTail, RunPage, SystemStatus
from backprop_mcp.core.clock import now_iso, parse_iso
from backprop_mcp.core.config import resolve_settings
from backprop_mcp.core.errors import (
    NoCheckpoint,
    RunNotFound,
    RunStateError,
    StoreCorrupt,
    StoreError,
    UsageError,
)
from backprop_mcp.core.files import atomic_write, tail_lines
from backprop_mcp.core.machine import Decision
from backprop_mcp.core.records import (
    ACTIVE_STATES,
    ALL_STATES,
    RunRecord,
    RunRow,
    new_attempt,
    new_record,
    row_of,
)
from backprop_mcp.core.settings import Settings
from backprop_mcp.core.store import STOP_REQUEST_FILE, SUPERVISOR_PID_FILE, Store, check_run_id, default_home
from backprop_mcp.core.stored import UNKNOWN_STATUS
from backprop_mcp.governor import decisions, proctree
from backprop_mcp.governor.admission import Admission
from backprop_mcp.governor.probe_choice import make_probe
from backprop_mcp.runs import confine
from backprop_mcp.runs.confine import check_allowed
from backprop_mcp.runs.launch import (
    choose_python,
    command,
    contract_env,
    detect_framework,
    limits_of,
)

# A run whose supervisor has not yet written its pid is "launching", not lost, for this long:
# the gap between creating the record and the supervisor's first write is normally ~0.1 s.
LAUNCH_GRACE_SECONDS = 30.0
MAX_LIST_LIMIT = 1000
# A page cursor is an offset: ASCII digits, short enough that int() takes it at once.
_CURSOR_RE = re.compile(r"[0-9]{1,18}")
MAX_LOG_TAIL = 10_000
# Log lines returned are cut to this many characters: a tail must stay bounded in size.
MAX_LOG_LINE_CHARS = 2000
# `stop --force` waits this long for a supervisor (continued if it was stopped) to kill its run
# before killing the run itself: a responsive supervisor does it in well under a second.
FORCE_STOP_WAIT_SECONDS = 5.0
FORCE_STOP_POLL_SECONDS = 0.05


class RunRequest(NamedTuple):
    """A request to start a run: the script, its arguments and the run options.

    `options` maps config field names (see `config.FIELDS`, e.g. "max_run_minutes",
    "gpu_min_free_vram_mb") to raw values: strings from the CLI, typed values from MCP. They are
    validated by the same parsers as config files, and `source` names where they came from in
    error messages ("option" for the CLI, "argument" for MCP tools).
    """

    script: str | None
    args: Sequence[str] = ()
    name: str | None = None
    run_id: str | None = None
    cwd: str | None = None
    python: str | None = None
    resume_from: str | None = None
    options: Mapping[str, object] | None = None
    source: str = "option"
    file_defaults: bool = False
    """Take a missing script, run id and resume_from from the config files' `trainingScriptPath`,
    `runId` and `resumeFrom` (the seed's keys; the CLI's `backprop run`, never MCP arguments)."""


class Service:
    """The use-cases over one store. Cheap to construct; holds no open resources."""

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

    # -- starting ---------------------------------------------------------------------------------

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

    def _prepare(
        self, request: RunRequest, allowed_roots: Sequence[Path] | None
    ) -> tuple[RunRecord, Settings]:
        cwd = self._absolute(request.cwd) if request.cwd else self.cwd
        if allowed_roots is not None:
            # Before anything looks at these paths: a refusal must not depend on what exists.
            confine.check_request(
                request._asdict(),
                cwd,
                allowed_roots,
                lambda: confine.configured_interpreters(
                    self.settings(request.options, request.source, cwd=cwd).python, self.env
                ),
            )
        if not cwd.is_dir():
            if request.script and Path(request.script).expanduser().is_absolute():
                _resolve_script(request.script, cwd)  # a missing script is the error to report first
            raise UsageError(f"working directory {str(cwd)!r} does not exist or is not a folder")
        settings = self.settings(request.options, request.source, cwd=cwd)
        if request.file_defaults:
            request = request._replace(
                script=request.script if request.script is not None else settings.default_script,
                run_id=request.run_id if request.run_id is not None else settings.default_run_id,
                resume_from=request.resume_from
                if request.resume_from is not None
                else settings.default_resume_from,
            )
        if request.script is None:
            raise UsageError(
                "no training script given: name one (`backprop run train.py`) or set "
                '"trainingScriptPath" in backprop.config.json'
            )
        script = _resolve_script(request.script, cwd)
        roots = (
            list(allowed_roots)
            if allowed_roots is not None
            else ([Path(r) for r in settings.allowed_roots] if settings.allowed_roots else None)
        )
        if roots is not None:
            check_allowed(script, roots)
        run_id = check_run_id(request.run_id) if request.run_id is not None else _new_run_id(request.name)
        if request.name is not None and (len(request.name) > 200 or "\0" in request.name):
            raise UsageError("a run name must be at most 200 characters, without NUL bytes")
        if any("\0" in a for a in request.args):
            raise UsageError("script arguments cannot contain NUL bytes")
        resume_from = None
        if request.resume_from:
            resume_path = Path(request.resume_from).expanduser()
            resume_path = resume_path if resume_path.is_absolute() else cwd / resume_path
            if not resume_path.exists():
                raise UsageError(f"checkpoint to resume from does not exist: {resume_path}")
            resume_from = str(resume_path)
        given_python = _check_python(request.python, cwd, self.env)
        python, python_source = choose_python(given_python, settings, self.env)
        record = new_record(
            run_id=run_id,
            script=str(script),
            created_at=now_iso(),
            name=request.name,
            status_detail="waiting for its supervisor to start",
            args=list(request.args),
            python=python,
            python_source=python_source,
            cwd=str(cwd),
            framework=detect_framework(script, settings.framework),
            max_run_minutes=settings.max_run_minutes,
            max_wall_minutes=settings.wall_minutes,
            attempts=[new_attempt(1, resume_from)],
            resume_from=resume_from,
            options=settings.as_options(),
            config_files=list(settings.sources),
        )
        return record, settings

    def start(self, request: RunRequest, *, allowed_roots: Sequence[Path] | None = None) -> RunRecord:
        """Create the run and launch its supervisor; returns the record at once (queued or running,
        or `rejected` when queueing was refused and the governor said no)."""
        record, settings = self._prepare(request, allowed_roots)
        if not settings.queue:
            decision = self._decide(settings)
            if not decision["allowed"]:
                record["status"], record["termination_reason"] = "rejected", "rejected"
                record["status_detail"] = "; ".join(decision["reasons"])
                record["ended_at"] = now_iso()
                record["attempts"][-1].update(
                    {"status": "rejected", "termination_reason": "rejected", "ended_at": record["ended_at"]}
                )
                self._create(record)
                return record
        since = self._create(record)
        try:
            self._launch(record["run_id"])
        except BaseException:
            self.store.remove_run(record["run_id"], since)
            raise
        return self.store.read(record["run_id"])

    def _create(self, record: RunRecord) -> int:
        """Store a new run, all of it or none of it (record, index row, first event); returns
        where its index rows start, for `Store.remove_run` if the launch then fails."""
        since = self.store.index_size()
        self.store.create(record)  # an id already taken fails here, before anything is ours to undo
        try:
            self.store.index_append(row_of(record), new=True)
            self.store.append_event(
                record["run_id"],
                {"type": "created", "status": record["status"], "detail": record["status_detail"]},
            )
        except BaseException:
            self.store.remove_run(record["run_id"], since)
            raise
        return since

    def _absolute(self, path: str) -> Path:
        """A path option as the caller means it: relative to the caller's working directory."""
        given = Path(os.path.expanduser(path))
        return given if given.is_absolute() else self.cwd / given

    def _launch(self, run_id: str) -> None:
        """Submit the run's current attempt to the backend, all or nothing (see `Backend.submit`)."""
        self.backend.submit(self.store, run_id, self.env)

    def _decide(self, settings: Settings) -> Decision:
        self.store.ensure()
        probe = make_probe(settings.gpu_probe, cpu_cache=self.store.governor_dir / "cpu_sample.json")
        snapshot = probe.snapshot()
        active = Admission(self.store.governor_dir).active()
        return decisions.evaluate(snapshot, limits_of(settings), active, now=time.time())

    def dry_run(self, request: RunRequest, *, allowed_roots: Sequence[Path] | None = None) -> DryRun:
        """What `start` would do, without starting anything."""
        record, settings = self._prepare(request, allowed_roots)
        return self._dry_run_of(record, settings)

    def _dry_run_of(self, record: RunRecord, settings: Settings) -> DryRun:
        decision = self._decide(settings)
        record["gpu"] = decision["gpu"] if settings.use_gpu else None
        deadline = time.time() + settings.max_run_minutes * 60
        run_dir = self.store.runs / record["run_id"]
        return DryRun(
            command=command(record),
            cwd=record["cwd"],
            python=record["python"],
            python_source=record["python_source"],
            environment=contract_env(record, run_dir, deadline),
            decision=decision,
            limits=limits_of(settings),
            options=settings.as_options(),
            config_files=list(settings.sources),
        )

    def resume(
        self,
        run_id: str,
        *,
        options: Mapping[str, object] | None = None,
        from_scratch: bool = False,
        args: list[str] | None = None,
        python: str | None = None,
        cwd: str | None = None,
        source: str = "option",
        allowed_roots: Sequence[Path] | None = None,
        preview: Callable[[DryRun], None] | None = None,
    ) -> RunRecord:
        """Start attempt N+1 of a finished run from its newest existing checkpoint. With `preview`,
        start nothing and change nothing: it gets what the attempt would do (see `resume_dry_run`)."""
        record = self.get(run_id)
        new_cwd = Path(record["cwd"]) if cwd is None else self._absolute(cwd)
        if allowed_roots is not None:
            # The stored paths too: the roots may have changed since, or the run was started by
            # an older version that did not check them.
            confine.check_request(
                {
                    "cwd": cwd or record["cwd"],
                    "script": record["script"],
                    "python": python or confine.stored_python(record),
                },
                new_cwd,
                allowed_roots,
                lambda: confine.configured_interpreters(self.settings(cwd=new_cwd).python, self.env),
            )
        if cwd is not None and not new_cwd.is_dir():
            raise UsageError(f"working directory {str(new_cwd)!r} does not exist or is not a folder")
        python = _check_python(python, new_cwd, self.env)
        with self.store.run_lock(run_id):
            record = self.get(run_id)
            if record["status"] in ACTIVE_STATES:
                raise RunStateError(
                    f"run {run_id} is {record['status']}; only a finished run can be resumed",
                    hint=f"wait for it, or stop it first with `backprop stop {run_id}`",
                )
            from backprop_mcp.runs.progress import newest_existing_checkpoint

            usable = None
            if allowed_roots is not None:
                # Through MCP a checkpoint the script reported is looked at only inside the roots
                # or the run's own folder (BACKPROP_CHECKPOINT_DIR lies in it).
                own = [*allowed_roots, self.store.run_dir(run_id)]
                usable = functools.partial(confine.confined, roots=own)
            checkpoint = None if from_scratch else newest_existing_checkpoint(record, usable)
            if checkpoint is None and not from_scratch:
                known = len(record["checkpoints"])
                hidden = sum(1 for c in record["checkpoints"] if usable and usable(Path(c["path"])) is None)
                why = (
                    f"none of its {known} reported checkpoints exists any more"
                    if known
                    else "the script never reported a checkpoint"
                )
                if hidden:
                    # Said without looking at them: whether they exist is not ours to tell.
                    why = (
                        f"{hidden} of its {known} reported checkpoints lie outside the allowed roots "
                        "and the run's folder, so they were not looked at"
                        + (
                            f", and none of the other {known - hidden} exists any more"
                            if known > hidden
                            else ""
                        )
                    )
                raise NoCheckpoint(
                    f"run {run_id} has no checkpoint to resume from: {why}",
                    hint="start the next attempt from the beginning with --from-scratch "
                    "(from_scratch=true in the MCP tool)",
                )
            settings = self.settings(options, source, base=record["options"], cwd=new_cwd)
            if python:
                record["python"], record["python_source"] = python, "option"
            if args is not None:
                record["args"] = list(args)
            attempt = record["attempt"] + 1
            record.update(
                {
                    "attempt": attempt,
                    "status": "queued",
                    "status_detail": "waiting for its supervisor to start",
                    "cwd": str(new_cwd),
                    "started_at": None,
                    "ended_at": None,
                    "deadline": None,
                    "max_run_minutes": settings.max_run_minutes,
                    "max_wall_minutes": settings.wall_minutes,
                    "eta_seconds": None,
                    "exit_code": None,
                    "signal": None,
                    "termination_reason": None,
                    "resume_from": checkpoint,
                    "gpu": None,
                    "cuda_visible_devices": None,
                    "paused_seconds": 0.0,
                    "queue_position": None,
                    "options": settings.as_options(),
                    "config_files": list(settings.sources),
                    "supervisor_pid": None,
                    "supervisor_started": None,
                    "script_pid": None,
                }
            )
            record["attempts"].append(new_attempt(attempt, checkpoint))
            if preview is not None:
                preview(self._dry_run_of(record, settings))
                return self.store.read(run_id)
            # All or nothing: if the new attempt cannot be recorded or launched, the run stays
            # as it was (its record, history and index rows), ready for another resume.
            with self.store.restorable(run_id):
                (self.store.run_dir(run_id) / SUPERVISOR_PID_FILE).unlink(missing_ok=True)
                (self.store.run_dir(run_id) / STOP_REQUEST_FILE).unlink(missing_ok=True)
                self.store.write(record)
                self.store.append_event(
                    run_id, {"type": "resumed", "attempt": attempt, "resume_from": checkpoint}
                )
                self._launch(run_id)
        return self.store.read(run_id)

    def resume_dry_run(
        self,
        run_id: str,
        *,
        options: Mapping[str, object] | None = None,
        from_scratch: bool = False,
        args: list[str] | None = None,
        python: str | None = None,
        cwd: str | None = None,
        source: str = "option",
        allowed_roots: Sequence[Path] | None = None,
    ) -> DryRun:
        """What `resume` would do (the same checks and errors), without changing the record."""
        previews: list[DryRun] = []
        self.resume(
            run_id,
            options=options,
            from_scratch=from_scratch,
            args=args,
            python=python,
            cwd=cwd,
            source=source,
            allowed_roots=allowed_roots,
            preview=previews.append,
        )
        return previews[0]

    # -- reading ----------------------------------------------------------------------------------

    def get(self, run_id: str) -> RunRecord:
        """The run's record, marking it `lost` first if its supervisor is gone."""
        check_run_id(run_id)
        record = self.store.read(run_id)
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
            return _age(record["updated_at"]) < LAUNCH_GRACE_SECONDS
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
        record["status"], record["termination_reason"] = status, reason
        detail = why + (f"; {killed} process(es) of the run were killed" if killed else "")
        record["status_detail"] = detail + (f"; {left} process(es) could not be killed" if left else "")
        record["ended_at"] = now_iso()
        record["attempts"][-1].update(
            {
                "status": status,
                "termination_reason": reason,
                "ended_at": record["ended_at"],
                "step": record["step"],
                "loss": record["loss"],
            }
        )
        self.store.write(record)
        self.store.append_event(
            record["run_id"], {"type": "state", "status": status, "detail": record["status_detail"]}
        )

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
        return SystemStatus(
            snapshot=snapshot, limits=limits_of(settings), live_runs=live, queued_runs=queued, verdict=verdict
        )

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
    ) -> RunPage:
        """Runs newest first, filtered by state and name glob, paged."""
        if status is not None and status not in ALL_STATES:
            raise UsageError(f"unknown status {status!r}; choose one of {', '.join(ALL_STATES)}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise UsageError(f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}, got {limit!r}")
        offset = 0
        if cursor is not None:
            # ASCII digits only, and few of them: str.isdigit() also takes "²", which int() refuses.
            if not isinstance(cursor, str) or not _CURSOR_RE.fullmatch(cursor):
                raise UsageError(f"invalid cursor {cursor!r}; pass the next_cursor of a previous page")
            offset = int(cursor)
        page, complete = self._page(status, name, limit, offset)
        if not complete or self.store.index_damaged:
            # A full scan saw another number of runs than the store holds (a starter died between
            # creating a run and indexing it; a record was moved aside), or the index had a bad
            # line. Rebuild it from the run folders, which gives every run folder a row, and list
            # again trusting that: one rebuild, never one per call, and never "no runs" when there are.
            self.store.rebuild_index()
            page, _ = self._page(status, name, limit, offset)
        return page

    def _page(self, status: str | None, name: str | None, limit: int, offset: int) -> tuple[RunPage, bool]:
        """A page, and False when a full scan saw another number of runs than the store holds."""
        runs: list[RunRow] = []
        matched = 0
        indexed_runs = 0
        more = False
        for indexed in self.store.index_rows():
            indexed_runs += 1
            stale = indexed["status"] in ACTIVE_STATES or indexed["status"] == UNKNOWN_STATUS
            row = self._fresh_row(indexed) if stale else indexed
            if status is not None and row.get("status") != status:
                continue
            if name is not None and not fnmatch.fnmatchcase(row.get("name") or "", name):
                continue
            matched += 1
            if matched <= offset:
                continue
            if len(runs) == limit:
                more = True
                break
            row.pop("new", None)  # the index's creation marker; the rest is a RunRow
            runs.append(cast(RunRow, row))
        complete = more or indexed_runs == self.store.count_runs()
        next_cursor = str(offset + limit) if more else None
        return RunPage(runs=runs, next_cursor=next_cursor, total_matching=None if more else matched), complete

    def _fresh_row(self, row: dict[str, Any]) -> dict[str, Any]:
        # Live rows come from the record itself: it has the current step and the liveness check.
        # So do "unknown" ones, in case the record has become readable (permissions fixed).
        try:
            return dict(row_of(self.get(row["run_id"])))
        except StoreCorrupt as exc:  # moved aside just now: the next listing rebuilds the index
            return {**row, "status": UNKNOWN_STATUS, "note": exc.message}
        except (StoreError, RunNotFound, UsageError):
            return row

    def stop(self, run_id: str, *, force: bool = False) -> RunRecord:
        """Ask the run to stop gracefully (or kill it at once with force)."""
        record = self.get(run_id)
        if record["status"] not in ACTIVE_STATES:
            raise RunStateError(f"run {run_id} has already ended ({record['status']}); nothing to stop")
        # First the request in the run folder, then the signal to whatever supervisor is known by
        # then: a supervisor reads this file after making its pid known, so a stop at any moment
        # of a launch reaches it one way or the other (see `Supervisor.run`).
        requested = self._request_stop(record, force)
        supervisor = self._supervisor(self.store.read(run_id))
        if supervisor is None and not requested:
            raise RunStateError(f"run {run_id} is still launching; try again in a moment")
        if supervisor is not None:
            self.backend.stop(supervisor, force=force)
        with contextlib.suppress(StoreError):  # the stop is on its way; a full disk loses only this note
            self.store.append_event(run_id, {"type": "stop_requested", "force": force})
        if force and supervisor is not None and not self._ended_by_supervisor(run_id, supervisor):
            with self.store.run_lock(run_id):
                record = self.store.read(run_id)
                if record["status"] in ACTIVE_STATES:
                    self._mark_lost(
                        record,
                        status="stopped",
                        reason="stop_requested",
                        why="killed by a forced stop: its supervisor did not act on it",
                    )
        return self.get(run_id)

    def _request_stop(self, record: RunRecord, force: bool) -> bool:
        request = {"attempt": record["attempt"], "force": force, "at": now_iso()}
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

    def logs(self, run_id: str, *, tail: int = 100, attempt: int | None = None) -> LogTail:
        """The last lines of a run's log (bounded)."""
        record = self.get(run_id)
        if isinstance(tail, bool) or not isinstance(tail, int) or not 1 <= tail <= MAX_LOG_TAIL:
            raise UsageError(f"tail must be a whole number from 1 to {MAX_LOG_TAIL}, got {tail!r}")
        which = record["attempt"] if attempt is None else attempt
        if not 1 <= which <= record["attempt"]:
            raise UsageError(f"run {run_id} has attempts 1 to {record['attempt']}; got attempt {which}")
        path = self.backend.log_path(self.store, run_id, which)
        raw = tail_lines(path, tail + 1)
        lines = [line.decode("utf-8", "replace")[:MAX_LOG_LINE_CHARS] for line in raw]
        truncated = len(lines) > tail
        return LogTail(run_id=run_id, attempt=which, lines=lines[-tail:], truncated=truncated, path=str(path))

    def compare(self, run_ids: Sequence[str], *, metric: str = "loss") -> Comparison:
        """Runs side by side on one metric."""
        from backprop_mcp.runs.compare import compare_runs

        return compare_runs(self.get, run_ids, metric)

    def import_legacy(self, path: Path | None = None) -> ImportReport:
        """Import the seed's ~/.backprop/experiments.json."""
        from backprop_mcp.runs.legacy import import_experiments

        source = path or Path(self.env.get("HOME", str(Path.home()))) / ".backprop" / "experiments.json"
        return import_experiments(self.store, source)


def _check_python(python: str | None, cwd: Path, env: Mapping[str, str]) -> str | None:
    """An interpreter given as an option or argument, checked before anything is stored: a path
    (relative to the script's working directory, as the script's own paths are) must be an
    executable file, a bare name must be found on PATH. Returns what to store."""
    if python is None:
        return None
    if not python.strip() or "\0" in python:
        raise UsageError("the interpreter (--python) is empty or contains a NUL byte")
    if os.sep not in python and not (os.altsep and os.altsep in python):
        if shutil.which(python, path=env.get("PATH", os.defpath)) is None:
            raise UsageError(
                f"interpreter {python!r} was not found on PATH; give its path, "
                "e.g. --python .venv/bin/python or --python /usr/bin/python3"
            )
        return python
    path = cwd / os.path.expanduser(python)
    if not path.is_file():
        raise UsageError(f"interpreter {str(path)!r} does not exist or is not a file")
    if not os.access(path, os.X_OK):
        raise UsageError(f"interpreter {str(path)!r} is not executable")
    return str(path)


def _resolve_script(script: str, cwd: Path) -> Path:
    if not script or "\0" in script:
        raise UsageError("the script path is empty or contains a NUL byte")
    path = Path(script).expanduser()
    path = path if path.is_absolute() else cwd / path
    path = Path(os.path.normpath(path))
    if not path.exists():
        raise UsageError(f"script not found: {path}")
    if not path.is_file():
        raise UsageError(f"the script must be a file, but {path} is not")
    return path


def _new_run_id(name: str | None) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name or "").strip("-")[:40].lower() or "run"
    import secrets

    return f"{slug}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def _age(iso: str) -> float:
    at = parse_iso(iso)
    return time.time() - at if at is not None else float("inf")
