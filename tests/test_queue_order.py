"""Queue truth: a run takes its place in the machine-wide queue before `start`/`resume` return, so
runs are admitted in the order they were submitted, and every queued answer says its place."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from backprop_mcp.backends import local
from backprop_mcp.core.errors import StoreError
from backprop_mcp.governor.admission import Admission
from backprop_mcp.runs.requests import RunRequest
from backprop_mcp.runs.service import Service
from tests.fault_helpers import start
from tests.helpers import FIXTURES, cli, isolated_env, unique_id, wait_for_end, wait_for_log

# Enough runs that supervisors starting in parallel would overtake each other now and then.
QUEUED_RUNS = 5


@pytest.fixture
def one_slot(tmp_path: Path) -> Iterator[tuple[Service, dict[str, str], str]]:
    """A service with max_parallel=1 whose only slot a waiting run holds; stopped at the end."""
    env = isolated_env(tmp_path / "home", BACKPROP_MAX_PARALLEL="1")
    service = Service(tmp_path / "home", env=env, cwd=tmp_path)
    blocker = start(service, "waits_forever.py")
    wait_for_log(service, blocker, "ready")
    yield service, env, blocker
    for run_id in Admission(service.store.governor_dir).queued():
        service.stop(run_id, force=True)
    if service.get(blocker)["status"] == "running":
        service.stop(blocker)
    wait_for_end(service, blocker)


def _queue(service: Service) -> list[str]:
    return Admission(service.store.governor_dir).queued()


def _admitted_in_order(service: Service, run_ids: list[str], blocker: str) -> None:
    """Free the slot and check that the runs start one after another in the given order."""
    service.stop(blocker)
    ends = [wait_for_end(service, run_id) for run_id in run_ids]
    assert [e["status"] for e in ends] == ["completed"] * len(run_ids)
    started = sorted(run_ids, key=lambda r: service.get(r)["started_at"] or "")
    assert started == run_ids


def test_runs_started_back_to_back_are_queued_and_admitted_in_submission_order(
    one_slot: tuple[Service, dict[str, str], str],
) -> None:
    service, _, blocker = one_slot
    run_ids: list[str] = []
    for n in range(QUEUED_RUNS):
        record = service.start(RunRequest(script=str(FIXTURES / "counts_and_exits.py"), args=["1"]))
        run_ids.append(record["run_id"])
        # The place is taken before start returns, not when the supervisor gets round to it.
        assert _queue(service) == run_ids
        assert (record["status"], record["queue_position"]) == ("queued", n + 1)
    _admitted_in_order(service, run_ids, blocker)


def test_runs_started_by_separate_cli_calls_keep_their_order_and_say_their_place(
    one_slot: tuple[Service, dict[str, str], str], tmp_path: Path
) -> None:
    service, env, blocker = one_slot
    run_ids: list[str] = []
    for n in range(QUEUED_RUNS):
        done = cli(
            env, "run", str(FIXTURES / "counts_and_exits.py"), "--detach", "--json", "--", "1", cwd=tmp_path
        )
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        run_ids.append(answer["run_id"])
        assert (answer["status"], answer["queue_position"]) == ("queued", n + 1)
        assert _queue(service) == run_ids  # the CLI has exited: the ticket is the supervisor's
    _admitted_in_order(service, run_ids, blocker)


def test_a_resumed_run_is_queued_behind_those_submitted_before_it(
    one_slot: tuple[Service, dict[str, str], str],
) -> None:
    service, _, blocker = one_slot
    # A finished run to resume, made under its own store settings (parallel runs allowed there).
    earlier = start(service, "counts_and_exits.py", "1", max_parallel=2)
    assert wait_for_end(service, earlier)["status"] == "completed"
    first = service.start(RunRequest(script=str(FIXTURES / "counts_and_exits.py"), args=["1"]))
    resumed = service.resume(earlier, args=["2"], options={"max_parallel": 1})
    assert (resumed["status"], resumed["queue_position"]) == ("queued", 2)
    assert _queue(service) == [first["run_id"], earlier]
    _admitted_in_order(service, [first["run_id"], earlier], blocker)


def test_a_launch_that_fails_after_taking_its_place_leaves_no_ticket(
    one_slot: tuple[Service, dict[str, str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    never = unique_id("never")
    service, _, _ = one_slot
    spawned: list[subprocess.Popen[bytes]] = []
    real_spawn = local.spawn_supervisor

    def spawn(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        spawned.append(real_spawn(*args, **kwargs))  # type: ignore[arg-type]
        return spawned[-1]

    def broken_pipe(proc: subprocess.Popen[bytes]) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(local, "spawn_supervisor", spawn)
    monkeypatch.setattr(local, "release", broken_pipe)
    with pytest.raises(StoreError):
        service.start(RunRequest(script=str(FIXTURES / "counts_and_exits.py"), run_id=never))
    # Gone at once, not only once a later look at the queue finds its process dead.
    assert not (service.store.governor_dir / "queue" / f"{never}.json").exists()
    assert spawned[0].returncode == 0
    assert not service.store.exists(never)


def test_a_queue_the_starter_cannot_join_does_not_fail_the_start(
    service: Service, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk or a broken lock at launch: the supervisor joins by itself (and, while the queue
    stays unusable, retries and says so; see test_states), as before tickets were taken at launch."""
    late = unique_id("late")

    def no_room(self: Admission, run_id: str, pid: int, started: float) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Admission, "join", no_room)  # in this process only: not the supervisor's
    record = service.start(RunRequest(script=str(FIXTURES / "counts_and_exits.py"), run_id=late, args=["1"]))
    assert record["run_id"] == late
    assert "could not take its place in the run queue now (No space left on device)" in caplog.text
    assert wait_for_end(service, late)["status"] == "completed"


def test_the_supervisors_own_join_keeps_the_place_its_starter_took(tmp_path: Path) -> None:
    admission = Admission(tmp_path / "governor")
    me = (os.getpid(), psutil.Process().create_time())
    admission.join("first", *me)
    admission.join("second", *me)
    admission.join("first", *me)  # the supervisor, joining again after its starter
    assert admission.queued() == ["first", "second"]
