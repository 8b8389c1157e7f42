"""Process identity and process-tree control: liveness by pid plus start time, the Linux child
subreaper, and signalling or killing every descendant of a run."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

import psutil

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36
# psutil reports create_time rounded to the clock tick; equal within this tolerance means the
# same process, while a reused pid almost always starts much later.
START_TIME_TOLERANCE = 0.05


def start_time(pid: int) -> float | None:
    """The process's start time, or None if it does not exist."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, ValueError):
        return None


def is_alive(pid: int | None, started: float | None) -> bool:
    """True when that exact process (not a later one with the same pid) is still running."""
    if not pid or pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, ValueError):
        return False
    return started is None or abs(created - started) <= START_TIME_TOLERANCE


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux), so a grandchild that
    double-forks and calls setsid still has us as its parent and can be found and killed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def descendants(pid: int) -> list[psutil.Process]:
    """Every living descendant of `pid`."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to a process group; False if the group is gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("not allowed to signal process group %d", pgid)
        return False
    return True


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    """Send `sig` to each process, ignoring those already gone."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            proc.send_signal(sig)


def processes_of_run(run_id: str, *, exclude: set[int] | None = None) -> list[psutil.Process]:
    """Processes that carry the run's BACKPROP_RUN_ID in their environment.

    This finds what a dead supervisor left behind, including daemons that left the script's
    process group and were reparented to init when the supervisor (their subreaper) died.
    """
    found = []
    me = os.getuid()
    skip = exclude or set()
    for proc in psutil.process_iter(["pid", "uids"]):
        try:
            if proc.pid in skip or proc.pid == os.getpid() or proc.info["uids"].real != me:
                continue
            if proc.environ().get("BACKPROP_RUN_ID") == run_id:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def kill_leftovers(run_id: str, script_pid: int | None) -> int:
    """SIGKILL the script's process group and every process of the run; returns how many."""
    procs = processes_of_run(run_id)
    if script_pid:
        signal_group(script_pid, signal.SIGKILL)
    signal_all(procs, signal.SIGKILL)
    psutil.wait_procs(procs, timeout=KILL_WAIT_SECONDS)
    return len(procs)


# How long to wait for SIGKILLed processes to disappear: the kernel reaps them at once unless
# they are in uninterruptible sleep (D state, e.g. a hung NFS or GPU driver call).
KILL_WAIT_SECONDS = 3.0
