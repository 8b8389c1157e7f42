"""The supervisor as a cluster job's entrypoint (docs/cluster.md): `python -m
backprop_mcp.runs.supervisor.job run` supervises one attempt exactly as a local supervisor does
(time box, stop sequence, events, checkpoints) in a store of its own on the node, and prints
everything it records as marked lines of its job log (`runs.joblog`), which the submitting side
folds into its store. `... job stop` is the small job that asks such a supervisor to stop: it
leaves the stop request and signals the supervisor, as a local `backprop stop` does.

What differs from a local supervisor: the cluster placed the job, so there is no machine queue and
no admission here; nothing pauses the script (GPU temperature and CPU load pausing are local-only);
the script runs with this job's interpreter in the job's working directory (the run's folder that
travelled with it); and the script dies with its supervisor (a job killed by its cluster leaves no
orphan behind, since no reader on this node would end it).

The parameters come in the environment (`JOB_ENV`), never on the command line the cluster shows.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time
from typing import Any, cast

from backprop_mcp.core.errors import BackpropError
from backprop_mcp.core.machine import Decision
from backprop_mcp.core.records import RunRecord
from backprop_mcp.core.store import STOP_REQUEST_FILE, Store
from backprop_mcp.governor import proctree
from backprop_mcp.governor.probe_choice import make_probe
from backprop_mcp.runs import joblog
from backprop_mcp.runs.progress import newest_existing_checkpoint
from backprop_mcp.runs.runlog import RunLog
from backprop_mcp.runs.supervisor.run import Supervisor

log = logging.getLogger("backprop_mcp.runs.supervisor")

RECORD_ENV, STORE_KEY_ENV, STORAGE_ENV, STOP_ENV = (
    joblog.RECORD_ENV,
    joblog.STORE_KEY_ENV,
    joblog.STORAGE_ENV,
    joblog.STOP_ENV,
)
# A line of the script longer than this without a newline is printed in pieces: the echo's buffer
# stays bounded (a line this long is no event anyway; events.MAX_LINE_BYTES is far smaller).
MAX_ECHO_LINE_BYTES = 1024 * 1024
# The script's output an attempt's job log carries (both streams): every read of a ray run
# downloads the whole job log (Ray's API has no offset), so past this a chatty or flooding script
# would make each read slower and fill the node's disk with Ray's copy. The rest stays in the node's
# own run log (rotated as a local one); the job log then carries only the last lines at the end
# (ECHO_TAIL_*: usually what says why a run failed) and the attempt's full metric history.
MAX_ECHO_BYTES = 8 * 1024 * 1024
ECHO_TAIL_LINES = 200
ECHO_TAIL_LINE_BYTES = 8 * 1024
# The record is echoed whenever its state changes, else at most once per this share of the attempt's
# age (and at least a second apart): fresh while a run is young, and a day-long run's job log holds
# a few thousand records, not one per second.
RECORD_ECHO_SHARE = 300.0
_PR_SET_PDEATHSIG = 1


class Echo:
    """The job log: each complete line of the script's output, marked with its stream, and the
    supervisor's records, events and log lines, all on this process's stdout."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.out = sys.stdout.buffer
        self.partial = {"o": b"", "e": b""}
        self.carried = 0  # bytes of the job log that carried the script's output so far
        self.held: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=ECHO_TAIL_LINES)
        self.held_lines = 0  # lines past MAX_ECHO_BYTES, of which `held` keeps the last

    def emit(self, kind: str, payload: bytes) -> None:
        self.out.write(joblog.mark(self.token, kind) + payload.replace(b"\n", b" ") + b"\n")
        self.out.flush()

    def emit_json(self, kind: str, data: Any) -> None:
        self.emit(kind, json.dumps(data, separators=(",", ":"), allow_nan=False).encode("utf-8"))

    def feed(self, kind: str, data: bytes) -> None:
        buffered = self.partial[kind] + data
        *complete, rest = buffered.split(b"\n")
        while len(rest) > MAX_ECHO_LINE_BYTES:
            complete.append(rest[:MAX_ECHO_LINE_BYTES])
            rest = rest[MAX_ECHO_LINE_BYTES:]
        self.partial[kind] = rest
        carried = []
        for line in complete:
            if self.carried + len(line) <= MAX_ECHO_BYTES:
                carried.append(self.output_line(kind, line))
                self.carried += len(carried[-1])
            else:
                self.held.append((kind, line[:ECHO_TAIL_LINE_BYTES]))
                self.held_lines += 1
        if carried:
            self.out.write(b"".join(carried))
            self.out.flush()

    def output_line(self, kind: str, line: bytes) -> bytes:
        """A line of the script's output as the job log carries it: as it is, or, when Ray would
        alter it (it turns a carriage return into a line break, and bytes that are not UTF-8
        into U+FFFD), as a JSON string under the kind in capitals (`joblog.output`)."""
        if b"\r" not in line:
            with contextlib.suppress(UnicodeDecodeError):
                line.decode("utf-8")
                return joblog.mark(self.token, kind) + line + b"\n"
        quoted = json.dumps(line.decode("utf-8", "surrogateescape")).encode("ascii")
        return joblog.mark(self.token, kind.upper()) + quoted + b"\n"

    def flush(self) -> None:
        """At the end of the script: its unfinished lines, and the last of those held back."""
        for kind, rest in self.partial.items():
            if rest:
                self.feed(kind, b"\n")
        if self.held_lines:
            note = (
                f"{self.held_lines} lines of the script's output past the first {MAX_ECHO_BYTES // 1024**2} "
                f"MiB did not travel with the job log; the last {len(self.held)} follow (all of them are "
                "in the run's log on its Ray node)"
            )
            self.out.write(self.output_line("e", note.encode("utf-8")))
            self.out.write(b"".join(self.output_line(kind, line) for kind, line in self.held))
            self.out.flush()
            self.held.clear()


class _EchoingLog:
    """The run's log file, whose writes are also echoed as one stream's lines."""

    def __init__(self, output: RunLog, echo: Echo, kind: str) -> None:
        self.output, self.echo, self.kind = output, echo, kind

    def write(self, data: bytes) -> None:
        self.output.write(data)
        self.echo.feed(self.kind, data)


class _EchoHandler(logging.Handler):
    def __init__(self, echo: Echo) -> None:
        super().__init__()
        self.echo = echo

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.echo.emit("l", self.format(record).encode("utf-8", "replace"))


def _die_with_parent() -> None:
    # Linux: the script gets SIGKILL when its supervisor dies (a cluster that kills the job kills
    # the supervisor; nothing on the node would end the script otherwise). Elsewhere: a no-op.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class JobSupervisor(Supervisor):
    """One attempt of one run, supervised on a cluster node and reported in the job log."""

    capture_code = False  # the submitting side captured it, where the project's .git is

    def __init__(self, store: Store, run_id: str, echo: Echo) -> None:
        self.began = time.monotonic()
        self.echo = echo
        self.echoed_state: tuple[Any, ...] | None = None
        self.echoed_at = 0.0
        super().__init__(store, run_id, probe=make_probe("none", cpu_cache=None))
        self.script_preexec = _die_with_parent

    def write(self, *, index: bool = False) -> bool:
        written = super().write(index=index)
        now = time.monotonic()
        state = (self.record["status"], self.record["status_detail"], len(self.record["checkpoints"]))
        every = max(1.0, (now - self.began) / RECORD_ECHO_SHARE)
        if state != self.echoed_state or now - self.echoed_at >= every:
            self.echo.emit_json("r", self.record)
            self.echoed_state, self.echoed_at = state, now
        return written

    def event(self, entry: dict[str, Any]) -> None:
        super().event(entry)
        self.echo.emit_json("v", entry)

    def queue(self) -> Decision | None:
        # The cluster admitted the job: its resources are the run's, and there is no local queue.
        return Decision(allowed=True, reasons=[], gpu=None, checks=["placed by the Ray cluster"])

    def _release(self) -> None:
        """No slot to give back: admission happened on the submitting side."""

    def _prune_others(self) -> None:
        """No other runs of this store live on this node's queue."""

    def _sample(
        self, own: Any, paused_at: float | None, paused_total: float, limit_mb: float | None, now: float
    ) -> tuple[float | None, float]:
        # Pausing (GPU temperature, CPU load) and the supervisor's GPU memory check are local-only.
        return paused_at, paused_total

    def _read(self, fd: int, name: str, splitter: Any, streams: dict[int, str], output: Any) -> None:
        super()._read(fd, name, splitter, streams, cast(RunLog, _EchoingLog(output, self.echo, name[0])))

    def supervise(self, proc: Any, output: RunLog) -> None:
        try:
            super().supervise(proc, output)
        finally:
            self.echo.flush()

    def finish(self, proc: Any) -> None:
        if self.stop_reason == "stop_requested" and self._stop_request() is None:
            # The cluster stopped the job (`ray job stop`): Ray signals the script itself too, so
            # it may be gone before this supervisor's own stop sequence began; that stop is still why.
            self.stop_acted = True
            self.stopped_by_cluster = True
        if self.echo.held_lines:
            # Its output did not all travel, so the submitting side cannot rebuild the history from
            # it: the history itself goes, before the final record that ends the run there.
            self.echo.emit_json("h", self.history.document())
        super().finish(proc)

    def set_state(self, status: str, detail: str | None = None, **extra: Any) -> None:
        if status == "stopped" and getattr(self, "stopped_by_cluster", False):
            detail = (
                "stopped by the cluster: its Ray job was stopped (`ray job stop`, SIGTERM to its entrypoint)"
            )
        super().set_state(status, detail, **extra)


def _run(env: dict[str, str], echo: Echo) -> int:
    record: RunRecord = json.loads(env[RECORD_ENV])
    store = Store(joblog.job_home(env[STORAGE_ENV] or None, env[STORE_KEY_ENV]))
    cwd = os.getcwd()
    record.update(
        {
            "cwd": cwd,
            "script": os.path.join(cwd, record["script"]),
            "python": sys.executable,
            "python_source": "cluster",
            "supervisor_pid": None,
            "supervisor_started": None,
            "script_pid": None,
        }
    )
    run_id = record["run_id"]
    missing = record["resume_from"] is not None and not os.path.exists(record["resume_from"])
    if missing:
        record["resume_from"] = newest_existing_checkpoint(record)
        record["attempts"][-1]["resume_from"] = record["resume_from"]
    if store.exists(run_id):
        store.write(record, index=False)
    else:
        store.create(record)
    supervisor = JobSupervisor(store, run_id, echo)
    if missing and supervisor.record["resume_from"] is None:
        supervisor.finish_without_start(
            "failed",
            "start_failed",
            "none of the run's reported checkpoints exists on this cluster node; keep checkpoints on "
            "storage every node sees (ray.storage, docs/cluster.md)",
        )
        return 0
    proctree.become_subreaper()
    return supervisor.run()


def _stop(env: dict[str, str]) -> int:
    """Leave the stop request in the run's node-side folder, then signal its supervisor."""
    request: dict[str, Any] = json.loads(env[STOP_ENV])
    store = Store(joblog.job_home(env[STORAGE_ENV] or None, env[STORE_KEY_ENV]))
    run_id, attempt = request["run_id"], request["attempt"]
    note: dict[str, Any] = {"attempt": attempt, "force": bool(request.get("force")), "at": request["at"]}
    if request.get("pruned"):
        note.update(reason="pruned", detail=request["pruned"])
    path = store.run_dir(run_id) / STOP_REQUEST_FILE
    if path.parent.is_dir():
        path.write_text(json.dumps(note), encoding="utf-8")
    pid, started = request.get("pid"), request.get("started")
    if isinstance(pid, int) and proctree.is_alive(pid, started):
        proctree.resume_if_stopped(pid, started)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1 if note["force"] else signal.SIGTERM)
        print(f"asked the supervisor of run {run_id} (pid {pid}) to stop", flush=True)
    else:
        print(f"no supervisor of run {run_id} attempt {attempt} lives on this node", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    env = {name: os.environ.pop(name, "") for name in joblog.JOB_ENV}  # none of them reaches the script
    if args == ["stop"]:
        return _stop(env)
    if args != ["run"]:
        print("usage: python -m backprop_mcp.runs.supervisor.job run|stop", file=sys.stderr)
        return 2
    echo = Echo(joblog.check_token(env[joblog.MARK_ENV]))
    handler = _EchoHandler(echo)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        return _run(env, echo)
    except BackpropError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
