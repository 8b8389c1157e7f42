"""The supervisor's state and record keeping, shared by its phases: the run's record and history
(written at a bounded rate, surviving a full disk), the signal handlers that turn a stop into a
flag the loops read, and the summary of an attempt when it closes. See `run.Supervisor`."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import secrets
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from backprop_mcp.core.errors import StoreError
from backprop_mcp.core.records import AttemptSummary, RunRecord
from backprop_mcp.core.settings import Settings
from backprop_mcp.core.store import STOP_REQUEST_FILE, Store
from backprop_mcp.governor import decisions, proctree
from backprop_mcp.governor.admission import Admission
from backprop_mcp.governor.probe_choice import make_probe
from backprop_mcp.governor.probes import SystemProbe
from backprop_mcp.runs.history import history_path
from backprop_mcp.runs.launch import (
    HELD_SIGNALS,
    limits_of,
)
from backprop_mcp.runs.progress import Progress
from backprop_mcp.runs.recorder import Recorder
from backprop_mcp.runs.runlog import RunLog

log = logging.getLogger("backprop_mcp.runs.supervisor")

# When the outcome cannot be recorded (a full disk), retry every few seconds for this long before
# giving up: the record then stays "running" and the next reader marks it lost, which is truthful.
FINAL_WRITE_SECONDS = 300.0
FINAL_WRITE_RETRY_SECONDS = 2.0
# The metric history is rewritten at most this often while values arrive (and always when the
# attempt ends). Its file can hold ~65 metrics of 1,000 points, so a write costs milliseconds and
# an fsync: every 2 s keeps that negligible, and a supervisor killed mid-run loses at most the
# last 2 s of points (its record, written every second, still holds the latest values).
HISTORY_INTERVAL_SECONDS = 2.0


class SupervisorBase:
    """One attempt of one run: its state, its record and its signals."""

    # Whether this supervisor captures its attempt's code and environment before the script starts
    # (a cluster job's does not: the submitting side did, where the project's .git is).
    capture_code = True

    def __init__(self, store: Store, run_id: str, probe: SystemProbe | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self.record: RunRecord = store.read(run_id)
        self.options: dict[str, Any] = self.record["options"]
        self.settings = Settings(**{k: v for k, v in self.options.items() if k in Settings._fields})
        self.limits = limits_of(self.settings)
        # The machine-wide CPU sample cache: the starter primed it at launch, so the first
        # admission gets a measured load at once instead of blocking for a fresh sample.
        self.probe = probe or make_probe(
            self.settings.gpu_probe, cpu_cache=store.governor_dir / "cpu_sample.json"
        )
        self.sample_interval = sample_interval()
        self.admission = Admission(store.governor_dir)
        self.progress = Progress(self.record)
        self.history = Recorder(
            history_path(store, run_id, self.record["attempt"]), run_id, self.record["attempt"]
        )
        self.history_at = 0.0
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        self.stop_reason: str | None = None  # stop_requested, deadline, wall_clock_cap, gpu_memory_limit
        self.stop_acted = False  # the stop signal (or a kill) was sent while the script still ran
        self.box_used: float | None = None  # share of the time box (wall clock) when the script exited
        self.kill_now = False
        self.dirty = False
        self.store_failing = False
        self.last_write = 0.0
        self.bad_lines = 0
        self.proc: subprocess.Popen[bytes] | None = None
        # Run in the script's process between fork and exec (a job's supervisor ties the script's
        # life to its own); None locally, where the run's ledger lets a reader end an orphan.
        self.script_preexec: Callable[[], None] | None = None
        # Reads the attempt's environment once its script started (see `capture`).
        self.env_reader: threading.Thread | None = None
        # Processes of the supervisor's own below it (that reader's interpreter), not the run's:
        # never signalled, paused or counted with the run's tree.
        self.helper_pids: set[int] = set()
        self.output: RunLog | None = None
        self.started_epoch = 0.0
        self.cpu_watch: dict[int, psutil.Process] = {}
        # The latest error of the run queue itself (a full disk, a lock path that is not a file),
        # until an operation succeeds again: the queue timeout counts through errors as through waits.
        self.queue_error: str | None = None
        me = psutil.Process()
        self.owner = (me.pid, me.create_time())
        # Unique to this attempt of this run of this store: how a later cleanup tells the run's
        # processes from any other (another store may run a script under the same run id).
        self.token = secrets.token_hex(16)
        self.ledger_file = proctree.ledger_path(store.run_dir(run_id), self.record["attempt"])
        self.ledger = proctree.Ledger(token=self.token, supervisor=self.owner)
        self.ledger_at = 0.0
        self.leftovers_ended = 0

    # -- signals ----------------------------------------------------------------------------------

    def install_signals(self) -> None:
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_kill)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # A handler (not SIG_DFL) so that SIGCHLD wakes the select loop through the wakeup fd.
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        # Started with these blocked (launch.HELD_SIGNALS): a stop sent before this point was kept
        # pending, and is handled now instead of having killed a supervisor without handlers.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)

    def _stop_request(self) -> dict[str, Any] | None:
        """The stop request `stop` left in the run folder for this attempt, if any."""
        path = self.store.run_dir(self.run_id) / STOP_REQUEST_FILE
        try:
            request = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            return None
        if isinstance(request, dict) and request.get("attempt") == self.record["attempt"]:
            return request
        return None

    def _read_stop_request(self) -> None:
        """Honour a stop that `stop` left in the run folder before this supervisor's pid was known."""
        request = self._stop_request()
        if request is not None:
            self.stop_reason = self.stop_reason or "stop_requested"
            self.kill_now = self.kill_now or request.get("force") is True

    def _requested_reason(self, reason: str | None) -> tuple[str | None, str | None]:
        """The stop reason to record, and its words: a requested stop whose request names a sweep's
        early stop (`stop(..., pruned=why)`) is `pruned`. The request file says so, not the signal,
        because a signal carries no reason."""
        if reason != "stop_requested":
            return reason, None
        request = self._stop_request()
        if request is not None and request.get("reason") == "pruned":
            detail = request.get("detail")
            return "pruned", detail if isinstance(detail, str) else None
        return reason, None

    def _on_stop(self, signum: int, frame: object) -> None:
        if self.stop_reason is None:
            self.stop_reason = "stop_requested"

    def _on_kill(self, signum: int, frame: object) -> None:
        self.stop_reason = self.stop_reason or "stop_requested"
        self.kill_now = True

    def _wait(self, timeout: float) -> list[tuple[selectors.SelectorKey, int]]:
        events = self.selector.select(max(timeout, 0.0))
        for key, _ in events:
            if key.data == "wake":
                with contextlib.suppress(BlockingIOError):
                    while os.read(self.wake_r, 512):
                        pass
        return events

    # -- record ---------------------------------------------------------------------------------

    def write(self, *, index: bool = False) -> bool:
        """Replace the stored record; False when the store cannot be written (full, read-only)."""
        self.record["bad_event_lines"] = self.bad_lines
        self.last_write = time.monotonic()
        try:
            self.store.write(self.record, index=index)
        except StoreError as exc:
            # A full or read-only disk must not end the supervision (that would orphan the script):
            # the last good record stays on disk and the write is retried while the record is dirty.
            self._store_failed(exc)
            self.dirty = True
            return False
        if self.store_failing:
            self.store_failing = False
            log.warning("run %s: the store is writable again", self.run_id)
        self.dirty = False
        return True

    def write_history(self) -> None:
        """Replace the attempt's metric history; a store that cannot be written keeps it dirty
        (retried at the next interval), never ends the run."""
        self.history_at = time.monotonic()
        try:
            self.history.write()
        except StoreError as exc:
            self._store_failed(exc)

    def event(self, entry: dict[str, Any]) -> None:
        """Append to the run's history; a store that cannot be written loses the entry, not the run."""
        try:
            self.store.append_event(self.run_id, entry)
        except StoreError as exc:
            self._store_failed(exc)

    def _store_failed(self, exc: StoreError) -> None:
        if not self.store_failing:  # once per outage, not once per line of a chatty script
            self.store_failing = True
            log.warning("run %s: %s; the run goes on and the record is retried", self.run_id, exc.message)

    def set_state(self, status: str, detail: str | None = None, **extra: Any) -> None:
        self.record["status"] = status
        self.record["status_detail"] = detail
        self.record["attempts"][-1]["status"] = status
        # The event before the record (and `Store.write` puts the index row before it too): a
        # reader who sees the new state, a final one above all, finds its history complete.
        self.event({"type": "state", "status": status, "detail": detail, **extra})
        self.write(index=True)

    def write_final(self) -> None:
        """Record the outcome, retrying for a bounded time while the store cannot be written."""
        deadline = time.monotonic() + FINAL_WRITE_SECONDS
        while self.dirty and time.monotonic() < deadline:
            self._wait(FINAL_WRITE_RETRY_SECONDS)
            self.write(index=True)

    def capture(self) -> None:
        """Record which code and environment the attempt runs (`runs.provenance`): bounded, and a
        failure is logged, never the run's end."""
        from backprop_mcp.runs import provenance

        try:
            code = provenance.capture(self.store, self.record, os.environ, with_env=False)
        except (OSError, StoreError, ValueError) as exc:
            log.warning("run %s: its code snapshot could not be kept: %s", self.run_id, exc)
            return
        provenance.keep(self.record, code)
        self.env_reader = threading.Thread(
            target=self._read_environment, args=(copy.deepcopy(self.record),), name="environment", daemon=True
        )

    def _read_environment(self, record: RunRecord) -> None:
        """The environment part of the provenance, on its own thread once the script has started
        (`start_environment_reader`); it writes only the attempt's provenance file."""
        from backprop_mcp.runs import provenance

        try:
            provenance.add_environment(self.store, record, os.environ, on_spawn=self.helper_pids.add)
        except (OSError, StoreError, ValueError) as exc:
            log.warning("run %s: its environment could not be kept: %s", self.run_id, exc)

    def start_environment_reader(self) -> None:
        """Read the environment beside the script, which must not wait for it (called after the
        script's start: a thread before a fork with preexec_fn would be unsafe)."""
        if self.env_reader is not None:
            self.env_reader.start()

    def join_environment_reader(self) -> None:
        """Wait for the environment reader (bounded): before the run's leftovers are ended, since
        its interpreter is below the supervisor too, and before the final state."""
        from backprop_mcp.runs.provenance import ENV_PROBE_SECONDS

        if self.env_reader is not None and self.env_reader.is_alive():
            self.env_reader.join(ENV_PROBE_SECONDS + 1.0)

    def _close_attempt(self, status: str) -> None:
        record = self.record
        summary: AttemptSummary = record["attempts"][-1]
        summary.update(
            {
                "status": status,
                "ended_at": record["ended_at"],
                "termination_reason": record["termination_reason"],
                "exit_code": record["exit_code"],
                "signal": record["signal"],
                "step": record["step"],
                "loss": record["loss"],
            }
        )
        if record["step"] is not None or record["loss"] is not None or record["metrics"]:
            self.event(
                {
                    "type": "sample",
                    "step": record["step"],
                    "loss": record["loss"],
                    "metrics": record["metrics"],
                },
            )


def sample_interval() -> float:
    """The sampling interval; BACKPROP_SAMPLE_INTERVAL_SECONDS shrinks it (tests, fast reactions)."""
    raw = os.environ.get("BACKPROP_SAMPLE_INTERVAL_SECONDS", "")
    try:
        value = float(raw)
    except ValueError:
        return decisions.SAMPLE_INTERVAL_SECONDS
    return value if 0.05 <= value <= 3600 else decisions.SAMPLE_INTERVAL_SECONDS
