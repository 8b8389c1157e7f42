"""The use-cases of backprop-mcp (start, resume, status, list, stop, logs, compare, plot, import):
`Service`, the one API that the CLI and the MCP server both call. Starting and resuming live here;
reading, listing and stopping are inherited from `control.RunControl`, logs, metrics, curves and
code from `views.RunViews`."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from backprop_mcp.backends.choice import of_record, remote_backend
from backprop_mcp.core import notebook
from backprop_mcp.core.answers import DryRun
from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.errors import (
    NoCheckpoint,
    RunStateError,
    StoreError,
    UsageError,
)
from backprop_mcp.core.ids import check_run_id
from backprop_mcp.core.machine import Decision
from backprop_mcp.core.records import (
    ACTIVE_STATES,
    RunRecord,
    close_attempt,
    new_attempt,
    new_record,
    row_of,
)
from backprop_mcp.core.settings import Settings
from backprop_mcp.core.store import STOP_REQUEST_FILE, SUPERVISOR_PID_FILE
from backprop_mcp.governor import decisions
from backprop_mcp.governor.admission import Admission
from backprop_mcp.governor.probe_choice import make_probe
from backprop_mcp.runs import confine
from backprop_mcp.runs.confine import check_allowed
from backprop_mcp.runs.detect import detect_framework
from backprop_mcp.runs.launch import (
    choose_python,
    command,
    contract_env,
    limits_of,
)
from backprop_mcp.runs.notes import start_entry
from backprop_mcp.runs.requests import (
    RunRequest,
    check_python,
    new_run_id,
    refuse_a_finished_run,
    resolve_script,
)
from backprop_mcp.runs.views import RunViews


class Service(RunViews):
    """The use-cases over one store. Cheap to construct; holds no open resources."""

    # -- starting ---------------------------------------------------------------------------------

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
                # A missing script is the error to report first; its folder is listed only where
                # the roots were checked (the configured roots need settings, read from the cwd).
                resolve_script(request.script, cwd, () if allowed_roots is None else allowed_roots)
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
        roots = (
            list(allowed_roots)
            if allowed_roots is not None
            else ([Path(r) for r in settings.allowed_roots] if settings.allowed_roots else None)
        )
        script = resolve_script(request.script, cwd, roots)
        if roots is not None:
            check_allowed(script, roots)
        run_id = check_run_id(request.run_id) if request.run_id is not None else new_run_id(request.name)
        if request.name is not None and (len(request.name) > 200 or "\0" in request.name):
            raise UsageError("a run name must be at most 200 characters, without NUL bytes")
        if any("\0" in a for a in request.args):
            raise UsageError("script arguments cannot contain NUL bytes")
        start_entry(request)  # bad tags or note: refused before anything is stored
        resume_from = None
        if request.resume_from:
            resume_path = Path(request.resume_from).expanduser()
            resume_path = resume_path if resume_path.is_absolute() else cwd / resume_path
            if not resume_path.exists():
                raise UsageError(f"checkpoint to resume from does not exist: {resume_path}")
            resume_from = str(resume_path)
        given_python = check_python(request.python, cwd, self.env)
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
            framework=detect_framework(script, settings.framework, self.env),
            max_run_minutes=settings.max_run_minutes,
            max_wall_minutes=settings.wall_minutes,
            attempts=[new_attempt(1, resume_from)],
            resume_from=resume_from,
            options=settings.as_options(),
            config_files=list(settings.sources),
        )
        if request.sweep is not None:
            record["sweep"] = request.sweep
        return record, settings

    def check(self, request: RunRequest, *, allowed_roots: Sequence[Path] | None = None) -> RunRecord:
        """The record `start` would create, with every check `start` makes; starts and stores nothing."""
        return self._prepare(request, allowed_roots)[0]

    def start(self, request: RunRequest, *, allowed_roots: Sequence[Path] | None = None) -> RunRecord:
        """Create the run and launch its supervisor; returns the record at once (queued or running,
        or `rejected` when queueing was refused and the governor said no)."""
        record, settings = self._prepare(request, allowed_roots)
        noted = start_entry(request)
        if not settings.queue:
            decision = self._decide(settings)
            if not decision["allowed"]:
                self._create_rejected(record, "; ".join(decision["reasons"]), noted)
                return record
        since = self._create(record, noted)
        try:
            self._launch(record["run_id"])
        except BaseException:
            self.store.remove_run(record["run_id"], since)
            raise
        return self._launched(record["run_id"])

    def _create(self, record: RunRecord, noted: Mapping[str, object] | None = None) -> int:
        """Store a new run, all of it or none of it (record, index row, first event, the notebook's
        first line when `noted`); returns
        where its index rows start, for `Store.remove_run` if the launch then fails."""
        since = self.store.index_size()
        self.store.create(record)  # an id already taken fails here, before anything is ours to undo
        try:
            self.store.index_append(row_of(record), new=True)
            self.store.append_event(
                record["run_id"],
                {"type": "created", "status": record["status"], "detail": record["status_detail"]},
            )
            if noted is not None:
                notebook.write(self.store, record["run_id"], record["created_at"], noted)
        except BaseException:
            self.store.remove_run(record["run_id"], since)
            raise
        return since

    def _create_rejected(
        self, record: RunRecord, why: str, noted: Mapping[str, object] | None = None
    ) -> None:
        """Store a run the governor refused at once: created queued like any run, then ended, its
        history and index row before its final record (a reader who sees it `rejected` sees all
        of it); all of it or none of it."""
        since = self._create(record, noted)
        try:
            close_attempt(record, "rejected", "rejected", why, now_iso())
            self.store.append_event(record["run_id"], {"type": "state", "status": "rejected", "detail": why})
            self.store.write(record)
        except BaseException:
            self.store.remove_run(record["run_id"], since)
            raise

    def _absolute(self, path: str) -> Path:
        """A path option as the caller means it: relative to the caller's working directory."""
        given = Path(os.path.expanduser(path))
        return given if given.is_absolute() else self.cwd / given

    def _launch(self, run_id: str) -> None:
        """Submit the run's current attempt to its backend, all or nothing (see `Backend.submit`)."""
        remote = of_record(self.store.read(run_id)["options"])
        (remote or self.backend).submit(self.store, run_id, self.env)

    def _launched(self, run_id: str) -> RunRecord:
        """The record of a run just launched. Queued, it says its place in the queue: the ticket
        was taken at launch, before its supervisor first wrote the record."""
        record = self.store.read(run_id)
        if record["status"] == "queued" and record["queue_position"] is None:
            with contextlib.suppress(StoreError, OSError):  # the place is a courtesy; the run is on
                record["queue_position"] = Admission(self.store.governor_dir).position(run_id)
        return record

    def _decide(self, settings: Settings) -> Decision:
        self.store.ensure()
        remote = remote_backend(settings.backend, settings.ray_address)
        if remote is not None:  # the cluster's resources decide, not this machine's
            return remote.decide(self.store, settings)
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
        python = check_python(python, new_cwd, self.env)
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
            if of_record(record["options"]) is not None and not from_scratch and record["checkpoints"]:
                # Written on the cluster: its job looks for the newest one that exists there.
                checkpoint = record["checkpoints"][-1]["path"]
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
            if args is None and not from_scratch:
                refuse_a_finished_run(record)
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
            from backprop_mcp.runs.provenance import note_code_change

            note_code_change(record)
            record.pop("job_id", None)  # the new attempt's job is not submitted yet
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
        return self._launched(run_id)

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

    def rerun(self, ref: str, *, name: str | None = None, run_id: str | None = None) -> RunRecord:
        """A new run of an attempt's (RUN or RUN:N) script snapshot, arguments and options; from its
        stored copy when the script changed since (`runs.reproduce`, docs/cli.md#rerun)."""
        from backprop_mcp.runs import reproduce

        old, attempt, copies = reproduce.snapshot_of(self.get, self.store, ref)
        options = {k: v for k, v in old["options"].items() if v is not None}
        python = old["python"] if old["python_source"] == "option" else None
        name = old["name"] if name is None else name  # a rerun goes by its original's name unless renamed
        request = RunRequest(old["script"], old["args"], name, run_id, old["cwd"], python, options=options)
        record = self._prepare(request, None)[0]
        reproduce.adopt(self.store, record, old, attempt, copies)
        since = self._create(record)
        try:
            reproduce.place(self.store, record, copies)
            self._launch(record["run_id"])
        except BaseException:
            self.store.remove_run(record["run_id"], since)
            raise
        return self._launched(record["run_id"])
