"""Folding a Ray job's log into the submitting store (docs/cluster.md): the marked lines its
supervisor printed (`runs.joblog`) become the run's record, events, log and metric history here,
through the same code a local run's supervisor uses, so every reader (status, list, logs, metrics,
compare, sweeps) reads a ray run exactly as it reads a local one.

A fold reads from where the previous one stopped (`consumed`, in characters of the job log), and
only complete lines, so two reads never add a line twice. The metric history is rebuilt from all of
the attempt's stdout lines whenever new ones came: the same `Recorder`, fed the same lines, keeps
the same points as the supervisor's own.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, NamedTuple, cast

from backprop_mcp.core.errors import StoreError
from backprop_mcp.core.files import atomic_write
from backprop_mcp.core.records import AttemptSummary, RunRecord
from backprop_mcp.core.store import Store
from backprop_mcp.runs import joblog
from backprop_mcp.runs.events import LineSplitter, parse_line, plain_runs
from backprop_mcp.runs.history import history_path
from backprop_mcp.runs.recorder import Recorder
from backprop_mcp.runs.runlog import RunLog

# The fields of a run's record that its supervisor on the cluster owns; the rest (the run's name,
# its script and folder here, its options, the attempts before this one) stay as this store has them.
CLUSTER_FIELDS = (
    "status",
    "status_detail",
    "started_at",
    "ended_at",
    "deadline",
    "step",
    "total",
    "loss",
    "metrics",
    "eta_seconds",
    "checkpoints",
    "latest_checkpoint",
    "exit_code",
    "signal",
    "termination_reason",
    "resume_from",
    "gpu",
    "cuda_visible_devices",
    "paused_seconds",
    "bad_event_lines",
    "python",
    "python_source",
)
SUPERVISOR_LOG = "supervisor.log"
SCRIPT_KINDS = frozenset("oeOE")
STDOUT_KINDS = frozenset("oO")


class Folded(NamedTuple):
    """What one fold found: the supervisor's newest record (None when it printed none), and its
    process on the node (pid, start time) when known."""

    record: dict[str, Any] | None
    supervisor: tuple[int, float | None] | None
    consumed: int


def fold(store: Store, record: RunRecord, text: str, consumed: int, token: str, *, final: bool) -> Folded:
    """Fold the job log `text` past `consumed` into the store: log lines into the attempt's log,
    events into the run's events, the supervisor's own lines into its log; returns the newest record
    the supervisor printed. Only complete lines, unless the job has ended (`final`)."""
    run_id, attempt = record["run_id"], record["attempt"]
    chunk = text[consumed:]
    if not final:
        chunk = chunk[: chunk.rfind("\n") + 1]
    if not chunk:
        return Folded(None, None, consumed)
    newest: dict[str, Any] | None = None
    history: dict[str, Any] | None = None
    output: list[bytes] = []
    notes: list[bytes] = []
    stdout_seen = False
    for kind, payload in joblog.lines(chunk, token):
        if kind in SCRIPT_KINDS:
            output.append(joblog.output(kind, payload) + b"\n")
            stdout_seen = stdout_seen or kind in STDOUT_KINDS
        elif kind in ("r", "v", "h"):
            try:
                data = json.loads(payload)
            except ValueError:
                notes.append(f"a bad {kind} line in the job log was skipped: {payload[:200]}\n".encode())
                continue
            if not isinstance(data, dict):
                continue
            if kind == "r":
                newest = data
            elif kind == "h":
                history = data
            else:
                with contextlib.suppress(StoreError):
                    store.append_event(run_id, data)
        else:
            notes.append(payload.encode("utf-8", "replace") + b"\n")
    if output:
        runlog = RunLog(store.log_path(run_id, attempt))
        try:
            for line in output:
                runlog.write(line)
        finally:
            runlog.close()
    if notes:
        with contextlib.suppress(StoreError, OSError):
            _append(store.run_dir(run_id) / SUPERVISOR_LOG, b"".join(notes))
    if history is not None:  # the supervisor's own, whole: the output did not all travel
        path = history_path(store, run_id, attempt)
        with contextlib.suppress(StoreError, OSError):
            path.parent.mkdir(mode=0o700, exist_ok=True)
            atomic_write(path, json.dumps(history, separators=(",", ":")).encode("utf-8"))
    elif stdout_seen:
        _rebuild_history(store, record, text, token)
    supervisor = None
    if newest is not None and isinstance(newest.get("supervisor_pid"), int):
        started = newest.get("supervisor_started")
        supervisor = (newest["supervisor_pid"], started if isinstance(started, float) else None)
    return Folded(newest, supervisor, consumed + len(chunk))


def merge(record: RunRecord, reported: dict[str, Any]) -> RunRecord:
    """The record with the cluster's fields of what its supervisor reported (of this attempt)."""
    if reported.get("attempt") != record["attempt"] or reported.get("run_id") != record["run_id"]:
        return record
    for name in CLUSTER_FIELDS:
        if name in reported:
            record[name] = reported[name]  # type: ignore[literal-required]
    attempts = reported.get("attempts")
    if isinstance(attempts, list) and attempts and isinstance(attempts[-1], dict):
        record["attempts"][-1] = cast(AttemptSummary, attempts[-1])
    record["queue_position"] = None
    return record


def _rebuild_history(store: Store, record: RunRecord, text: str, token: str) -> None:
    """The attempt's metric history from every stdout line of its job log so far."""
    recorder = Recorder(
        history_path(store, record["run_id"], record["attempt"]), record["run_id"], record["attempt"]
    )
    stdout = [
        joblog.output(kind, payload) for kind, payload in joblog.lines(text, token) if kind in STDOUT_KINDS
    ]
    splitter = LineSplitter()
    items = splitter.feed(b"\n".join(stdout) + b"\n")
    for item in plain_runs(items):
        if isinstance(item, tuple):
            recorder.observe_plain(*item)
            continue
        for event in parse_line(item).events:
            recorder.observe(event)
    with contextlib.suppress(StoreError):
        recorder.write()


def _append(path: os.PathLike[str], data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
