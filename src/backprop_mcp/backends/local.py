"""The local backend: each run's supervisor is a detached process on this machine, started as
`python -m backprop_mcp.runs.supervisor HOME RUN_ID --await-go`, known by the pid file its starter
writes, stopped by a signal, and logging into the store."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path

from backprop_mcp.backends.base import SupervisorId
from backprop_mcp.core.errors import StoreError
from backprop_mcp.core.files import atomic_write, tail_lines
from backprop_mcp.core.records import RunRecord
from backprop_mcp.core.store import SUPERVISOR_PID_FILE, Store
from backprop_mcp.governor import proctree
from backprop_mcp.governor.admission import Admission
from backprop_mcp.runs import detached
from backprop_mcp.runs.launch import AWAIT_GO_FLAG, GO

logger = logging.getLogger(__name__)

# A supervisor told to abandon its start exits as soon as its interpreter is up (well under a
# second); this bounds the wait on a machine stalled for a long while before it is killed.
ABANDON_WAIT_SECONDS = 30.0
# The starter waits this long for the queue's lock to take the run's place. A hold is normally
# milliseconds (admission decides on a snapshot taken outside the lock; reclaiming a dead run's
# processes takes a few seconds at most); past this the supervisor joins by itself, retrying, rather
# than the caller being held up for the queue's own minute-long limit.
JOIN_LOCK_TIMEOUT_SECONDS = 10.0
# The last line of a supervisor's log quoted when it dies at its start: a tail stays bounded.
MAX_QUOTED_CHARS = 2000


class LocalBackend:
    """Supervisors as detached processes on this machine (today's and the default backend)."""

    name = "local"

    def submit(self, store: Store, run_id: str, env: Mapping[str, str]) -> None:
        """Start the run's supervisor, all or nothing: it is held (see `spawn_supervisor`) until
        the pid file is written, and told to exit untouched if that fails."""
        from backprop_mcp.governor.probes import prime_cpu_cache

        pid_file = store.run_dir(run_id) / SUPERVISOR_PID_FILE
        # The supervisor's first admission reads the CPU load from this cache; priming it now means
        # that first reading is a real sample over the launch, not a blocking 0.1 s one.
        prime_cpu_cache(store.governor_dir / "cpu_sample.json")
        try:
            proc = spawn_supervisor(store.home, run_id, env)
        except OSError as exc:
            raise StoreError(f"could not start the supervisor of run {run_id}: {exc}") from None
        queue = Admission(store.governor_dir, lock_timeout=JOIN_LOCK_TIMEOUT_SECONDS)
        started: float | None = None
        try:
            started = proctree.start_time(proc.pid)
            # Through the store's atomic write: the file is 0600 like the rest of the store
            # (write_text would follow the umask), and a reader never sees it half written.
            atomic_write(pid_file, json.dumps({"pid": proc.pid, "started": started}).encode("utf-8"))
            # The run's place in the queue is taken now, before the caller gets its answer, so runs
            # are admitted in the order they were submitted, not in the order their supervisors
            # happen to start. The ticket is the supervisor's (its pid and start time): a starter
            # that exits at once leaves nothing of its own, and the supervisor's own join keeps it.
            # (No start time: it died already; the release below says so.)
            if started is not None:
                _join(queue, run_id, proc.pid, started)
        except BaseException:
            self._undo(queue, run_id, proc, started)
            raise
        try:
            release(proc)
        except OSError:
            # The pid file first: a supervisor without its go goes on only if that file names it.
            pid_file.unlink(missing_ok=True)
            self._undo(queue, run_id, proc, started)
            log = store.run_dir(run_id) / "supervisor.log"
            raise StoreError(
                f"the supervisor of run {run_id} ended as it started (exit status {proc.returncode})"
                + _last_line(log)
            ) from None

    @staticmethod
    def _undo(queue: Admission, run_id: str, proc: subprocess.Popen[bytes], started: float | None) -> None:
        """Roll back a launch: the held supervisor exits untouched and its ticket goes (a ticket of
        a dead process would be dropped by the next look at the queue anyway; this is at once)."""
        abandon(proc, ABANDON_WAIT_SECONDS)
        if started is not None:
            with contextlib.suppress(OSError, StoreError):
                queue.release(run_id, (proc.pid, started))

    def supervisor(self, store: Store, record: RunRecord) -> SupervisorId | None:
        """From the record, else from the pid file the starter wrote at launch (before the
        supervisor's own first write); None when neither exists yet."""
        if record["supervisor_pid"] is not None:
            return record["supervisor_pid"], record["supervisor_started"]
        try:
            info = json.loads((store.run_dir(record["run_id"]) / SUPERVISOR_PID_FILE).read_text("utf-8"))
            return int(info["pid"]), info.get("started")
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def is_alive(self, supervisor: SupervisorId) -> bool:
        return proctree.is_alive(*supervisor)

    def stop(self, supervisor: SupervisorId, *, force: bool) -> None:
        if not proctree.is_alive(*supervisor):
            return
        # A supervisor stopped by its own script (SIGSTOP) cannot act on the signal: continue it.
        proctree.resume_if_stopped(*supervisor)
        # Gone in between: it ended on its own, and the record says how.
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor[0], signal.SIGUSR1 if force else signal.SIGTERM)

    def log_path(self, store: Store, run_id: str, attempt: int) -> Path:
        return store.log_path(run_id, attempt)


def _join(queue: Admission, run_id: str, pid: int, started: float) -> None:
    """Take the run's place in the queue for its supervisor. A queue that cannot be used now (a full
    disk, a broken or wedged lock) does not fail the start: the supervisor joins by itself and, as
    long as the queue stays unusable, retries and says so in the record (docs/governor.md)."""
    try:
        queue.join(run_id, pid, started)
    except (OSError, StoreError) as exc:
        text = exc.message if isinstance(exc, StoreError) else (exc.strerror or str(exc))
        logger.warning(
            "run %s: could not take its place in the run queue now (%s); its supervisor will join",
            run_id,
            text,
        )


def spawn_supervisor(home: Path, run_id: str, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start the run's supervisor detached (own session, output to its log file), so that it
    outlives the CLI or MCP server that started it.

    It starts with `HELD_SIGNALS` blocked, and does nothing until the starter calls `release`
    (the start is complete) or `abandon` (the start is rolled back: it exits without a trace).
    """
    log_path = home / "runs" / run_id / "supervisor.log"
    return detached.spawn("backprop_mcp.runs.supervisor", [str(home), run_id, AWAIT_GO_FLAG], log_path, env)


def release(proc: subprocess.Popen[bytes]) -> None:
    """Tell a held supervisor to go on; OSError when it is already gone (the start failed)."""
    if proc.stdin is None:
        raise RuntimeError("the supervisor was started without its go pipe")  # spawn_supervisor gives one
    try:
        proc.stdin.write(GO)
        proc.stdin.flush()
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    # Reap it when it ends, so a long-lived starter (the MCP server) collects no zombies.
    threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()


def abandon(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Roll back a held supervisor: it reads end-of-file without the go and exits untouched.
    Waits for it (killing it after `timeout`) so that it writes nothing into a folder being removed."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _last_line(log: Path) -> str:
    """ ": LAST LINE" of a supervisor's log, to say why it ended; empty when there is none."""
    lines = [line.decode("utf-8", "replace").strip() for line in tail_lines(log, 1)]
    return f": {lines[-1][:MAX_QUOTED_CHARS]}" if lines and lines[-1] else ""
