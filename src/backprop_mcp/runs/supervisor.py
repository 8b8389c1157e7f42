"""The per-run supervisor process (DESIGN §3): waits in the queue, starts the script, drains its
output, enforces the time box, pauses and resumes it, and records the truthful outcome.

Started detached by `local.spawn_supervisor` as `python -m backprop_mcp.runs.supervisor HOME RUN_ID`.
It is the only writer of its run's record while it lives. Stdlib plus psutil only, for a fast start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import select
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.errors import BackpropError, StoreError
from backprop_mcp.core.machine import Decision, SystemSnapshot
from backprop_mcp.core.records import AttemptSummary, RunRecord
from backprop_mcp.core.settings import Settings
from backprop_mcp.core.store import STOP_REQUEST_FILE, Store
from backprop_mcp.governor import decisions, proctree
from backprop_mcp.governor.admission import Admission
from backprop_mcp.governor.probe_choice import make_probe
from backprop_mcp.governor.probes import SystemProbe
from backprop_mcp.runs.events import LineSplitter, ProgressEvent, is_plain_progress, parse_line
from backprop_mcp.runs.launch import (
    AWAIT_GO_FLAG,
    GO,
    HELD_SIGNALS,
    command,
    contract_env,
    gpu_memory_limit_mb,
    limits_of,
)
from backprop_mcp.runs.outcome import classify, describe
from backprop_mcp.runs.progress import Progress
from backprop_mcp.runs.runlog import RunLog

log = logging.getLogger("backprop_mcp.runs.supervisor")

# The record is rewritten at most this often while a script prints: a flood of progress lines
# costs a bounded number of writes per second, not one per line.
RECORD_INTERVAL_SECONDS = 1.0
# How often a queued run retries admission: short, so a freed slot is taken within ~0.1 s.
QUEUE_POLL_SECONDS = 0.1
# After a storage error in the queue (full disk, lock timeout), retry this much later.
QUEUE_RETRY_SECONDS = 1.0
# A queued run's snapshot of the machine is reused this long: probing a GPU costs a subprocess.
QUEUE_SNAPSHOT_MAX_AGE = 1.0
# After the stop signal's grace, SIGTERM gets this long before SIGKILL: the script already had the
# whole grace to checkpoint; SIGTERM is a last courtesy for libraries that clean up on it.
TERM_GRACE_SECONDS = 0.5
# When the script has exited, processes it left behind get this long after SIGTERM.
LEFTOVER_GRACE_SECONDS = 1.0
# After the last process is gone, wait at most this long for its pipes to reach EOF.
PIPE_DRAIN_SECONDS = 2.0
READ_CHUNK = 64 * 1024
# After a read that returned output, wait this long before the next one (see `supervise`).
OUTPUT_BATCH_SECONDS = 0.002
# When the outcome cannot be recorded (a full disk), retry every few seconds for this long before
# giving up: the record then stays "running" and the next reader marks it lost, which is truthful.
FINAL_WRITE_SECONDS = 300.0
FINAL_WRITE_RETRY_SECONDS = 2.0
# Bad event lines noted in the supervisor log and the history (the rest are only counted).
MAX_BAD_LINES_LOGGED = 20
# How long a new supervisor waits for its starter's go: the starter writes a few small files in
# between, so a minute means it hung or died; the pid file then decides (see `_await_go`).
GO_WAIT_SECONDS = 60.0
# While output arrives, the ledger of the run's processes is refreshed at most this often: a
# process the script starts is usually recorded before it could kill its supervisor, at the cost
# of one scan of the process table per interval.
LEDGER_INTERVAL_SECONDS = 0.25
# A running supervisor looks at the other runs' slots at each sample (a dead or wedged supervisor's
# run is ended then), waiting at most this long for the queue lock so its own run never stalls.
PRUNE_LOCK_SECONDS = 0.05


class Supervisor:
    """One attempt of one run, from queue to final record."""

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
        self.sample_interval = _sample_interval()
        self.admission = Admission(store.governor_dir)
        self.progress = Progress(self.record)
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

    def _read_stop_request(self) -> None:
        """Honour a stop that `stop` left in the run folder before this supervisor's pid was known."""
        path = self.store.run_dir(self.run_id) / STOP_REQUEST_FILE
        try:
            request = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(request, dict) and request.get("attempt") == self.record["attempt"]:
            self.stop_reason = self.stop_reason or "stop_requested"
            self.kill_now = self.kill_now or request.get("force") is True

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
        self.write(index=True)
        self.event({"type": "state", "status": status, "detail": detail, **extra})

    def write_final(self) -> None:
        """Record the outcome, retrying for a bounded time while the store cannot be written."""
        deadline = time.monotonic() + FINAL_WRITE_SECONDS
        while self.dirty and time.monotonic() < deadline:
            self._wait(FINAL_WRITE_RETRY_SECONDS)
            self.write(index=True)

    # -- queue ----------------------------------------------------------------------------------

    def queue(self) -> Decision | None:
        """Wait for admission; returns the decision, or None when the run must not start."""
        me = psutil.Process()
        timeout = self.settings.queue_timeout_minutes * 60
        began = time.monotonic()
        self._join(me)
        snapshot: SystemSnapshot | None = None
        taken = 0.0
        shown: tuple[int | None, tuple[str, ...], str | None] | None = None
        promise = self.limits["gpu_min_free_vram_mb"]
        reasons: tuple[str, ...] = ()
        while True:
            if self.stop_reason:
                self._release()
                self.finish_without_start("stopped", "stop_requested", "stopped while queued")
                return None
            if snapshot is None or time.monotonic() - taken > QUEUE_SNAPSHOT_MAX_AGE:
                snapshot, taken = self.probe.snapshot(), time.monotonic()
            current = snapshot

            def decide(active: list[Any], snap: SystemSnapshot = current) -> Decision:
                return decisions.evaluate(snap, self.limits, active, now=time.time())

            position: int | None = None
            try:
                admitted, decision, position = self.admission.try_admit(
                    self.run_id,
                    decide,
                    vram_promise_mb=promise,
                    owner=self.owner,
                    token=self.token,
                    ledger=str(self.ledger_file),
                )
            except (OSError, StoreError) as exc:
                # A full disk or a lock timeout must not kill a queued run: wait and try again.
                self._queue_failed(exc)
            else:
                self.queue_error = None
                if admitted:
                    # None: this run already held a slot (a retry after admission); decide again for the GPU.
                    return decision or decisions.evaluate(current, self.limits, [], now=time.time())
                if decision is None and position is None:
                    self._join(me)  # our ticket was lost: rejoin
                reasons = tuple(decision["reasons"]) if decision else ()
                if decision is not None and not self.settings.queue:
                    self._release()
                    self.finish_without_start("rejected", "rejected", "; ".join(reasons))
                    return None
            if (position, reasons, self.queue_error) != shown:
                shown = (position, reasons, self.queue_error)
                self.record["queue_position"] = position
                ahead = f"position {position} in the queue" if position else "in the queue"
                holds = [f"the run queue cannot be used: {self.queue_error}"] if self.queue_error else []
                holds += reasons
                self.record["status_detail"] = f"{ahead}: {'; '.join(holds)}" if holds else ahead
                self.write()
            if time.monotonic() - began >= timeout:
                self._release()
                waited = f"waited {timeout / 60:g} min in the queue"
                if self.queue_error:
                    detail = f"{waited}; the run queue could not be used: {self.queue_error}"
                    self.finish_without_start("failed", "queue_error", detail)
                else:
                    why = "; ".join(reasons) or "other runs ahead"
                    self.finish_without_start("rejected", "queue_timeout", f"{waited}: {why}")
                return None
            pause = QUEUE_RETRY_SECONDS if self.queue_error else QUEUE_POLL_SECONDS
            self._wait(min(pause, max(timeout - (time.monotonic() - began), 0.0)))

    def _queue_failed(self, exc: Exception) -> None:
        text = exc.message if isinstance(exc, BackpropError) else str(exc)
        if text != self.queue_error:  # once per distinct error, not once per retry
            log.warning("run %s: the run queue cannot be used (%s); retrying", self.run_id, text)
        self.queue_error = text

    def _release(self) -> None:
        """Give back this run's ticket or slot. A queue that cannot be used must not crash the
        supervisor here: the outcome still gets recorded, and the dead process's ticket or slot
        is dropped by the next admission that can read the queue."""
        try:
            self.admission.release(self.run_id, self.owner)
        except (OSError, StoreError) as exc:
            log.warning("run %s: could not release its place in the run queue (%s)", self.run_id, exc)

    def _join(self, me: psutil.Process) -> bool:
        try:
            self.admission.join(self.run_id, *self.owner)
        except (OSError, StoreError) as exc:
            self._queue_failed(exc)
            return False
        return True

    def finish_without_start(self, status: str, reason: str, detail: str) -> None:
        record = self.record
        record["termination_reason"] = reason
        record["ended_at"] = now_iso()
        record["queue_position"] = None
        self._close_attempt(status)
        self.set_state(status, detail, reason=reason)

    # -- running ----------------------------------------------------------------------------------

    def start(self, decision: Decision) -> bool:
        record = self.record
        if self.stop_reason:  # a stop between admission and here: the script never starts
            self._release()
            self.finish_without_start("stopped", "stop_requested", "stopped before the script started")
            return False
        record["gpu"] = decision["gpu"] if self.limits["use_gpu"] else None
        started = time.time()
        deadline = started + record["max_run_minutes"] * 60
        env = dict(os.environ)
        env.update(contract_env(record, self.store.run_dir(self.run_id), deadline))
        env[proctree.TOKEN_ENV] = self.token
        # The ledger exists before the script does: a supervisor killed at any moment after this
        # leaves the token and the run's end for the cleanup.
        self.ledger = self.ledger._replace(
            must_end_by=self._must_end_by(started, paused=False, paused_total=0.0)
        )
        proctree.write_ledger(self.ledger_file, self.ledger)
        record["cuda_visible_devices"] = (
            env.get("CUDA_VISIBLE_DEVICES") if record["gpu"] or not self.limits["use_gpu"] else None
        )
        action = "open the run's log"
        try:
            self.output = RunLog(self.store.log_path(self.run_id, record["attempt"]))
            action = f"start {record['python']}"
            self.proc = subprocess.Popen(
                command(record),
                cwd=record["cwd"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group: signals reach the whole tree
                close_fds=True,
            )
        except OSError as exc:
            self._release()
            self.finish_without_start("failed", "start_failed", f"could not {action}: {exc.strerror or exc}")
            return False
        record["script_pid"] = self.proc.pid
        self.started_epoch = started
        script_started = proctree.start_time(self.proc.pid)
        if script_started is not None:
            self.ledger = self.ledger._replace(script=(self.proc.pid, script_started))
            proctree.write_ledger(self.ledger_file, self.ledger)
        record["started_at"] = now_iso(started)
        record["deadline"] = now_iso(deadline)
        record["queue_position"] = None
        record["attempts"][-1]["started_at"] = record["started_at"]
        self.set_state("running", None, pid=self.proc.pid, gpu=record["cuda_visible_devices"])
        return True

    def supervise(self, proc: subprocess.Popen[bytes], output: RunLog) -> None:
        if proc.stdout is None or proc.stderr is None:
            raise RuntimeError("the script was started without pipes")  # Popen(PIPE) always has them
        splitter = LineSplitter()
        streams = {proc.stdout.fileno(): "out", proc.stderr.fileno(): "err"}
        for fd, name in streams.items():
            os.set_blocking(fd, False)
            self.selector.register(fd, selectors.EVENT_READ, name)
        box = self.record["max_run_minutes"] * 60
        wall_cap = self.settings.wall_minutes * 60
        began = time.monotonic()
        paused_at: float | None = None
        paused_total = 0.0
        next_sample = began + self.sample_interval
        stop_sent: float | None = None
        term_sent: float | None = None
        exited_at: float | None = None
        limit_mb = gpu_memory_limit_mb(self.options.get("gpu_memory_limit"), self.record["gpu"])
        own = psutil.Process()
        own.cpu_percent(None)
        # Until the script exits, not until its pipes close: a script may close both (as one that
        # sends its output elsewhere does) and work on; it is supervised all the same.
        while streams or exited_at is None:
            now = time.monotonic()
            running_for = now - began - paused_total - ((now - paused_at) if paused_at else 0.0)
            if exited_at is None and proc.poll() is not None:
                exited_at = now
                self.box_used = (time.time() - self.started_epoch) / box if box > 0 else None
                self._end_leftovers()
                if not streams:
                    break
            if exited_at is not None:
                if now - exited_at > PIPE_DRAIN_SECONDS:
                    break  # a process we could not kill still holds the pipes
            elif self.stop_reason is None:
                if running_for >= box:
                    self.stop_reason = "deadline"
                elif now - began >= wall_cap:
                    self.stop_reason = "wall_clock_cap"
            if exited_at is None and self.stop_reason is not None:
                # Acted on while the script still ran: only then does our reason name the outcome.
                self.stop_acted = True
                if paused_at is not None:
                    self._signal_tree(signal.SIGCONT)  # a stopped process cannot handle SIGINT
                    paused_total += now - paused_at
                    paused_at = None
                if self.kill_now:
                    self._signal_tree(signal.SIGKILL)
                elif stop_sent is None:
                    stop_sent = now
                    proctree.signal_group(proc.pid, getattr(signal, self.settings.stop_signal))
                    self.event(
                        {
                            "type": "stop_signal",
                            "reason": self.stop_reason,
                            "signal": self.settings.stop_signal,
                        },
                    )
                elif term_sent is None and now - stop_sent >= self.settings.grace_seconds:
                    term_sent = now
                    self._signal_tree(signal.SIGTERM)
                elif term_sent is not None and now - term_sent >= TERM_GRACE_SECONDS:
                    self._signal_tree(signal.SIGKILL)
            if exited_at is None and self.stop_reason is None and now >= next_sample:
                next_sample = now + self.sample_interval
                paused_at, paused_total = self._sample(own, paused_at, paused_total, limit_mb, now)
                self._update_ledger(paused=paused_at is not None, paused_total=paused_total)
                self._prune_others()
            if self.dirty and now - self.last_write >= RECORD_INTERVAL_SECONDS:
                self.write()
            timeout = self._next_timeout(now, running_for, box, next_sample, stop_sent, term_sent, exited_at)
            got_output = False
            for key, _ in self._wait(timeout):
                if key.data in ("out", "err"):
                    self._read(key.fd, key.data, splitter, streams, output)
                    got_output = True
            if got_output:
                if now - self.ledger_at >= LEDGER_INTERVAL_SECONDS:
                    self._update_ledger()
                # Let a chatty script fill the pipe a little: fewer, larger reads cost far less
                # CPU per line than waking for every few lines.
                time.sleep(OUTPUT_BATCH_SECONDS)
        for item in splitter.flush():
            self._line(item)
        for fd in list(streams):
            self.selector.unregister(fd)
        if paused_at is not None:
            paused_total += time.monotonic() - paused_at
        self.record["paused_seconds"] = round(paused_total, 3)
        if proc.poll() is None:
            self._signal_tree(signal.SIGKILL)
        proc.wait()
        if self.box_used is None and box > 0:  # its pipes closed before the loop saw it exit
            self.box_used = (time.time() - self.started_epoch) / box
        self._end_leftovers()

    def _next_timeout(
        self,
        now: float,
        running_for: float,
        box: float,
        next_sample: float,
        stop_sent: float | None,
        term_sent: float | None,
        exited_at: float | None,
    ) -> float:
        candidates = [next_sample - now, box - running_for, 1.0]
        if self.dirty:
            candidates.append(self.last_write + RECORD_INTERVAL_SECONDS - now)
        if stop_sent is not None and term_sent is None:
            candidates.append(stop_sent + self.settings.grace_seconds - now)
        if term_sent is not None:
            candidates.append(term_sent + TERM_GRACE_SECONDS - now)
        if exited_at is not None:
            candidates.append(exited_at + PIPE_DRAIN_SECONDS - now)
        return max(min(candidates), 0.0)

    def _read(
        self, fd: int, name: str, splitter: LineSplitter, streams: dict[int, str], output: RunLog
    ) -> None:
        # Bounded reads per wake-up keep the loop responsive to signals during a flood.
        for _ in range(16):
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.selector.unregister(fd)
                del streams[fd]
                return
            output.write(data)
            if name == "out":
                plain: list[bytes] = []
                for item in splitter.feed(data):
                    if isinstance(item, bytes) and is_plain_progress(item):
                        plain.append(item)
                        continue
                    if plain:
                        self._plain_progress(plain)
                        plain = []
                    self._line(item)
                if plain:
                    self._plain_progress(plain)

    def _plain_progress(self, lines: list[bytes]) -> None:
        """Fold a run of plain progress lines into their last values: only the newest step,
        total and loss matter, so the older lines need not be parsed one by one."""
        events = []
        missing = {"step", "total", "loss"}
        for line in reversed(lines):
            parsed = parse_line(line).events
            if len(parsed) != 1 or not isinstance(parsed[0], ProgressEvent):
                self._line(line)  # never expected (the fast check accepts only valid lines); be safe
                continue
            event = parsed[0]
            events.append(event)
            missing = {key for key in missing if getattr(event, key) is None}
            if not missing:
                break
        for event in reversed(events):
            self.progress.apply(event)
        self.dirty = True

    def _line(self, item: Any) -> None:
        result = parse_line(item)
        if result.error:
            self.bad_lines += 1
            self.dirty = True
            if self.bad_lines <= MAX_BAD_LINES_LOGGED:
                log.warning("run %s: skipped a bad event line: %s", self.run_id, result.error)
                self.event({"type": "bad_line", "error": result.error})
            return
        for event in result.events:
            entry = self.progress.apply(event)
            if entry is not None:
                self.event(entry)
            self.dirty = True

    def _tree(self) -> list[psutil.Process]:
        return proctree.descendants(os.getpid())

    def _signal_tree(self, sig: int) -> None:
        # The group by its leader's pid only while the script is unreaped: then that pid is surely
        # still the script's (a reaped leader's number can be reused).
        if self.proc is not None and self.proc.returncode is None:
            proctree.signal_group(self.proc.pid, sig)
        proctree.signal_all(self._tree(), sig)

    def _end_leftovers(self) -> None:
        """After the script exits, end what it left behind: SIGTERM, a short grace, then SIGSTOP
        and SIGKILL until none is left (`proctree.end_all`), forkers and setsid daemons included."""
        left = [p for p in self._tree() if self.proc is None or p.pid != self.proc.pid]
        found = {key for key in map(proctree.identity, left) if key is not None}
        if left:
            proctree.signal_all(left, signal.SIGCONT)
            proctree.signal_all(left, signal.SIGTERM)
            psutil.wait_procs(left, timeout=LEFTOVER_GRACE_SECONDS)
            self._reap()
        # As the subreaper, every process the script left is below us, setsid or not; the token
        # finds any that a nested subreaper or a dead middleman detached from our tree.
        targets = proctree.Targets(below=(os.getpid(),), token=self.token)
        killed, _ = proctree.end_all(targets, reap=self._reap)
        self.leftovers_ended += len(killed | found)
        self._reap()

    def _reap(self) -> None:
        # As a subreaper we inherit orphans; collect their exit status so none stays a zombie.
        if self.proc is None or self.proc.returncode is not None:
            # The script is reaped, so every child left is an orphan: one call per zombie.
            with contextlib.suppress(ChildProcessError, OSError):
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            return
        for child in proctree.descendants(os.getpid()):
            if self.proc is not None and child.pid == self.proc.pid:
                continue
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(child.pid, os.WNOHANG)

    def _must_end_by(self, started: float, *, paused: bool, paused_total: float) -> float:
        """When every process must be gone: the deadline (moved by the time paused so far; while
        paused, only the wall-clock cap bounds it), plus the grace and the SIGTERM courtesy."""
        wall_end = started + self.settings.wall_minutes * 60
        box_end = started + self.record["max_run_minutes"] * 60 + paused_total
        end = wall_end if paused else min(box_end, wall_end)
        return end + self.settings.grace_seconds + TERM_GRACE_SECONDS

    def _update_ledger(self, *, paused: bool | None = None, paused_total: float = 0.0) -> None:
        """Record the run's living processes (pid and start time) for a cleanup after our death,
        and, when given, the end that pausing moved."""
        self.ledger_at = time.monotonic()
        members = tuple(sorted(key for key in map(proctree.identity, self._tree()) if key is not None))
        ledger = self.ledger._replace(members=members)
        if paused is not None:
            must_end_by = self._must_end_by(self.started_epoch, paused=paused, paused_total=paused_total)
            ledger = ledger._replace(must_end_by=must_end_by)
        if ledger != self.ledger:
            self.ledger = ledger
            proctree.write_ledger(self.ledger_file, ledger)

    def _prune_others(self) -> None:
        # Any backprop process that lives must notice a dead or wedged supervisor: queued ones
        # do at each poll, running ones here, without waiting long for the lock.
        with contextlib.suppress(OSError, StoreError):
            self.admission.prune(timeout=PRUNE_LOCK_SECONDS)

    def _sample(
        self,
        own: psutil.Process,
        paused_at: float | None,
        paused_total: float,
        limit_mb: float | None,
        now: float,
    ) -> tuple[float | None, float]:
        snapshot = self.probe.snapshot()
        tree = self._tree()
        own_cpu = own.cpu_percent(None)
        # Process objects are kept between samples: cpu_percent(None) measures since the previous
        # call on the same object, and a fresh object's first call always says 0.
        known = {proc.pid: self.cpu_watch.get(proc.pid, proc) for proc in tree}
        self.cpu_watch = known
        for proc in known.values():
            with contextlib.suppress(psutil.Error):
                own_cpu += proc.cpu_percent(None)
        share = own_cpu / max(snapshot["cpu_count"], 1)
        gpu = self.record["gpu"]
        pause, reason = decisions.pause_verdict(
            snapshot,
            self.limits,
            gpu_uuid=gpu["uuid"] if gpu else None,
            paused=paused_at is not None,
            own_cpu_percent=share,
        )
        if pause and paused_at is None:
            self._signal_tree(signal.SIGSTOP)
            self.set_state("paused", reason, reason=reason)
            return now, paused_total
        if not pause and paused_at is not None:
            self._signal_tree(signal.SIGCONT)
            paused_total += now - paused_at
            self.record["paused_seconds"] = round(paused_total, 3)
            self._move_deadline(paused_total)
            self.set_state("running", None, reason="resumed", paused_seconds=round(paused_total, 3))
            return None, paused_total
        if limit_mb and paused_at is None:
            used = self.probe.gpu_process_memory([p.pid for p in tree])
            if used is not None and used > limit_mb:
                self.stop_reason = "gpu_memory_limit"
                self.record["status_detail"] = f"GPU memory {used:.0f} MB > limit {limit_mb:.0f} MB"
                self.event({"type": "gpu_memory_limit", "used_mb": used, "limit_mb": limit_mb})
        return paused_at, paused_total

    def _move_deadline(self, paused_total: float) -> None:
        record = self.record
        record["deadline"] = now_iso(self.started_epoch + record["max_run_minutes"] * 60 + paused_total)

    # -- outcome ----------------------------------------------------------------------------------

    def finish(self, proc: subprocess.Popen[bytes]) -> None:
        record = self.record
        code = proc.returncode
        record["ended_at"] = now_iso()
        record["eta_seconds"] = None
        # A stop (or deadline) that came after the script had exited on its own changed nothing.
        outcome = classify(self.stop_reason if self.stop_acted else None, code, box_used=self.box_used)
        record["exit_code"], record["signal"] = outcome.exit_code, outcome.signal
        record["termination_reason"] = outcome.reason
        self._close_attempt(outcome.status)
        # Released before the final state is written: whoever sees the run ended (and resumes
        # it) finds its slot free, and this release can only ever remove this attempt's slot.
        self._release()
        detail = describe(outcome, record["status_detail"])
        if self.leftovers_ended:
            detail += f"; {self.leftovers_ended} process(es) it left behind were killed"
        self.set_state(
            outcome.status,
            detail,
            reason=outcome.reason,
            exit_code=outcome.exit_code,
            signal=outcome.signal,
            leftovers_killed=self.leftovers_ended,
        )
        self.store.maybe_compact()

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

    def run(self) -> int:
        self.install_signals()
        me = psutil.Process()
        self.record["supervisor_pid"] = me.pid
        self.record["supervisor_started"] = me.create_time()
        self.write(index=True)
        # After this supervisor's pid is known (record or pid file): a stop from then on arrives
        # as a signal, and one from before left this file (see `Service.stop`).
        self._read_stop_request()
        decision = self.queue()
        if decision is None or not self.start(decision) or self.proc is None or self.output is None:
            return 0
        try:
            self.supervise(self.proc, self.output)
        finally:
            self.output.close()
        self.finish(self.proc)
        self.write_final()
        return 0


def _sample_interval() -> float:
    """The sampling interval; BACKPROP_SAMPLE_INTERVAL_SECONDS shrinks it (tests, fast reactions)."""
    raw = os.environ.get("BACKPROP_SAMPLE_INTERVAL_SECONDS", "")
    try:
        value = float(raw)
    except ValueError:
        return decisions.SAMPLE_INTERVAL_SECONDS
    return value if 0.05 <= value <= 3600 else decisions.SAMPLE_INTERVAL_SECONDS


def _await_go(store: Store, run_id: str) -> bool:
    """Wait for the starter's go on stdin (see `local.spawn_supervisor`): True to go on.

    Without the go (the starter rolled the start back, or died), go on only if the starter had
    finished its part: the pid file it writes last names this process. Otherwise the run folder
    is being removed, or nobody will ever look at this attempt, and it must leave no trace.
    """
    got = b""
    deadline = time.monotonic() + GO_WAIT_SECONDS
    while len(got) < len(GO):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([0], [], [], left)[0]:
            break
        chunk = os.read(0, len(GO) - len(got))
        if not chunk:
            break
        got += chunk
    # The script gets /dev/null as stdin anyway; fd 0 must not stay a pipe to the starter.
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if got == GO:
        return True
    try:
        info = json.loads((store.run_dir(run_id) / "supervisor.pid").read_text("utf-8"))
        return bool(info["pid"] == os.getpid())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    await_go = args[2:] == [AWAIT_GO_FLAG]
    if len(args) != 2 and not await_go:
        print(f"usage: python -m backprop_mcp.runs.supervisor HOME RUN_ID [{AWAIT_GO_FLAG}]", file=sys.stderr)
        return 2
    home, run_id = Path(args[0]), args[1]
    if await_go and not _await_go(Store(home), run_id):
        return 0
    proctree.become_subreaper()
    try:
        return Supervisor(Store(home), run_id).run()
    except BackpropError as exc:
        log.error("run %s: %s", run_id, exc)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
