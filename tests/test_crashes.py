"""Crashes (issue 5, item 2): the starter dying does not end a run, a dead supervisor makes its run
`lost` with nothing left alive, and after every backprop process is killed at once the next
command tells the truth about every run and nothing keeps running."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import psutil

from backprop_mcp.core.records import ACTIVE_STATES, TERMINAL_STATES
from backprop_mcp.runs.service import Service
from tests.fault_helpers import alive, assert_nothing_survives, start, supervisor_pid
from tests.helpers import FIXTURES, cli_json, unique_id, wait_for_end, wait_for_log, wait_until


def _foreground(
    env: dict[str, str], cwd: Path, run_id: str, fixture: str, *options: str
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "backprop_mcp", "run", str(FIXTURES / fixture), "--run-id", run_id, *options],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_runs_started_by_foreground_clis_killed_with_sigkill_finish_and_are_recorded(
    env: dict[str, str], service: Service, tmp_path: Path
) -> None:
    times_out = unique_id("times-out")
    forced = unique_id("forced")
    completes = unique_id("completes")
    starters = [
        _foreground(env, tmp_path, times_out, "checkpoints_on_sigint.py", "-m", "0.03"),
        _foreground(env, tmp_path, forced, "ignores_sigint_and_sigterm.py"),
        _foreground(env, tmp_path, completes, "waits_forever.py"),
    ]
    for run_id in (times_out, forced, completes):
        wait_until(partial(service.store.exists, run_id), what=f"{run_id} to be created")
        wait_for_log(service, run_id, "ready")
    for starter in starters:
        starter.kill()
    for starter in starters:
        starter.wait()
    service.stop(forced, force=True)
    service.stop(completes)
    timed_out = wait_for_end(service, times_out)
    assert (timed_out["status"], timed_out["termination_reason"], timed_out["exit_code"]) == (
        "timed_out",
        "deadline",
        130,
    )
    assert timed_out["latest_checkpoint"] is not None and Path(timed_out["latest_checkpoint"]).exists()
    killed = wait_for_end(service, forced)
    assert (killed["status"], killed["termination_reason"], killed["signal"]) == (
        "stopped",
        "stop_requested",
        "SIGKILL",
    )
    stopped = wait_for_end(service, completes)
    assert (stopped["status"], stopped["termination_reason"], stopped["exit_code"]) == (
        "stopped",
        "stop_requested",
        0,
    )
    assert_nothing_survives(times_out, forced, completes)


def test_a_sigkilled_supervisor_makes_its_run_lost_and_kills_its_daemons_and_grandchildren(
    env: dict[str, str], tmp_path: Path
) -> None:
    service = Service(Path(env["BACKPROP_HOME"]), env={**env, "BACKPROP_MAX_PARALLEL": "1"}, cwd=tmp_path)
    pid_file = tmp_path / "daemon.pid"
    daemon_run = start(service, "spawns_daemon.py", str(pid_file))
    wait_for_log(service, daemon_run, "ready")
    tree_run_supervisor = supervisor_pid(service, daemon_run)
    daemon = int(pid_file.read_text(encoding="utf-8"))
    os.kill(tree_run_supervisor, signal.SIGKILL)
    wait_until(lambda: not alive(tree_run_supervisor), what="the supervisor to die")
    record = service.get(daemon_run)
    assert (record["status"], record["termination_reason"]) == ("lost", "supervisor_lost")
    assert "killed" in (record["status_detail"] or "")
    assert record["attempts"][-1]["status"] == "lost"
    assert not alive(daemon)
    assert_nothing_survives(daemon_run)
    # Its slot was freed: with max_parallel 1 the next run is admitted and completes.
    after = wait_for_end(service, start(service, "counts_and_exits.py", "2"))
    assert after["status"] == "completed"


def test_a_supervisor_killed_while_queued_leaves_a_lost_run_and_no_stale_ticket(
    env: dict[str, str], tmp_path: Path
) -> None:
    service = Service(Path(env["BACKPROP_HOME"]), env={**env, "BACKPROP_MAX_PARALLEL": "1"}, cwd=tmp_path)
    holder = start(service, "waits_forever.py")
    wait_for_log(service, holder, "ready")
    queued = start(service, "counts_and_exits.py", "2")
    wait_until(lambda: service.get(queued)["queue_position"] == 1, what="the second run to queue")
    os.kill(supervisor_pid(service, queued), signal.SIGKILL)
    wait_until(lambda: service.get(queued)["status"] == "lost", what="the queued run to be lost")
    service.stop(holder)
    wait_for_end(service, holder)
    third = wait_for_end(service, start(service, "counts_and_exits.py", "2"))
    assert third["status"] == "completed"  # the dead ticket did not block the head of the queue
    assert_nothing_survives(holder, queued, third["run_id"])


def _backprop_processes(home: str) -> list[psutil.Process]:
    """Every process of this store: CLIs, supervisors, scripts and their children."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get("BACKPROP_HOME") == home:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def test_killing_every_backprop_process_at_once_leaves_truthful_records_and_nothing_running(
    env: dict[str, str], tmp_path: Path
) -> None:
    after = unique_id("after")
    env = {**env, "BACKPROP_MAX_PARALLEL": "2"}
    home = env["BACKPROP_HOME"]
    run_ids = [unique_id(f"r{n}") for n in range(5)]
    for run_id in run_ids[:4]:
        cli_json(
            env,
            "run",
            str(FIXTURES / "spawns_grandchildren.py"),
            "--run-id",
            run_id,
            "--detach",
            cwd=tmp_path,
        )
    follower = _foreground(env, tmp_path, run_ids[4], "waits_forever.py")
    service = Service(Path(home), env=env, cwd=tmp_path)
    wait_until(lambda: service.store.exists(run_ids[4]), what="the foreground run to be created")
    for run_id in run_ids:
        supervisor_pid(service, run_id)  # every run has its supervisor before the cut
    wait_until(
        lambda: sum(service.store.read(r)["status"] == "running" for r in run_ids) == 2,
        what="two runs to be running",
    )
    wait_until(
        lambda: all(
            service.store.read(r)["status"] == "queued" and service.store.read(r)["supervisor_pid"]
            for r in run_ids
            if service.store.read(r)["status"] != "running"
        ),
        what="the others to be queued by their supervisors",
    )
    victims = _backprop_processes(home)
    assert len(victims) >= 1 + 5 + 2 * 7  # the follower, five supervisors, two running trees of seven
    for proc in victims:  # as close to at once as a user-space loop gets: a power cut
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    follower.wait()
    wait_until(lambda: not [p for p in victims if alive(p.pid)], what="every victim to die")
    page = cli_json(env, "list")
    rows = {row["run_id"]: row for row in page["runs"]}
    assert set(rows) == set(run_ids)  # no record lost
    assert all(row["status"] == "lost" for row in rows.values()), rows
    for run_id in run_ids:
        record = cli_json(env, "status", run_id)
        assert (record["status"], record["termination_reason"]) == ("lost", "supervisor_lost")
        assert record["ended_at"] is not None
    system = cli_json(env, "status")
    assert system["live_runs"] == [] and system["queued_runs"] == []
    assert not _backprop_processes(home)
    assert_nothing_survives(*run_ids)
    # Nothing stale: no slot, ticket or lock stops the next run.
    done = cli_json(env, "run", str(FIXTURES / "counts_and_exits.py"), "--run-id", after, cwd=tmp_path)
    assert done["status"] == "completed"
    assert not [r for r in cli_json(env, "list")["runs"] if r["status"] in ACTIVE_STATES]
    assert all(r["status"] in TERMINAL_STATES for r in cli_json(env, "list")["runs"])
    index = Path(home, "index.jsonl").read_bytes().splitlines()
    assert all(json.loads(line) for line in index)


def _rpc(
    server: subprocess.Popen[str], request_id: int, method: str, params: dict[str, object]
) -> dict[str, object]:
    """One JSON-RPC request over the server's stdio, and its response (notifications skipped)."""
    assert server.stdin is not None and server.stdout is not None
    server.stdin.write(
        json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}) + "\n"
    )
    server.stdin.flush()
    while True:
        line = server.stdout.readline()
        assert line, "the MCP server closed its stdout"
        message = json.loads(line)
        if message.get("id") == request_id:
            return dict(message)


def test_runs_started_over_mcp_finish_and_are_recorded_after_the_server_is_sigkilled(
    env: dict[str, str], service: Service, tmp_path: Path
) -> None:
    box_id = unique_id("mcp-box")
    stop_id = unique_id("mcp-stop")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "backprop-mcp"), "--root", str(FIXTURES)],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        hello = _rpc(
            server,
            1,
            "initialize",
            {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "crash-test", "version": "0"},
            },
        )
        assert "result" in hello, hello
        assert server.stdin is not None
        server.stdin.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}) + "\n")
        server.stdin.flush()
        for n, (run_id, script, minutes) in enumerate(
            ((box_id, "checkpoints_on_sigint.py", 0.03), (stop_id, "waits_forever.py", 10))
        ):
            reply = _rpc(
                server,
                2 + n,
                "tools/call",
                {
                    "name": "run_training",
                    "arguments": {
                        "script": str(FIXTURES / script),
                        "run_id": run_id,
                        "max_run_minutes": minutes,
                        "options": {"use_gpu": False},
                    },
                },
            )
            assert not reply["result"]["isError"], reply  # type: ignore[index]
        for run_id in (box_id, stop_id):
            wait_for_log(service, run_id, "ready")
        server.kill()
        server.wait()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        for stream in (server.stdin, server.stdout):
            if stream is not None:
                stream.close()
    assert service.get(stop_id)["status"] == "running"  # the server's death stopped nothing
    service.stop(stop_id)
    boxed = wait_for_end(service, box_id)
    assert (boxed["status"], boxed["termination_reason"]) == ("timed_out", "deadline")
    assert boxed["latest_checkpoint"] is not None
    stopped = wait_for_end(service, stop_id)
    assert (stopped["status"], stopped["termination_reason"]) == ("stopped", "stop_requested")
    assert_nothing_survives(box_id, stop_id)
