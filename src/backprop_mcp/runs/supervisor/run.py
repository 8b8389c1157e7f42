"""The per-run supervisor process (DESIGN §3): waits in the queue (`queue`), starts the script,
drains its output, enforces the time box, pauses and resumes it (this module), and records the
truthful outcome (`stop`). It is the only writer of its run's record while it lives."""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import time
from typing import Any

import psutil

from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.errors import StoreError
from backprop_mcp.core.machine import Decision
from backprop_mcp.governor import decisions, proctree
from backprop_mcp.runs.events import LineSplitter, ProgressEvent, parse_line, plain_runs
from backprop_mcp.runs.launch import (
    command,
    contract_env,
    gpu_memory_limit_mb,
)
from backprop_mcp.runs.runlog import RunLog
from backprop_mcp.runs.supervisor.base import HISTORY_INTERVAL_SECONDS
from backprop_mcp.runs.supervisor.stop import EndingSupervisor

log = logging.getLogger("backprop_mcp.runs.supervisor")

# The record is rewritten at most this often while a script prints: a flood of progress lines
# costs a bounded number of writes per second, not one per line.
RECORD_INTERVAL_SECONDS = 1.0
# After the stop signal's grace, SIGTERM gets this long before SIGKILL: the script already had the
# whole grace to checkpoint; SIGTERM is a last courtesy for libraries that clean up on it.
TERM_GRACE_SECONDS = 0.5
# After the last process is gone, wait at most this long for its pipes to reach EOF.
PIPE_DRAIN_SECONDS = 2.0
READ_CHUNK = 64 * 1024
# After a read that returned output, wait this long before the next one (see `supervise`).
OUTPUT_BATCH_SECONDS = 0.002
# Bad event lines noted in the supervisor log and the history (the rest are only counted).
MAX_BAD_LINES_LOGGED = 20
# While output arrives, the ledger of the run's processes is refreshed at most this often: a
# process the script starts is usually recorded before it could kill its supervisor, at the cost
# of one scan of the process table per interval.
LEDGER_INTERVAL_SECONDS = 0.25
# A running supervisor looks at the other runs' slots at each sample (a dead or wedged supervisor's
# run is ended then), waiting at most this long for the queue lock so its own run never stalls.
PRUNE_LOCK_SECONDS = 0.05


class Supervisor(EndingSupervisor):
    """One attempt of one run, from queue to final record."""

    # -- running ----------------------------------------------------------------------------------

    def start(self, decision: Decision) -> bool:
        record = self.record
        record["gpu"] = decision["gpu"] if self.limits["use_gpu"] else None
        if self.capture_code and not self.stop_reason:
            self.capture()
        if self.stop_reason:  # a stop between admission and here: the script never starts
            self._release()
            self.finish_without_start("stopped", "stop_requested", "stopped before the script started")
            return False
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
                preexec_fn=self.script_preexec,  # noqa: PLW1509 (its one thread starts after this)
            )
        except OSError as exc:
            self._release()
            self.finish_without_start("failed", "start_failed", f"could not {action}: {exc.strerror or exc}")
            return False
        record["script_pid"] = self.proc.pid
        self.start_environment_reader()
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
        kill_sent = False
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
                # Each step of the stop sequence is an event, once: the history says which signal
                # ended the script (the stop signal, SIGTERM after the grace, or SIGKILL).
                if self.kill_now or (term_sent is not None and now - term_sent >= TERM_GRACE_SECONDS):
                    if not kill_sent:
                        kill_sent = True
                        self._stop_event("SIGKILL")
                    self._signal_tree(signal.SIGKILL)
                elif stop_sent is None:
                    stop_sent = now
                    proctree.signal_group(proc.pid, getattr(signal, self.settings.stop_signal))
                    self._stop_event(self.settings.stop_signal)
                elif term_sent is None and now - stop_sent >= self.settings.grace_seconds:
                    term_sent = now
                    self._stop_event("SIGTERM")
                    self._signal_tree(signal.SIGTERM)
            if exited_at is None and self.stop_reason is None and now >= next_sample:
                next_sample = now + self.sample_interval
                paused_at, paused_total = self._sample(own, paused_at, paused_total, limit_mb, now)
                self._update_ledger(paused=paused_at is not None, paused_total=paused_total)
                self._prune_others()
            if self.dirty and now - self.last_write >= RECORD_INTERVAL_SECONDS:
                self.write()
            if self.history.dirty and now - self.history_at >= HISTORY_INTERVAL_SECONDS:
                self.write_history()
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

    def _stop_event(self, signal_name: str) -> None:
        self.event({"type": "stop_signal", "reason": self.stop_reason, "signal": signal_name})

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
                for item in plain_runs(splitter.feed(data)):
                    if isinstance(item, tuple):
                        self._plain_progress(*item)
                    else:
                        self._line(item)

    def _plain_progress(self, lines: list[bytes], joined: bytes) -> None:
        """Fold a run of plain progress lines into their last values: only the newest step,
        total and loss matter to the record, so the older lines need not be parsed one by one
        (the history takes every loss from them in one pass of its own)."""
        self.history.observe_plain(lines, joined)
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
            self.history.observe(event)
            entry = self.progress.apply(event)
            if entry is not None:
                self.event(entry)
            self.dirty = True

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
            self.write_final()  # ended unstarted: its outcome too is retried on a full disk
            return 0
        try:
            self.supervise(self.proc, self.output)
        except BaseException:
            self.write_history()  # a supervisor that fails still leaves what it recorded
            raise
        finally:
            self.output.close()
        self.finish(self.proc)
        self.write_final()
        return 0
