"""A run's processes (issue 9, items 2-6): a cleanup kills exactly the run's own processes (never
another store's, never a reused pid), all of them (forkers, setsid and env-cleared daemons), and
always: a supervisor killed or stopped by its own script does not free its slot or switch off
its time box, and one attempt never releases another attempt's slot."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from backprop_mcp.core.machine import ActiveRun, Decision
from backprop_mcp.governor.admission import Admission
from backprop_mcp.runs.requests import RunRequest
from backprop_mcp.runs.service import Service
from tests.fault_helpers import alive, assert_nothing_survives, start, supervisor_pid
from tests.helpers import FIXTURES, processes_with_run_id, unique_id, wait_for_end, wait_for_log, wait_until

# Short boxes and graces keep these tests fast; the scripts never checkpoint.
SHORT_GRACE = 0.5  # seconds
SHORT_BOX = 0.02  # minutes: 1.2 s
# Rounds of SIGKILL when a test cleans up after a failure (forkers may outrun one round).
CLEANUP_ROUNDS = 100


def _service(env: dict[str, str], tmp_path: Path, **extra: str) -> Service:
    return Service(Path(env["BACKPROP_HOME"]), env={**env, **extra}, cwd=tmp_path)


def _kill_everything_of(run_id: str, *pids: int, service: Service | None = None) -> None:
    """After a failed test: leave no process behind (a forker outlives a single kill, and a
    stopped supervisor does not carry the run id)."""
    if service is not None:
        with contextlib.suppress(OSError):
            info = json.loads((service.store.run_dir(run_id) / "supervisor.pid").read_text(encoding="utf-8"))
            pids = (*pids, int(info["pid"]))
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for _ in range(CLEANUP_ROUNDS):
        procs = processes_with_run_id(run_id)
        if not procs:
            return
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGSTOP)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)


@contextlib.contextmanager
def _bystander(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process in its own session (its pid is its group), waiting forever."""
    proc = subprocess.Popen(
        [sys.executable, str(FIXTURES / "waits_forever.py")],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _script_pid(service: Service, run_id: str) -> int:
    return wait_until(lambda: service.store.read(run_id)["script_pid"], what=f"the script of {run_id}")


def _ledger_pids(service: Service, run_id: str) -> set[int]:
    """The pids a run's supervisor has recorded in its ledger (empty when it keeps none)."""
    path = service.store.run_dir(run_id) / "processes-1.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return {member[0] for member in data.get("members", [])}


# --- item 2: exactly the run's own -------------------------------------------------------------


def test_a_lost_cleanup_spares_a_process_of_another_store_with_the_same_run_id(
    env: dict[str, str], service: Service, tmp_path: Path
) -> None:
    same = unique_id("same")
    other_store = {**env, "BACKPROP_HOME": str(tmp_path / "other"), "BACKPROP_RUN_ID": same}
    with _bystander(other_store) as bystander:
        run_id = _start_with_id(service, same)
        wait_for_log(service, run_id, "ready")
        script = _script_pid(service, run_id)
        os.kill(supervisor_pid(service, run_id), signal.SIGKILL)
        record = wait_for_end(service, run_id)
        assert (record["status"], record["termination_reason"]) == ("lost", "supervisor_lost")
        assert not alive(script)
        assert bystander.poll() is None, "the other store's process with the same run id was killed"


def _start_with_id(service: Service, run_id: str, fixture: str = "waits_forever.py") -> str:
    return service.start(RunRequest(script=str(FIXTURES / fixture), run_id=run_id))["run_id"]


def test_a_lost_cleanup_never_kills_a_process_that_reused_the_scripts_pid(
    env: dict[str, str], service: Service
) -> None:
    run_id = start(service, "waits_forever.py")
    wait_for_log(service, run_id, "ready")
    script = _script_pid(service, run_id)
    script_started = psutil.Process(script).create_time()
    supervisor = supervisor_pid(service, run_id)
    # Everything of the run dies at once (a power cut of its own), then an unrelated process
    # stands where the script was: a record and ledger whose script pid is that process's.
    for pid in (supervisor, script):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(supervisor) and not alive(script), what="the run's processes to die")
    outsider = {k: v for k, v in env.items() if not k.startswith("BACKPROP_")}
    with _bystander(outsider) as bystander:
        record = service.store.read(run_id)
        record["script_pid"] = bystander.pid
        service.store.write(record)
        ledger = service.store.run_dir(run_id) / "processes-1.json"
        if ledger.exists():
            data = json.loads(ledger.read_text(encoding="utf-8"))
            data["script"] = [bystander.pid, script_started]
            data["members"] = [[bystander.pid, script_started]]
            ledger.write_text(json.dumps(data), encoding="utf-8")
        assert service.get(run_id)["status"] == "lost"
        assert bystander.poll() is None, "a process that reused the script's pid was killed"


# --- item 3: all of them -----------------------------------------------------------------------


def test_leftovers_that_ignore_sigterm_and_fork_successors_are_all_killed_before_the_run_ends(
    service: Service,
) -> None:
    run_id = start(service, "ignores_sigterm_and_forks_successors.py", "4", grace_seconds=SHORT_GRACE)
    try:
        record = wait_for_end(service, run_id)
        assert (record["status"], record["exit_code"]) == ("completed", 0)
        # The record is final only once none is left: no wait here.
        left = processes_with_run_id(run_id)
        assert left == [], f"{len(left)} forker(s) survived the run"
        assert "process(es) it left behind were killed" in (record["status_detail"] or "")
        states = [e for e in service.store.read_events(run_id) if e.get("status") == "completed"]
        assert states[-1]["leftovers_killed"] >= 4
    finally:
        _kill_everything_of(run_id)


# --- item 4: a supervisor killed by its script -------------------------------------------------


def test_a_supervisor_killed_by_its_script_keeps_its_slot_until_its_env_cleared_daemon_is_dead(
    env: dict[str, str], tmp_path: Path
) -> None:
    service = _service(env, tmp_path, BACKPROP_MAX_PARALLEL="1", BACKPROP_SAMPLE_INTERVAL_SECONDS="0.05")
    pid_file, go_file = tmp_path / "daemon.pid", tmp_path / "go"
    run_id = start(service, "kills_its_supervisor.py", str(pid_file), str(go_file))
    daemon = script = 0
    try:
        wait_for_log(service, run_id, "ready")
        daemon = int(pid_file.read_text(encoding="utf-8"))
        script = _script_pid(service, run_id)
        assert "BACKPROP_RUN_ID" not in psutil.Process(daemon).environ()
        # The supervisor has seen the daemon (it records what it sees at each sample).
        wait_until(lambda: daemon in _ledger_pids(service, run_id), what="the daemon in the ledger")
        supervisor = supervisor_pid(service, run_id)
        go_file.touch()
        wait_until(lambda: not alive(supervisor), what="the script to kill its supervisor")
        # With max_parallel 1, the next run is admitted only once the dead run's tree is gone.
        after = wait_for_end(service, start(service, "counts_and_exits.py", "2"))
        assert after["status"] == "completed"
        assert not alive(script), "the next run was admitted while the dead run's script lived"
        assert not alive(daemon), "the env-cleared daemon survived"
        record = service.get(run_id)
        assert (record["status"], record["termination_reason"]) == ("lost", "supervisor_lost")
        assert "process(es) of the run were killed" in (record["status_detail"] or "")
    finally:
        _kill_everything_of(run_id, *(p for p in (daemon, script) if p))


def test_a_reader_kills_the_env_cleared_daemon_of_a_run_whose_supervisor_was_killed(
    env: dict[str, str], tmp_path: Path
) -> None:
    service = _service(env, tmp_path, BACKPROP_SAMPLE_INTERVAL_SECONDS="0.05")
    pid_file, go_file = tmp_path / "daemon.pid", tmp_path / "go"
    run_id = start(service, "kills_its_supervisor.py", str(pid_file), str(go_file))
    daemon = 0
    try:
        wait_for_log(service, run_id, "ready")
        daemon = int(pid_file.read_text(encoding="utf-8"))
        wait_until(lambda: daemon in _ledger_pids(service, run_id), what="the daemon in the ledger")
        supervisor = supervisor_pid(service, run_id)
        go_file.touch()
        wait_until(lambda: not alive(supervisor), what="the script to kill its supervisor")
        assert service.get(run_id)["status"] == "lost"
        assert not alive(daemon)
        assert_nothing_survives(run_id)
    finally:
        _kill_everything_of(run_id, *(p for p in (daemon,) if p))


# --- item 5: a supervisor stopped by its script ------------------------------------------------


def _stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


def test_a_supervisor_stopped_by_its_script_is_ended_with_its_run_after_the_deadline(
    env: dict[str, str], tmp_path: Path
) -> None:
    service = _service(env, tmp_path, BACKPROP_MAX_PARALLEL="1")
    run_id = start(service, "stops_its_supervisor.py", max_run_minutes=SHORT_BOX, grace_seconds=SHORT_GRACE)
    script = 0
    try:
        # The stopped supervisor no longer drains the output: wait for its state instead.
        supervisor = supervisor_pid(service, run_id)
        wait_until(lambda: _stopped(supervisor), what="the supervisor to be stopped")
        script = psutil.Process(supervisor).children()[0].pid
        # Another supervisor notices: the queued run is admitted once the stopped one's run is
        # past its end, and only after its processes are gone.
        after = wait_for_end(service, start(service, "counts_and_exits.py", "2"))
        assert after["status"] == "completed"
        assert not alive(script) and not alive(supervisor)
        record = service.get(run_id)
        assert (record["status"], record["termination_reason"]) == ("lost", "supervisor_lost")
        assert "stopped" in (record["status_detail"] or "")
        assert_nothing_survives(run_id)
    finally:
        _kill_everything_of(run_id, *(p for p in (script,) if p), service=service)


def test_a_reader_ends_the_run_of_a_supervisor_stopped_past_the_deadline(service: Service) -> None:
    run_id = start(service, "stops_its_supervisor.py", max_run_minutes=SHORT_BOX, grace_seconds=SHORT_GRACE)
    try:
        supervisor = supervisor_pid(service, run_id)
        wait_until(lambda: _stopped(supervisor), what="the supervisor to be stopped")
        record = wait_for_end(service, run_id)
        assert (record["status"], record["termination_reason"]) == ("lost", "supervisor_lost")
        assert not alive(supervisor)
        assert_nothing_survives(run_id)
    finally:
        _kill_everything_of(run_id, service=service)


@pytest.mark.parametrize(("again", "force"), [(False, False), (False, True), (True, True)])
def test_stop_works_on_a_run_whose_supervisor_its_script_stopped(
    service: Service, again: bool, force: bool
) -> None:
    args = ["again"] if again else []
    run_id = start(service, "stops_its_supervisor.py", *args, grace_seconds=SHORT_GRACE)
    try:
        wait_until(lambda: _stopped(supervisor_pid(service, run_id)), what="the supervisor to be stopped")
        service.stop(run_id, force=force)
        record = wait_for_end(service, run_id)
        assert (record["status"], record["termination_reason"]) == ("stopped", "stop_requested")
        assert_nothing_survives(run_id)
    finally:
        _kill_everything_of(run_id, service=service)


# --- item 6: exactly this attempt's slot -------------------------------------------------------


def _allow(active: list[ActiveRun]) -> Decision:
    return Decision(allowed=not active, reasons=[] if not active else ["full"], gpu=None, checks=[])


def test_a_late_release_by_the_previous_attempt_never_frees_the_next_attempts_slot(tmp_path: Path) -> None:
    adm = Admission(tmp_path / "governor")
    me = psutil.Process()
    old = (me.pid, me.create_time())
    with _bystander({k: v for k, v in os.environ.items() if not k.startswith("BACKPROP_")}) as other:
        new = (other.pid, psutil.Process(other.pid).create_time())
        adm.join("run", *old)
        assert adm.try_admit("run", _allow, vram_promise_mb=0, owner=old)[0]
        # The next attempt's supervisor joins while the previous one still holds the slot.
        adm.join("run", *new)
        assert not adm.try_admit("run", _allow, vram_promise_mb=0, owner=new)[0]
        adm.release("run", old)
        assert adm.queued() == ["run"], "the previous attempt's release removed the next one's ticket"
        assert adm.try_admit("run", _allow, vram_promise_mb=0, owner=new)[0]
        adm.release("run", old)  # late, again: it must not touch the new slot
        assert [a["run_id"] for a in adm.active()] == ["run"]
        adm.join("second", *old)
        assert not adm.try_admit("second", _allow, vram_promise_mb=0, owner=old)[0]
        adm.release("run", new)
        assert adm.try_admit("second", _allow, vram_promise_mb=0, owner=old)[0]
