"""Helpers shared by the fault, concurrency and security suites: starting fixture runs, checking
that no process of a run survives, and reading every file of a store strictly."""

from __future__ import annotations

import hashlib
import json
import stat
from functools import partial
from pathlib import Path

import psutil

from backprop_mcp.governor import proctree
from backprop_mcp.runs.requests import RunRequest
from backprop_mcp.runs.service import Service
from tests.helpers import FIXTURES, processes_with_run_id, wait_until

# How long a killed tree may take to vanish: SIGKILL is immediate, but psutil sees the exit late
# on a loaded 2-core machine.
VANISH_SECONDS = 10.0


def start(service: Service, fixture: str, *args: str, cwd: Path | None = None, **options: object) -> str:
    """Start a fixture script through the service; returns the run id."""
    request = RunRequest(
        script=str(FIXTURES / fixture),
        args=list(args),
        options=dict(options),
        cwd=str(cwd) if cwd else None,
    )
    return service.start(request)["run_id"]


def assert_nothing_survives(*run_ids: str) -> None:
    """Every process that carries one of the runs' ids is gone (bounded wait, then a clear failure)."""

    def gone() -> bool:
        return not any(processes_with_run_id(r) for r in run_ids)

    try:
        wait_until(gone, timeout=VANISH_SECONDS, what="the runs' processes to vanish")
    except AssertionError:
        left = {r: [(p.pid, _cmdline(p)) for p in processes_with_run_id(r)] for r in run_ids}
        raise AssertionError(f"processes survived their run: {left}") from None


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())[:120]
    except psutil.Error:
        return "?"


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as dead: it holds nothing)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def strict_json(raw: bytes) -> object:
    """Parse JSON refusing NaN and Infinity, as any other JSON reader would."""

    def refuse(name: str) -> object:
        raise ValueError(f"{name} in a store file")

    return json.loads(raw, parse_constant=refuse)


def assert_store_files_valid(home: Path) -> int:
    """Every record and every line of every JSON-lines file under `home` parses; returns the count
    of files checked. Files moved aside as corrupt (`*.corrupt-*`) are skipped."""
    checked = 0
    for path in home.rglob("*"):
        if not path.is_file() or ".corrupt-" in path.name or path.name.endswith(".tmp"):
            continue
        if path.suffix == ".json":
            strict_json(path.read_bytes())
        elif path.suffix == ".jsonl":
            for line in path.read_bytes().splitlines():
                if line.strip():
                    strict_json(line)
        else:
            continue
        checked += 1
    return checked


def modes(home: Path) -> dict[str, int]:
    """The permission bits of everything under `home`, by relative path."""
    return {str(p.relative_to(home)): stat.S_IMODE(p.lstat().st_mode) for p in [home, *home.rglob("*")]}


def supervisor_pid(service: Service, run_id: str) -> int:
    """The supervisor's pid, from the record or the pid file the starter wrote."""

    def known() -> int | None:
        pid = service.store.read(run_id)["supervisor_pid"]
        if pid is not None:
            return pid
        pid_file = service.store.run_dir(run_id) / "supervisor.pid"
        try:
            return int(json.loads(pid_file.read_text("utf-8"))["pid"])
        except (OSError, ValueError, KeyError):
            return None

    return wait_until(known, what=f"the supervisor pid of {run_id}")


def environ_has(proc: psutil.Process, key: str) -> bool:
    try:
        return key in proc.environ()
    except (psutil.Error, OSError):
        return False


def run_view(home: Path, run_id: str) -> dict[str, object]:
    """What a reader of the store can see of one run: every file of its folder (hashed), its
    entries in the machine's queue and slots, its index rows, and any temp file in the store."""
    folder = home / "runs" / run_id
    files = {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
    queued = sorted(str(path.relative_to(home)) for path in (home / "governor").rglob(f"{run_id}.json"))
    index = home / "index.jsonl"
    rows = [
        line
        for line in (index.read_text("utf-8").splitlines() if index.exists() else [])
        if json.loads(line).get("run_id") == run_id
    ]
    temps = sorted(str(path.relative_to(home)) for path in home.rglob("*.tmp"))
    return {"files": files, "queue": queued, "index": rows, "temps": temps}


def wait_for_supervisor_exit(service: Service, *run_ids: str) -> None:
    """Wait until the supervisor of each run (pid and start time from its record) has exited: a
    walk of the store that needs no process of the run at work waits for this first."""
    for run_id in run_ids:
        record = service.store.read(run_id)
        pid, started = record["supervisor_pid"], record["supervisor_started"]
        if pid is not None:
            gone = partial(lambda pid, started: not proctree.is_alive(pid, started), pid, started)
            wait_until(gone, what=f"the supervisor of {run_id} to exit")
