"""The machine-wide run queue: FIFO tickets and admitted slots, shared by every supervisor under one lock.

Layout under the root (e.g. `<store>/governor/`), folders 0700 and files 0600:

    lock              flock'ed for every read and write; the kernel drops it when its holder dies
    counter.json      the next ticket number (monotonic; rebuilt from the tickets if lost)
    queue/<run>.json  a waiting run: run_id, seq, pid, pid_started, enqueued_at
    slots/<run>.json  an admitted run: run_id, pid, pid_started, gpu_uuid, vram_promise_mb, admitted_at,
                      and (optional) the attempt's process token and ledger path
    corrupt/          unreadable tickets and slots, moved aside

Every operation first drops tickets and slots whose process is gone (dead, a zombie, or a reused
pid with another start time), so a killed supervisor never wedges the queue. A slot is freed only
once its run's processes are gone: when its supervisor died, or is stopped or hung past the run's
end (`proctree.wedged`), its tree is ended first (`proctree.end_run`); the run's record is marked
`lost` by the next reader. Tickets and slots belong to one supervisor (pid and start time): a
late release by a previous attempt never removes the next attempt's. The head of the queue
is decided under the lock and moved into `slots/` before the lock is released, so two starters
can never both take the last slot. Admission is strict FIFO: a head that does not fit blocks the
runs behind it, which keeps the order the user asked for and cannot starve a large run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NotRequired, TypedDict, cast

import psutil

from backprop_mcp.core.errors import StoreError
from backprop_mcp.core.machine import ActiveRun, Decision
from backprop_mcp.governor import proctree

log = logging.getLogger(__name__)

# The longest legitimate hold is one governor decision, whose probe is bounded by two nvidia-smi
# calls of NVIDIA_SMI_TIMEOUT_SECONDS each; a holder past a minute is wedged, and saying so beats
# hanging the CLI or the MCP server.
ADMISSION_LOCK_TIMEOUT_SECONDS = 60.0
# Short enough that a waiter takes the lock soon after release, long enough not to spin a core.
LOCK_POLL_SECONDS = 0.005
# psutil derives a start time from boot time and clock ticks; two reads of one process agree to
# far better than this, while a reused pid differs by at least a tick (10 ms).
PID_START_TOLERANCE_SECONDS = 0.005

_VERSION = 1
# Used with fullmatch: `$` would also match before a final newline, letting "id\n" through.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class _Ticket(TypedDict):
    run_id: str
    seq: int
    pid: int
    pid_started: float
    enqueued_at: float


class _Slot(TypedDict):
    run_id: str
    pid: int
    pid_started: float
    gpu_uuid: str | None
    vram_promise_mb: float
    admitted_at: float
    token: NotRequired[str | None]
    ledger: NotRequired[str | None]


_TICKET_FIELDS: dict[str, tuple[type, ...]] = {
    "run_id": (str,),
    "seq": (int,),
    "pid": (int,),
    "pid_started": (int, float),
    "enqueued_at": (int, float),
}
_SLOT_FIELDS: dict[str, tuple[type, ...]] = {
    "run_id": (str,),
    "pid": (int,),
    "pid_started": (int, float),
    "gpu_uuid": (str, type(None)),
    "vram_promise_mb": (int, float),
    "admitted_at": (int, float),
}
_OPTIONAL_SLOT_FIELDS: dict[str, tuple[type, ...]] = {"token": (str, type(None)), "ledger": (str, type(None))}


def process_alive(pid: int, started: float) -> bool:
    """True while the process `pid`, started at `started` (psutil create_time), still runs."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - started) > PID_START_TOLERANCE_SECONDS:
            return False
        # A SIGKILLed child stays a zombie until its parent reaps it; it holds nothing.
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        # Another user's process that we cannot inspect: not provably dead, so it keeps its place.
        return True


def _check_run_id(run_id: str) -> None:
    # Run ids become file names here; refuse anything that could leave the folder.
    if not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"invalid run id {run_id!r}")


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    # mkstemp creates the file 0600. No fsync: after a power cut a lost ticket or slot only
    # means a supervisor rejoins, and the dead ones are pruned anyway.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": _VERSION, **data}, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Admission:
    """The queue and slots under `root`; safe to use from many processes and threads at once."""

    def __init__(self, root: Path, *, lock_timeout: float = ADMISSION_LOCK_TIMEOUT_SECONDS) -> None:
        self.root = root
        self.lock_timeout = lock_timeout
        self._queue = root / "queue"
        self._slots = root / "slots"
        self._corrupt = root / "corrupt"
        self._counter = root / "counter.json"

    @contextlib.contextmanager
    def _locked(self, timeout: float | None = None) -> Iterator[None]:
        try:
            for folder in (self.root, self._queue, self._slots, self._corrupt):
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open the run queue in {self.root}: {exc.strerror or exc}") from None
        try:
            wait = self.lock_timeout if timeout is None else timeout
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StoreError(
                            f"the run queue lock {self.root / 'lock'} has been held by another "
                            f"process for over {wait:g} s"
                        ) from None
                    time.sleep(LOCK_POLL_SECONDS)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _quarantine(self, path: Path, why: str) -> None:
        target = self._corrupt / f"{path.name}.{time.time_ns()}"
        log.warning("run queue file %s is unreadable (%s); moved to %s", path, why, target)
        with contextlib.suppress(OSError):
            os.replace(path, target)

    def _load(self, folder: Path, fields: dict[str, tuple[type, ...]]) -> dict[str, dict[str, Any]]:
        records: dict[str, dict[str, Any]] = {}
        for path in sorted(folder.iterdir()):
            if path.suffix == ".tmp":
                # Every write happens under the lock we hold, so any temp file is an orphan.
                path.unlink(missing_ok=True)
                continue
            if path.suffix != ".json":
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                self._quarantine(path, str(exc))
                continue
            bad = _invalid(data, fields, path.stem)
            if bad is None and fields is _SLOT_FIELDS:
                bad = _invalid_optional(data, _OPTIONAL_SLOT_FIELDS)
            if bad:
                self._quarantine(path, bad)
                continue
            records[path.stem] = data
        return records

    def _state(self) -> tuple[list[_Ticket], dict[str, _Slot]]:
        """Live tickets in queue order and live slots, after pruning the dead (lock held)."""
        slots: dict[str, _Slot] = {}
        for run_id, raw in self._load(self._slots, _SLOT_FIELDS).items():
            # Validated by _load against _SLOT_FIELDS.
            slot = cast(_Slot, raw)
            why = self._unfit(slot)
            if why is None or not self._reclaim(slot, why):
                slots[run_id] = slot
            else:
                log.info("run %s: its supervisor %s is gone; slot released", run_id, raw["pid"])
                (self._slots / f"{run_id}.json").unlink(missing_ok=True)
        tickets: list[_Ticket] = []
        for run_id, raw in self._load(self._queue, _TICKET_FIELDS).items():
            # A ticket beside its own slot is what a crash between the two writes of admission
            # leaves; beside another supervisor's slot it is the next attempt, waiting.
            if (
                run_id in slots and _owned(slots[run_id], (raw["pid"], raw["pid_started"]))
            ) or not process_alive(raw["pid"], raw["pid_started"]):
                log.info("run %s: dropped from the queue (gone or already admitted)", run_id)
                (self._queue / f"{run_id}.json").unlink(missing_ok=True)
            else:
                tickets.append(cast(_Ticket, raw))
        tickets.sort(key=lambda t: (t["seq"], t["run_id"]))
        return tickets, slots

    def _unfit(self, slot: _Slot) -> str | None:
        """None while the slot's supervisor lives and can still end its run in time; else why
        not: "dead", or "stopped" or "hung" past the run's end."""
        if not process_alive(slot["pid"], slot["pid_started"]):
            return "dead"
        if slot["pid"] == os.getpid():
            return None  # a supervisor pruning the slots never judges, or kills, itself
        ledger = proctree.read_ledger(slot.get("ledger"))
        why = proctree.wedged(slot["pid"], slot["pid_started"], ledger.must_end_by, time.time())
        if why is not None:
            log.warning(
                "run %s: its supervisor %s is %s past the run's end", slot["run_id"], slot["pid"], why
            )
        return why

    def _reclaim(self, slot: _Slot, why: str) -> bool:
        """End the processes of a slot whose supervisor is gone or wedged; True when none is left
        (then the slot may be freed: its processes hold no more CPU, memory or GPU)."""
        _, left = proctree.end_run(
            slot.get("ledger"),
            token=slot.get("token"),
            supervisor=(slot["pid"], slot["pid_started"]),
            wedged=None if why == "dead" else why,
        )
        if left:
            log.warning(
                "run %s: %d of its processes cannot be killed; its slot stays taken", slot["run_id"], left
            )
        return left == 0

    def _next_seq(self, tickets: list[_Ticket]) -> int:
        counter = 1
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            counter = int(json.loads(self._counter.read_text(encoding="utf-8"))["next"])
        # A lost or reset counter must still put a newcomer behind everyone waiting.
        seq = max([counter, *(t["seq"] + 1 for t in tickets)])
        _write_json(self._counter, {"next": seq + 1})
        return seq

    def join(self, run_id: str, pid: int, pid_started: float) -> None:
        """Queue `run_id` for the process `pid` (its supervisor); joining again keeps its place."""
        _check_run_id(run_id)
        with self._locked():
            tickets, slots = self._state()
            if run_id in slots and _owned(slots[run_id], (pid, pid_started)):
                return
            mine = next((t for t in tickets if t["run_id"] == run_id), None)
            seq = mine["seq"] if mine is not None else self._next_seq(tickets)
            ticket = _Ticket(
                run_id=run_id, seq=seq, pid=pid, pid_started=pid_started, enqueued_at=time.time()
            )
            _write_json(self._queue / f"{run_id}.json", ticket)

    def position(self, run_id: str) -> int | None:
        """Place of `run_id` in the queue, 1 being next; None when it is not queued."""
        with self._locked():
            tickets, _ = self._state()
        return next((i for i, t in enumerate(tickets, 1) if t["run_id"] == run_id), None)

    def try_admit(
        self,
        run_id: str,
        decide: Callable[[list[ActiveRun]], Decision],
        *,
        vram_promise_mb: float,
        owner: tuple[int, float] | None = None,
        token: str | None = None,
        ledger: str | None = None,
    ) -> tuple[bool, Decision | None, int | None]:
        """Admit `run_id` if it is at the head of the queue and `decide(active runs)` allows it.

        Returns (admitted, decision, position): the decision is None when the run was not at the
        head (then `decide` was not called); position is its place in the queue, None once
        admitted or when it is not queued. `decide` runs under the lock, so it sees every slot
        taken so far; it should probe and call `governor.evaluate`. The slot records the chosen
        GPU and `vram_promise_mb` (0 when no GPU was chosen) for later decisions.

        `owner` is the caller's (pid, start time): a slot of the same run id held by another
        process (the previous attempt, not yet released) is not the caller's. `token` and
        `ledger` let a later cleanup find the run's processes if the supervisor dies.
        """
        _check_run_id(run_id)
        with self._locked():
            tickets, slots = self._state()
            position = next((i for i, t in enumerate(tickets, 1) if t["run_id"] == run_id), None)
            if run_id in slots:
                if owner is None or _owned(slots[run_id], owner):
                    return True, None, None
                return False, None, position  # the previous attempt still holds it: wait
            if position != 1:
                return False, None, position
            decision = decide([_active(s) for s in slots.values()])
            if not decision["allowed"]:
                return False, decision, 1
            ticket, gpu = tickets[0], decision["gpu"]
            slot = _Slot(
                run_id=run_id,
                pid=ticket["pid"],
                pid_started=ticket["pid_started"],
                gpu_uuid=gpu["uuid"] if gpu is not None else None,
                vram_promise_mb=vram_promise_mb if gpu is not None else 0.0,
                admitted_at=time.time(),
                token=token,
                ledger=ledger,
            )
            # Slot first, then ticket: a crash in between leaves both, which `_state` resolves.
            _write_json(self._slots / f"{run_id}.json", slot)
            (self._queue / f"{run_id}.json").unlink(missing_ok=True)
            return True, decision, None

    def release(self, run_id: str, owner: tuple[int, float | None] | None = None) -> None:
        """Remove `run_id` from the queue and the slots; harmless if it is in neither.

        With `owner` (the supervisor's pid and start time), only that supervisor's ticket and slot
        are removed: another attempt's are left alone."""
        _check_run_id(run_id)
        with self._locked():
            for path in (self._queue / f"{run_id}.json", self._slots / f"{run_id}.json"):
                if owner is not None and not _file_owned(path, owner):
                    continue
                path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """The queue's lock, held for the block: runs admitted elsewhere (the ray backend's, whose
        supervisors are not on this machine) are counted and admitted under it, one starter at a time."""
        with self._locked():
            yield

    def prune(self, *, timeout: float) -> None:
        """Drop dead tickets and reclaim the slots of dead or wedged supervisors, waiting at most
        `timeout` for the lock (a running supervisor looks at the others without stalling)."""
        with self._locked(timeout):
            self._state()

    def active(self) -> list[ActiveRun]:
        """The admitted runs whose processes still live, oldest admission first."""
        with self._locked():
            _, slots = self._state()
        return [_active(s) for s in sorted(slots.values(), key=lambda s: s["admitted_at"])]

    def queued(self) -> list[str]:
        """Run ids waiting, in queue order."""
        with self._locked():
            tickets, _ = self._state()
        return [t["run_id"] for t in tickets]


def _active(slot: _Slot) -> ActiveRun:
    return ActiveRun(
        run_id=slot["run_id"],
        status="running",
        gpu_uuid=slot["gpu_uuid"],
        vram_promise_mb=slot["vram_promise_mb"],
        admitted_at=slot["admitted_at"],
    )


def _owned(entry: Mapping[str, Any], owner: tuple[int, float | None]) -> bool:
    """True when the ticket or slot belongs to the process `owner` (pid, start time if known)."""
    pid, started = owner
    return bool(
        entry["pid"] == pid
        and (started is None or abs(entry["pid_started"] - started) <= PID_START_TOLERANCE_SECONDS)
    )


def _file_owned(path: Path, owner: tuple[int, float | None]) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # missing, or unreadable: `_state` moves it aside, not a release
    return (
        isinstance(data, dict)
        and isinstance(data.get("pid"), int)
        and isinstance(data.get("pid_started"), (int, float))
        and _owned(data, owner)
    )


def _invalid_optional(data: Mapping[str, Any], fields: dict[str, tuple[type, ...]]) -> str | None:
    for key, kinds in fields.items():
        if key in data and not isinstance(data[key], kinds):
            return f"bad {key}"
    return None


def _invalid(data: object, fields: dict[str, tuple[type, ...]], stem: str) -> str | None:
    """Why a loaded ticket or slot is unusable, or None when it is fine."""
    if not isinstance(data, dict) or data.get("version") != _VERSION:
        return "not a version 1 record"
    for key, kinds in fields.items():
        value = data.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool):
            return f"bad or missing {key}"
    if data["run_id"] != stem:
        return "run_id does not match the file name"
    return None
