"""The stop sequence as documented (issue 15, item 4): the run's own stop signal reaches the script
and its whole process group, SIGTERM follows the grace and SIGKILL follows SIGTERM, each step is an
event, `stop --force` skips the grace, and a CLI interrupted before its run existed exits 130 and
leaves nothing behind."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from backprop_mcp.runs.service import Service
from tests.fault_helpers import alive, assert_nothing_survives, start, supervisor_pid
from tests.helpers import FIXTURES, cli, unique_id, wait_for_end, wait_for_log, wait_until

# Long enough that a run still inside its grace can never end within a test's bounded waits
# (`tests.helpers.WAIT_SECONDS`): only a stop that skips the grace ends it.
LONG_GRACE = 600.0
SHORT_GRACE = 0.5
# A box that ends while the script waits, so the deadline starts the stop sequence.
SHORT_BOX = 0.02  # minutes


def stop_signals(service: Service, run_id: str) -> list[str]:
    """The signals the supervisor sent, in order, from the run's events."""
    return [e["signal"] for e in service.store.read_events(run_id) if e.get("type") == "stop_signal"]


@pytest.mark.parametrize(
    ("stop_signal", "by_deadline"),
    [
        pytest.param("SIGTERM", True, id="SIGTERM-at-the-deadline"),
        pytest.param("SIGUSR1", False, id="SIGUSR1-on-stop"),
    ],
)
def test_a_stop_signal_other_than_sigint_reaches_the_script_which_checkpoints(
    service: Service, stop_signal: str, by_deadline: bool
) -> None:
    box = SHORT_BOX if by_deadline else 10.0
    run_id = start(
        service,
        "checkpoints_on_its_stop_signal.py",
        stop_signal=stop_signal,
        max_run_minutes=box,
        grace_seconds=LONG_GRACE,
    )
    wait_for_log(service, run_id, "ready")
    if not by_deadline:
        service.stop(run_id)
    record = wait_for_end(service, run_id)
    expected = ("timed_out", "deadline") if by_deadline else ("stopped", "stop_requested")
    assert (record["status"], record["termination_reason"]) == expected
    number = getattr(signal, stop_signal)
    # The script handled the signal itself and exited 128 + its number; it was not killed.
    assert (record["exit_code"], record["signal"]) == (128 + number, None)
    assert f"received {stop_signal}" in service.logs(run_id)["lines"]
    assert record["latest_checkpoint"] is not None
    assert Path(record["latest_checkpoint"]).name == f"on-{stop_signal}.json"
    assert Path(record["latest_checkpoint"]).exists()
    assert stop_signals(service, run_id) == [stop_signal]  # the grace never ran out
    assert_nothing_survives(run_id)


def test_a_script_ignoring_only_sigint_ends_on_the_sigterm_after_the_grace_not_by_sigkill(
    service: Service,
) -> None:
    run_id = start(
        service,
        "ignores_sigint_and_checkpoints_on_sigterm.py",
        max_run_minutes=SHORT_BOX,
        grace_seconds=SHORT_GRACE,
    )
    wait_for_log(service, run_id, "ready")
    record = wait_for_end(service, run_id)
    assert (record["status"], record["termination_reason"]) == ("timed_out", "deadline")
    assert (record["exit_code"], record["signal"]) == (0, None)
    assert "received SIGTERM" in service.logs(run_id)["lines"]
    assert record["latest_checkpoint"] is not None and Path(record["latest_checkpoint"]).exists()
    assert stop_signals(service, run_id) == ["SIGINT", "SIGTERM"]
    assert_nothing_survives(run_id)


def test_a_script_ignoring_sigint_and_sigterm_gets_each_step_and_then_sigkill(service: Service) -> None:
    run_id = start(
        service, "ignores_sigint_and_sigterm.py", max_run_minutes=SHORT_BOX, grace_seconds=SHORT_GRACE
    )
    wait_for_log(service, run_id, "ready")
    record = wait_for_end(service, run_id)
    assert (record["status"], record["termination_reason"]) == ("timed_out", "deadline")
    assert (record["exit_code"], record["signal"]) == (None, "SIGKILL")
    assert stop_signals(service, run_id) == ["SIGINT", "SIGTERM", "SIGKILL"]
    assert_nothing_survives(run_id)


def test_the_stop_signal_reaches_the_scripts_child_and_grandchild_in_its_process_group(
    service: Service, tmp_path: Path
) -> None:
    folder = tmp_path / "family"
    folder.mkdir()
    run_id = start(
        service,
        "spawns_a_family_that_records_its_signals.py",
        str(folder),
        stop_signal="SIGUSR2",
        grace_seconds=LONG_GRACE,
    )
    wait_for_log(service, run_id, "ready")
    service.stop(run_id)
    record = wait_for_end(service, run_id)
    assert (record["status"], record["termination_reason"]) == ("stopped", "stop_requested")
    assert (record["exit_code"], record["signal"]) == (0, None)
    received = {path.name: path.read_text(encoding="utf-8").split() for path in sorted(folder.iterdir())}
    assert {role: got[0] for role, got in received.items()} == {
        "script": "SIGUSR2",
        "child": "SIGUSR2",
        "grandchild": "SIGUSR2",
    }
    pids = [int(got[1]) for got in received.values()]
    assert len(set(pids)) == 3
    final = [e for e in service.store.read_events(run_id) if e.get("type") == "state"][-1]
    assert final["leftovers_killed"] == 0  # each exited on the stop signal; none had to be killed
    assert not [pid for pid in pids if alive(pid)]
    assert_nothing_survives(run_id)


def test_stop_force_kills_at_once_without_waiting_for_the_grace(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    run_id = start(service, "ignores_sigint_and_sigterm.py", grace_seconds=LONG_GRACE)
    wait_for_log(service, run_id, "ready")
    supervisor = supervisor_pid(service, run_id)
    done = cli(env, "stop", run_id, "--force", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # The grace is far longer than this wait: only a stop that skips it ends the run in time.
    record = wait_for_end(service, run_id)
    assert (record["status"], record["termination_reason"]) == ("stopped", "stop_requested")
    assert (record["exit_code"], record["signal"]) == (None, "SIGKILL")
    assert stop_signals(service, run_id) == ["SIGKILL"]  # no stop signal, no SIGTERM: no grace
    wait_until(lambda: not alive(supervisor), what="the supervisor to exit")
    assert_nothing_survives(run_id)


def _waiting_for_a_lock(pid: int) -> bool:
    """Whether `pid` is blocked waiting for a file lock (a `->` line of /proc/locks)."""
    with open("/proc/locks", encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) > 5 and fields[1] == "->" and fields[5] == str(pid):
                return True
    return False


def test_ctrl_c_before_the_run_exists_exits_130_and_leaves_no_run(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    run_id = unique_id("interrupted")
    service.store.ensure()
    # Holding the index lock stops `backprop run` inside its start, before the run is whole.
    fd = os.open(service.store.index_lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backprop_mcp",
                "run",
                str(FIXTURES / "counts_and_exits.py"),
                "--run-id",
                run_id,
                "--detach",
            ],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(lambda: _waiting_for_a_lock(proc.pid), what="the CLI to wait for the index lock")
        proc.send_signal(signal.SIGINT)
    finally:
        os.close(fd)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and out == ""
    assert not service.store.run_dir(run_id).exists()
    done = cli(env, "status", run_id, cwd=tmp_path)
    assert done.returncode == 2 and "no run" in done.stderr.lower()
    assert cli(env, "list", "--json", cwd=tmp_path).stdout.count(run_id) == 0
