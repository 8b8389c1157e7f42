"""The machine-wide queue: FIFO order, atomic admission across real processes, and self-healing."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

import backprop_mcp
from backprop_mcp.core.errors import StoreError
from backprop_mcp.core.machine import ActiveRun, Decision, GpuInfo
from backprop_mcp.governor.admission import Admission
from backprop_mcp.governor.decisions import default_limits, evaluate
from backprop_mcp.governor.static_probe import static_snapshot_from_json

# Bounds every wait for a line from a child; generous because a loaded CI machine is slow to
# start sixteen interpreters, and a correct run never comes near it.
CHILD_LINE_TIMEOUT_SECONDS = 60.0
SRC = str(Path(backprop_mcp.__file__).resolve().parents[1])

# A stand-in supervisor: joins the queue, polls until admitted by the real governor
# (max_parallel 2), records admission and release in a witness file under its own lock, and
# holds its slot until a line arrives on stdin.
WORKER = r"""
import fcntl, json, sys, time
from pathlib import Path
import psutil
from backprop_mcp.governor.admission import Admission
from backprop_mcp.governor.decisions import default_limits, evaluate
from backprop_mcp.governor.static_probe import static_snapshot_from_json

root, witness, run_id = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
admission = Admission(root)
snapshot = static_snapshot_from_json({"cpu_percent": 5, "ram_available_gb": 64})
limits = default_limits()

def say(word):
    print(word, flush=True)

def witness_add(delta):
    with open(witness, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        state = json.loads(f.read() or '{"inside": 0, "most": 0, "order": [], "events": []}')
        state["inside"] += delta
        state["most"] = max(state["most"], state["inside"])
        if delta > 0:
            state["order"].append(run_id)
        state["events"].append([run_id, delta, time.monotonic()])
        f.seek(0)
        f.truncate()
        json.dump(state, f)

me = psutil.Process()
admission.join(run_id, me.pid, me.create_time())
say("joined")
told_blocked = False
while True:
    admitted, decision, position = admission.try_admit(
        run_id, lambda active: evaluate(snapshot, limits, active, now=time.time()), vram_promise_mb=0
    )
    if admitted:
        break
    if decision is not None and not told_blocked:
        told_blocked = True
        say("blocked")
    time.sleep(0.01)  # a supervisor polls the queue like this
witness_add(+1)
say("admitted")
sys.stdin.readline()
witness_add(-1)
admission.release(run_id)
say("released")
"""

Events = queue.Queue[tuple[str, str]]


class Child:
    """A worker process whose stdout lines arrive, tagged with its name, on a shared queue."""

    def __init__(self, name: str, args: list[str], events: Events) -> None:
        self.name = name
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            env=env,
        )
        self._events = events
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._events.put((self.name, line.strip()))
        self._events.put((self.name, "<eof>"))

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=CHILD_LINE_TIMEOUT_SECONDS)
        self._reader.join(timeout=CHILD_LINE_TIMEOUT_SECONDS)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()


def next_event(events: Events) -> tuple[str, str]:
    try:
        return events.get(timeout=CHILD_LINE_TIMEOUT_SECONDS)
    except queue.Empty:
        raise AssertionError(f"no line from any child within {CHILD_LINE_TIMEOUT_SECONDS} s") from None


def expect(events: Events, name: str, word: str) -> None:
    """Wait for `word` from child `name`; other children's lines must not arrive meanwhile."""
    got = next_event(events)
    assert got == (name, word)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[[str, Events], Child]]:
    children: list[Child] = []

    def start(run_id: str, events: Events) -> Child:
        child = Child(run_id, [str(tmp_path / "governor"), str(tmp_path / "witness.json"), run_id], events)
        children.append(child)
        return child

    yield start
    for child in children:
        child.close()


def me() -> tuple[int, float]:
    proc = psutil.Process()
    return proc.pid, proc.create_time()


def allow(active: list[ActiveRun]) -> Decision:
    return Decision(allowed=True, reasons=[], gpu=None, checks=[])


def refuse(active: list[ActiveRun]) -> Decision:
    return Decision(allowed=False, reasons=["no"], gpu=None, checks=[])


def not_called(active: list[ActiveRun]) -> Decision:
    raise AssertionError("decide must only be called for the head of the queue")


# --- order -------------------------------------------------------------------------------------


def test_runs_are_queued_and_admitted_in_the_order_they_joined(tmp_path: Path) -> None:
    adm = Admission(tmp_path / "governor")
    for run_id in ("c-first", "a-second", "b-third"):
        adm.join(run_id, *me())
    assert adm.queued() == ["c-first", "a-second", "b-third"]
    assert [adm.position(r) for r in ("c-first", "a-second", "b-third", "nobody")] == [1, 2, 3, None]

    assert adm.try_admit("a-second", not_called, vram_promise_mb=0) == (False, None, 2)
    admitted, decision, position = adm.try_admit("c-first", allow, vram_promise_mb=0)
    assert (admitted, decision is not None, position) == (True, True, None)
    assert adm.queued() == ["a-second", "b-third"]
    assert [r["run_id"] for r in adm.active()] == ["c-first"]
    assert adm.position("a-second") == 1


def test_a_refused_head_keeps_its_place_and_blocks_the_runs_behind_it(tmp_path: Path) -> None:
    adm = Admission(tmp_path)
    adm.join("big", *me())
    adm.join("small", *me())
    admitted, decision, position = adm.try_admit("big", refuse, vram_promise_mb=0)
    assert (admitted, position) == (False, 1)
    assert decision is not None
    assert decision["reasons"] == ["no"]
    assert adm.try_admit("small", not_called, vram_promise_mb=0) == (False, None, 2)
    assert adm.queued() == ["big", "small"]


def test_joining_again_keeps_the_place_in_the_queue(tmp_path: Path) -> None:
    adm = Admission(tmp_path)
    adm.join("a", *me())
    adm.join("b", *me())
    adm.join("a", *me())
    assert adm.queued() == ["a", "b"]


def test_release_removes_a_ticket_or_a_slot_and_is_idempotent(tmp_path: Path) -> None:
    adm = Admission(tmp_path)
    adm.join("a", *me())
    adm.join("b", *me())
    adm.try_admit("a", allow, vram_promise_mb=0)
    adm.release("a")
    adm.release("b")
    adm.release("b")
    adm.release("never-joined")
    assert (adm.active(), adm.queued()) == ([], [])


def test_decide_sees_the_admitted_runs_with_their_gpu_and_promise(tmp_path: Path) -> None:
    adm = Admission(tmp_path)
    snapshot = static_snapshot_from_json(
        {"cpu_percent": 5, "ram_available_gb": 64, "gpus": [{"index": 0, "memory_free_mb": 6000}]}
    )
    limits = default_limits()
    seen: list[list[ActiveRun]] = []

    def decide(active: list[ActiveRun]) -> Decision:
        seen.append(active)
        return evaluate(snapshot, limits, active, now=time.time())

    adm.join("first", *me())
    adm.join("second", *me())
    admitted, decision, _ = adm.try_admit("first", decide, vram_promise_mb=4000)
    assert admitted
    assert decision is not None
    gpu: GpuInfo | None = decision["gpu"]
    assert gpu is not None
    assert gpu["uuid"] == "GPU-static-0"
    admitted, decision, position = adm.try_admit("second", decide, vram_promise_mb=4000)
    assert (admitted, position) == (False, 1)
    assert [(r["run_id"], r["gpu_uuid"], r["vram_promise_mb"]) for r in seen[1]] == [
        ("first", "GPU-static-0", 4000)
    ]
    assert decision is not None
    assert decision["reasons"] == [
        "GPU 0 (Static GPU 0): 2000 MB free (after 4000 MB promised) < 2500 MB required"
    ]


def test_a_run_on_cpu_promises_no_vram(tmp_path: Path) -> None:
    adm = Admission(tmp_path)
    adm.join("cpu", *me())
    adm.try_admit("cpu", allow, vram_promise_mb=4000)
    assert [(r["gpu_uuid"], r["vram_promise_mb"]) for r in adm.active()] == [(None, 0.0)]


def test_run_ids_that_could_escape_the_folder_are_refused(tmp_path: Path) -> None:
    adm = Admission(tmp_path)
    for bad in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(ValueError, match="invalid run id"):
            adm.join(bad, *me())


def test_queue_files_are_private(tmp_path: Path) -> None:
    root = tmp_path / "governor"
    adm = Admission(root)
    adm.join("a", *me())
    adm.join("b", *me())
    adm.try_admit("a", allow, vram_promise_mb=0)
    for folder in (root, root / "queue", root / "slots"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in (root / "lock", root / "counter.json", root / "queue" / "b.json", root / "slots" / "a.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


# --- many processes ----------------------------------------------------------------------------


def test_sixteen_supervisors_never_exceed_max_parallel_and_are_admitted_in_join_order(
    tmp_path: Path, spawn: Callable[[str, Events], Child]
) -> None:
    events: Events = queue.Queue()
    names = [f"run-{i:02d}" for i in range(16)]
    children: dict[str, Child] = {}
    backlog: list[tuple[str, str]] = []
    for name in names:
        # One at a time, so that the join order is known; earlier workers' lines wait in backlog.
        children[name] = spawn(name, events)
        while (event := next_event(events)) != (name, "joined"):
            assert event[1] != "<eof>", f"{event[0]} died"
            backlog.append(event)

    admitted: list[str] = []
    holding: list[str] = []
    blocked: set[str] = set()
    told: set[str] = set()
    while len(admitted) < len(names) or holding:
        who, word = backlog.pop(0) if backlog else next_event(events)
        assert word != "<eof>" or who in told, f"{who} died"
        if word == "admitted":
            admitted.append(who)
            holding.append(who)
            assert len(holding) <= 2
        elif word == "blocked":
            blocked.add(who)
        waiting = [n for n in names if n not in admitted]
        # Release only once the next in line has been refused with two slots taken, so that
        # every admission is a real test of the limit; at the end, release one per event.
        if holding and (not waiting or (len(holding) == 2 and waiting[0] in blocked)):
            told.add(holding[0])
            children[holding.pop(0)].tell("release")

    assert admitted == names
    assert blocked == set(names[2:])
    for child in children.values():
        assert child.proc.wait(timeout=CHILD_LINE_TIMEOUT_SECONDS) == 0
    witness = json.loads((tmp_path / "witness.json").read_text(encoding="utf-8"))
    assert witness["most"] == 2
    assert witness["inside"] == 0
    assert witness["order"] == names
    adm = Admission(tmp_path / "governor")
    assert (adm.active(), adm.queued()) == ([], [])


# --- self-healing ------------------------------------------------------------------------------


def test_the_slot_of_a_supervisor_killed_with_sigkill_is_freed(
    tmp_path: Path, spawn: Callable[[str, Events], Child]
) -> None:
    adm = Admission(tmp_path / "governor")
    events: Events = queue.Queue()
    doomed = spawn("doomed", events)
    expect(events, "doomed", "joined")
    expect(events, "doomed", "admitted")
    assert [r["run_id"] for r in adm.active()] == ["doomed"]
    adm.join("next", *me())
    assert adm.try_admit("next", refuse, vram_promise_mb=0)[0] is False

    doomed.proc.send_signal(signal.SIGKILL)
    # Wait until it is dead but not reaped: a zombie must already count as gone.
    os.waitid(os.P_PID, doomed.proc.pid, os.WEXITED | os.WNOWAIT)
    assert adm.active() == []
    doomed.proc.wait(timeout=CHILD_LINE_TIMEOUT_SECONDS)
    assert adm.active() == []
    assert adm.try_admit(
        "next", lambda active: allow(active) if not active else refuse(active), vram_promise_mb=0
    )[0]


def test_a_ticket_whose_pid_was_reused_by_another_process_is_dropped(tmp_path: Path) -> None:
    adm = Admission(tmp_path)
    pid, started = me()
    adm.join("ghost", pid, started - 100.0)
    adm.join("live", pid, started)
    assert adm.queued() == ["live"]


def test_corrupt_tickets_and_slots_are_moved_aside_and_do_not_wedge_the_queue(tmp_path: Path) -> None:
    adm = Admission(tmp_path)
    adm.join("first", *me())
    (tmp_path / "queue" / "aaa.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "queue" / "bbb.json").write_text('{"version": 1, "run_id": "bbb"}', encoding="utf-8")
    (tmp_path / "queue" / "ccc.json").write_text(
        json.dumps({"version": 1, "run_id": "other", "seq": 0, "pid": 1, "pid_started": 0, "enqueued_at": 0}),
        encoding="utf-8",
    )
    (tmp_path / "slots" / "ddd.json").write_text("\x00\x01", encoding="utf-8")
    (tmp_path / "queue" / ".orphan.tmp").write_text("half a ticket", encoding="utf-8")
    (tmp_path / "counter.json").write_text("garbage", encoding="utf-8")
    adm.join("second", *me())

    assert adm.queued() == ["first", "second"]
    assert adm.try_admit("first", allow, vram_promise_mb=0)[0]
    assert sorted(p.name.split(".json")[0] for p in (tmp_path / "corrupt").iterdir()) == [
        "aaa",
        "bbb",
        "ccc",
        "ddd",
    ]
    assert not (tmp_path / "queue" / ".orphan.tmp").exists()


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path: Path) -> None:
    root = tmp_path / "governor"
    Admission(root).queued()  # creates the lock file
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            "f = open(sys.argv[1], 'a')\n"
            "fcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(3600)\n",
            str(root / "lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(StoreError, match="held by another process"):
            Admission(root, lock_timeout=0.05).queued()
        holder.kill()
        holder.wait(timeout=CHILD_LINE_TIMEOUT_SECONDS)
        adm = Admission(root, lock_timeout=CHILD_LINE_TIMEOUT_SECONDS)
        adm.join("after", *me())
        assert adm.queued() == ["after"]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
