"""Process identity and process-tree control: liveness by pid plus start time, the Linux child
subreaper, signalling or killing every process of a run until none remains, and the per-attempt
ledger (`processes-N.json`) in which a supervisor records its run's processes for a later cleanup."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import psutil

from backprop_mcp.core.files import replace_json

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36
# psutil derives a start time from the boot time and clock ticks: two reads of one process agree
# to far better than this, while a reused pid starts at least a tick (10 ms) later. A looser
# tolerance let a process started 50 ms after a dead script pass for it and be killed.
START_TIME_TOLERANCE = 0.005


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
    """Send `sig` to a process group; False if the group is gone.

    Only for a group whose leader is known to be that exact process (e.g. an unreaped child):
    a group whose leader is gone may carry a reused number."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("not allowed to signal process group %d", pgid)
        return False
    return True


def signal_all(procs: Iterable[psutil.Process], sig: int) -> None:
    """Send `sig` to each process, ignoring those already gone (psutil refuses a reused pid)."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            proc.send_signal(sig)


def exact(pid: int | None, started: float | None) -> psutil.Process | None:
    """That exact process while it lives (not a zombie, not a later one with the same pid)."""
    if not pid or pid <= 0 or started is None:
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - started) > START_TIME_TOLERANCE:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, ValueError):
        return None
    return proc


def identity(proc: psutil.Process) -> tuple[int, float] | None:
    """(pid, start time) of a process, or None once it is gone."""
    try:
        return proc.pid, proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


# -- ending every process of a run ---------------------------------------------------------------

# The token a script's processes carry in their environment: unique to one attempt of one run of
# one store, unlike BACKPROP_RUN_ID (two stores may both have a run "test").
TOKEN_ENV = "BACKPROP_RUN_TOKEN"  # noqa: S105 (a variable name, not a secret)
# Rounds of freeze-then-kill before giving up: each round ends everything found, and a tree can
# only regrow from a process that escaped a scan, so two rounds end even a fork bomb; the bound
# only matters for processes the kernel will not let die (uninterruptible sleep).
KILL_ROUNDS = 10
# Looks per round for processes forked while the others were being stopped: each look stops
# all it finds, so a tree stops growing after a few; the bound keeps a pathological tree finite.
FREEZE_LOOKS = 50
# How long to wait for SIGKILLed processes to disappear: the kernel reaps them at once unless
# they are in uninterruptible sleep (D state, e.g. a hung NFS or GPU driver call).
KILL_WAIT_SECONDS = 3.0
# Between two looks for killed processes to disappear.
KILL_POLL_SECONDS = 0.01


class Targets(NamedTuple):
    """What belongs to one run, by identities that a reused pid or another store cannot fake."""

    exact: tuple[tuple[int, float], ...] = ()
    """Processes (pid, start time) to end with all their descendants."""
    below: tuple[int, ...] = ()
    """Processes whose descendants (not themselves) are ended: the supervisor ending leftovers."""
    token: str | None = None
    """Processes carrying this TOKEN_ENV value, and their descendants."""
    group: tuple[int, float] | None = None
    """A process group, used only while its leader is still that exact process."""


def _look(targets: Targets, known: Mapping[tuple[int, float], psutil.Process]) -> list[psutil.Process]:
    """One scan of the process table: the targets' living processes and all their descendants."""
    me, uid = os.getpid(), os.getuid()
    children: dict[int, list[psutil.Process]] = {}
    roots: list[psutil.Process] = []
    leader = exact(*targets.group) if targets.group else None
    wanted = dict(targets.exact)
    for proc in psutil.process_iter(["ppid", "uids", "status", "create_time"]):
        info = proc.info
        if proc.pid == me or info["uids"] is None or info["uids"].real != uid:
            continue
        if info["status"] == psutil.STATUS_ZOMBIE or info["create_time"] is None:
            continue
        children.setdefault(info["ppid"], []).append(proc)
        started = info["create_time"]
        if (
            (proc.pid, started) in known
            or (proc.pid in wanted and abs(started - wanted[proc.pid]) <= START_TIME_TOLERANCE)
            or (leader is not None and _group_of(proc.pid) == leader.pid)
            or (targets.token is not None and _carries(proc, targets.token))
        ):
            roots.append(proc)
    found: dict[int, psutil.Process] = {}
    stack = [*roots, *(p for pid in targets.below for p in children.get(pid, []))]
    while stack:
        proc = stack.pop()
        if proc.pid in found or proc.pid == me:
            continue
        found[proc.pid] = proc
        stack.extend(children.get(proc.pid, []))
    return list(found.values())


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _carries(proc: psutil.Process, token: str) -> bool:
    try:
        return proc.environ().get(TOKEN_ENV) == token
    except (psutil.Error, OSError):
        return False


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False


def end_all(
    targets: Targets, *, reap: Callable[[], None] | None = None
) -> tuple[set[tuple[int, float]], int]:
    """SIGKILL every process of `targets` until none remains; returns (the (pid, start time) of
    each process killed, how many are still alive).

    Each round first freezes the tree with SIGSTOP, looking again until a look finds nothing new
    (a stopped process cannot fork, and its children stay linked to it while it lives), then
    kills all it froze. A tree that forks successors, or children that call setsid, cannot
    outrun this. `reap` collects the exit status of our own children (a subreaper's orphans),
    so they do not linger as zombies.
    """
    ended: set[tuple[int, float]] = set()
    for _ in range(KILL_ROUNDS):
        frozen: dict[tuple[int, float], psutil.Process] = {}
        for _ in range(FREEZE_LOOKS):
            new = [p for p in _look(targets, frozen) if (key := identity(p)) and key not in frozen]
            if not new:
                break
            signal_all(new, signal.SIGSTOP)
            for proc in new:
                key = identity(proc)
                if key is not None:
                    frozen[key] = proc
        if not frozen:
            return ended, 0
        signal_all(frozen.values(), signal.SIGKILL)
        ended.update(frozen)
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        while True:
            if reap is not None:
                reap()
            if not any(_running(p) for p in frozen.values()) or time.monotonic() >= deadline:
                break
            time.sleep(KILL_POLL_SECONDS)
    left = _look(targets, {})
    if left:
        log.warning("%d process(es) could not be killed: %s", len(left), [p.pid for p in left])
    return ended, len(left)


# -- the ledger: what a supervisor knows of its run's processes ----------------------------------

# A stopped supervisor (state T: SIGSTOP from its own script, a debugger) cannot end its run; once
# the run should have ended, this much slack is enough to tell "stopped" from "about to act".
STOPPED_SUPERVISOR_MARGIN_SECONDS = 5.0
# A supervisor that runs but has not ended its run this long after the run had to end is hung:
# a healthy one needs at most a few seconds (pipes drain in 2 s, leftovers die in ~4 s), and a
# loaded machine must not make a slow but healthy supervisor look hung.
HUNG_SUPERVISOR_MARGIN_SECONDS = 30.0
_LEDGER_VERSION = 1


def ledger_path(run_dir: Path, attempt: int) -> Path:
    """Where the supervisor of `attempt` keeps its ledger."""
    return run_dir / f"processes-{attempt}.json"


class Ledger(NamedTuple):
    """The processes of one attempt as its supervisor last saw them (`processes-N.json`)."""

    token: str | None = None
    supervisor: tuple[int, float] | None = None
    script: tuple[int, float] | None = None
    members: tuple[tuple[int, float], ...] = ()
    must_end_by: float | None = None
    """Unix time by which every process must be gone: the deadline (or, while paused, the
    wall-clock cap) plus the grace and the SIGTERM courtesy."""
    killed: int = 0
    """How many processes a lost cleanup has killed so far."""
    wedged: str | None = None
    """Set by a cleanup that killed a living supervisor: "stopped" or "hung"."""


def write_ledger(path: Path, ledger: Ledger) -> None:
    """Replace the ledger atomically (0600); an error is logged, never raised: the ledger helps
    a later cleanup, and a full disk must not end the supervision."""
    data = {
        "version": _LEDGER_VERSION,
        "token": ledger.token,
        "supervisor": ledger.supervisor,
        "script": ledger.script,
        "members": ledger.members,
        "must_end_by": ledger.must_end_by,
        "killed": ledger.killed,
        "wedged": ledger.wedged,
    }
    try:
        replace_json(path, data)
    except OSError as exc:
        log.warning("cannot write the process ledger %s: %s", path, exc)


def read_ledger(path: Path | str | None) -> Ledger:
    """The ledger at `path`; an empty one when it is missing or unreadable (the script can write
    into its run folder, so every field is checked and a bad one ignored)."""
    if path is None:
        return Ledger()
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return Ledger()
    if not isinstance(data, dict) or data.get("version") != _LEDGER_VERSION:
        return Ledger()
    members = data.get("members")
    token = data.get("token")
    must_end_by = data.get("must_end_by")
    killed = data.get("killed")
    why = data.get("wedged")
    return Ledger(
        token=token if isinstance(token, str) and token else None,
        supervisor=_ident(data.get("supervisor")),
        script=_ident(data.get("script")),
        members=tuple(i for i in map(_ident, members) if i) if isinstance(members, list) else (),
        must_end_by=float(must_end_by)
        if isinstance(must_end_by, (int, float)) and _number(must_end_by)
        else None,
        killed=killed if isinstance(killed, int) and not isinstance(killed, bool) and killed >= 0 else 0,
        wedged=why if why in ("stopped", "hung") else None,
    )


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _ident(value: object) -> tuple[int, float] | None:
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and isinstance(value[0], int)
        and not isinstance(value[0], bool)
        and value[0] > 0
        and _number(value[1])
    ):
        return value[0], float(value[1])
    return None


def wedged(pid: int, started: float | None, must_end_by: float | None, now: float) -> str | None:
    """Why a living supervisor can no longer be trusted to end its run ("stopped" or "hung"), or
    None. A run whose processes should all be gone by `must_end_by` may overrun it by a margin."""
    proc = exact(pid, started)
    if proc is None or must_end_by is None:
        return None
    try:
        state = proc.status()
    except psutil.Error:
        return None
    if state in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
        return "stopped" if now > must_end_by + STOPPED_SUPERVISOR_MARGIN_SECONDS else None
    return "hung" if now > must_end_by + HUNG_SUPERVISOR_MARGIN_SECONDS else None


def resume_if_stopped(pid: int, started: float | None) -> bool:
    """SIGCONT that exact process if it is stopped (state T); True when it was."""
    proc = exact(pid, started)
    try:
        if proc is None or proc.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
            return False
        proc.send_signal(signal.SIGCONT)
    except psutil.Error:
        return False
    return True


def end_run(
    path: Path | str | None,
    *,
    token: str | None = None,
    supervisor: tuple[int, float | None] | None = None,
    wedged: str | None = None,
) -> tuple[int, int]:
    """End every process of a run whose supervisor is gone or wedged: the supervisor itself
    (pid and start time checked), the ledger's processes and their descendants, those carrying
    the token, and the script's group while its leader is the script. Returns (killed in all
    cleanups so far, still alive) and keeps the count in the ledger, with `wedged` (why a living
    supervisor was killed) for the reader that later records the run as lost."""
    ledger = read_ledger(path)
    idents = [*ledger.members]
    if ledger.script:
        idents.append(ledger.script)
    for who in (supervisor, ledger.supervisor):
        if who is not None and who[1] is not None:
            idents.append((who[0], who[1]))
    targets = Targets(exact=tuple(idents), token=token or ledger.token, group=ledger.script)
    if not targets.exact and targets.token is None:
        return ledger.killed, 0
    ended, left = end_all(targets)
    killed = len(ended)
    total = ledger.killed + killed
    if (killed or wedged) and path is not None and Path(path).is_file():
        # Nobody else writes it now: its supervisor is gone.
        write_ledger(Path(path), ledger._replace(killed=total, wedged=wedged or ledger.wedged))
    return total, left
