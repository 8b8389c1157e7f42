"""Supervised runs end to end: real scripts, real signals, real files (issue: Runs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from backprop_mcp.core.errors import NoCheckpoint, RunStateError, UsageError
from backprop_mcp.runs.requests import RunRequest
from backprop_mcp.runs.service import Service
from tests.helpers import (
    FIXTURES,
    cli,
    cli_json,
    no_survivors,
    start_at_once,
    unique_id,
    wait_for_end,
    wait_for_log,
    wait_until,
)


def start(service: Service, fixture: str, *args: str, **options: object) -> str:
    request = RunRequest(script=str(FIXTURES / fixture), args=list(args), options=dict(options))
    return service.start(request)["run_id"]


def test_a_script_that_exits_zero_is_completed_with_its_progress_and_checkpoint(
    service: Service, tmp_path: Path
) -> None:
    run_id = start(service, "counts_and_exits.py", "7", "--lr", "0.1")
    record = wait_for_end(service, run_id)
    assert record["status"] == "completed"
    assert record["termination_reason"] == "exit_zero"
    assert record["exit_code"] == 0
    assert (record["step"], record["total"]) == (7, 7)
    assert record["loss"] == pytest.approx(1 / 7)
    assert record["metrics"] == {"acc": 1.0}
    assert record["latest_checkpoint"] == str(tmp_path / "ck.json")
    assert record["attempts"][0]["status"] == "completed"
    log = service.logs(run_id)["lines"]
    assert 'args: ["7", "--lr", "0.1"]' in log
    assert no_survivors(run_id)


def test_a_script_that_exits_nonzero_is_failed_with_its_exit_code(service: Service) -> None:
    record = wait_for_end(service, start(service, "exits_nonzero.py"))
    assert (record["status"], record["termination_reason"], record["exit_code"]) == (
        "failed",
        "exit_nonzero",
        3,
    )
    assert "something went wrong" in service.logs(record["run_id"])["lines"]


def test_a_script_killed_by_a_signal_is_failed_with_the_signal(service: Service, tmp_path: Path) -> None:
    script = tmp_path / "dies.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", encoding="utf-8")
    run_id = service.start(RunRequest(script=str(script)))["run_id"]
    record = wait_for_end(service, run_id)
    assert (record["status"], record["termination_reason"], record["signal"]) == (
        "failed",
        "signal",
        "SIGSEGV",
    )


def test_the_deadline_sends_sigint_so_the_script_checkpoints_and_the_run_is_timed_out(
    service: Service,
) -> None:
    run_id = start(service, "checkpoints_on_sigint.py", max_run_minutes=0.02)
    record = wait_for_end(service, run_id)
    assert (record["status"], record["termination_reason"]) == ("timed_out", "deadline")
    assert record["exit_code"] == 130
    assert record["latest_checkpoint"] is not None
    assert Path(record["latest_checkpoint"]).exists()
    assert no_survivors(run_id)


def test_a_script_ignoring_sigint_and_sigterm_is_killed_after_the_grace(service: Service) -> None:
    run_id = start(service, "ignores_sigint_and_sigterm.py", max_run_minutes=0.01, grace_seconds=0.5)
    record = wait_for_end(service, run_id)
    assert (record["status"], record["termination_reason"]) == ("timed_out", "deadline")
    assert record["signal"] == "SIGKILL"
    events = [e["type"] for e in service.store.read_events(run_id)]
    assert "stop_signal" in events
    assert no_survivors(run_id)


def test_a_daemonised_grandchild_does_not_survive_the_run(service: Service, tmp_path: Path) -> None:
    pid_file = tmp_path / "daemon.pid"
    run_id = start(service, "spawns_daemon.py", str(pid_file), max_run_minutes=0.02, grace_seconds=0.5)
    wait_until(pid_file.exists, what="the daemon's pid file")
    daemon = psutil.Process(int(pid_file.read_text(encoding="utf-8")))
    assert daemon.ppid() != 1  # the supervisor, as subreaper, adopted it
    wait_for_end(service, run_id)
    assert not daemon.is_running() or daemon.status() == psutil.STATUS_ZOMBIE
    assert no_survivors(run_id)


def test_stop_asks_for_a_graceful_stop_and_the_run_is_stopped(service: Service) -> None:
    run_id = start(service, "checkpoints_on_sigint.py")
    wait_for_log(service, run_id, "ready")
    service.stop(run_id)
    record = wait_for_end(service, run_id)
    assert (record["status"], record["termination_reason"]) == ("stopped", "stop_requested")
    assert record["latest_checkpoint"] is not None
    with pytest.raises(RunStateError, match="already ended"):
        service.stop(run_id)


def test_killing_the_supervisor_makes_the_run_lost_and_leaves_nothing_alive(service: Service) -> None:
    run_id = start(service, "ignores_sigint_and_sigterm.py")
    wait_for_log(service, run_id, "ready")
    supervisor = service.get(run_id)["supervisor_pid"]
    assert supervisor is not None
    os.kill(supervisor, signal.SIGKILL)
    wait_until(
        lambda: not psutil.pid_exists(supervisor) or psutil.Process(supervisor).status() == "zombie",
        what="the supervisor to die",
    )
    record = service.get(run_id)
    assert (record["status"], record["termination_reason"]) == ("lost", "supervisor_lost")
    assert no_survivors(run_id)


def test_killing_the_starting_cli_does_not_end_the_run(
    env: dict[str, str], tmp_path: Path, service: Service
) -> None:
    survivor = unique_id("survivor")
    starter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backprop_mcp",
            "run",
            str(FIXTURES / "checkpoints_on_sigint.py"),
            "--run-id",
            survivor,
            "-m",
            "0.03",
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: service.store.exists(survivor), what="the run to be created")
    wait_for_log(service, survivor, "ready")
    starter.kill()
    starter.wait()
    assert starter.stdout is not None
    starter.stdout.close()
    record = wait_for_end(service, survivor)
    assert (record["status"], record["termination_reason"]) == ("timed_out", "deadline")


def test_resume_continues_from_the_newest_checkpoint_and_attempts_rise(service: Service) -> None:
    run_id = start(service, "checkpoints_on_sigint.py", max_run_minutes=0.01)
    first = wait_for_end(service, run_id)
    checkpoint = first["latest_checkpoint"]
    assert checkpoint is not None
    saved_step = json.loads(Path(checkpoint).read_text(encoding="utf-8"))["step"]
    resumed = service.resume(run_id, options={"max_run_minutes": "0.01"})
    assert resumed["attempt"] == 2
    assert resumed["resume_from"] == checkpoint
    second = wait_for_end(service, run_id)
    assert second["attempt"] == 2
    assert [a["attempt"] for a in second["attempts"]] == [1, 2]
    assert second["attempts"][1]["resume_from"] == checkpoint
    assert second["step"] is not None and second["step"] > saved_step
    # Both attempts' logs are kept.
    assert service.store.log_path(run_id, 1).exists() and service.store.log_path(run_id, 2).exists()


def test_resume_without_a_checkpoint_says_so_and_offers_from_scratch(service: Service) -> None:
    run_id = start(service, "exits_nonzero.py")
    wait_for_end(service, run_id)
    with pytest.raises(NoCheckpoint, match="never reported a checkpoint") as info:
        service.resume(run_id)
    assert "--from-scratch" in str(info.value)
    record = service.resume(run_id, from_scratch=True)
    assert record["attempt"] == 2 and record["resume_from"] is None
    wait_for_end(service, run_id)


def test_a_vanished_checkpoint_is_skipped_for_the_newest_that_exists(
    service: Service, tmp_path: Path
) -> None:
    script = tmp_path / "two_ckpts.py"
    script.write_text(
        "import json\n"
        "for n in (1, 2):\n"
        "    open(f'c{n}', 'w').write('x')\n"
        "    print(json.dumps({'event': 'checkpoint_saved', 'path': f'c{n}', 'step': n}), flush=True)\n",
        encoding="utf-8",
    )
    run_id = service.start(RunRequest(script=str(script)))["run_id"]
    wait_for_end(service, run_id)
    (tmp_path / "c2").unlink()
    assert service.resume(run_id)["resume_from"] == str(tmp_path / "c1")
    wait_for_end(service, run_id)


def test_the_seeds_event_format_is_understood(service: Service) -> None:
    record = wait_for_end(service, start(service, "seed_events.py"))
    assert record["step"] == 3
    assert record["loss"] == 0.25
    assert [c["path"] for c in record["checkpoints"]] == ["/tmp/seed-ckpt.pt"]  # the duplicate is ignored
    assert record["bad_event_lines"] == 1
    assert record["status"] == "completed"


def test_extra_arguments_after_double_dash_pass_through_unchanged(
    env: dict[str, str], tmp_path: Path, service: Service
) -> None:
    run_id = unique_id("args")
    tricky = ["--lr", "0.1", "$(touch pwned)", "a b", ";rm -rf /", "-n", "x"]
    result = cli(
        env,
        "run",
        str(FIXTURES / "counts_and_exits.py"),
        "--run-id",
        run_id,
        "--",
        "2",
        *tricky,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert f"args: {json.dumps(['2', *tricky])}" in service.logs(run_id)["lines"]
    assert not (tmp_path / "pwned").exists()


def test_argv_compat_passes_the_seeds_flags(service: Service) -> None:
    run_id = start(service, "counts_and_exits.py", "1", argv_compat=True)
    wait_for_end(service, run_id)
    args_line = next(line for line in service.logs(run_id)["lines"] if line.startswith("args:"))
    passed = json.loads(args_line.removeprefix("args: "))
    assert passed[:3] == ["1", "--run-id", run_id]
    assert "--max-minutes" in passed and "--checkpoint-every-seconds" in passed and "--framework" in passed


def test_eight_runs_started_at_once_by_separate_processes_all_end_with_complete_records(
    env: dict[str, str], tmp_path: Path, service: Service
) -> None:
    run_ids = [unique_id(f"many-{n}") for n in range(8)]
    start_at_once(env, tmp_path, FIXTURES / "counts_and_exits.py", run_ids, "20")
    for run_id in run_ids:
        record = wait_for_end(service, run_id)
        assert record["status"] == "completed"
        assert record["step"] == 20
    listed = {row["run_id"] for row in service.list_runs(limit=100)["runs"]}
    assert listed == set(run_ids)
    for run_id in run_ids:
        json.loads(service.store.record_path(run_id).read_text(encoding="utf-8"))


def test_a_taken_run_id_and_a_bad_run_id_are_refused(service: Service) -> None:
    same = unique_id("same")
    start_id = service.start(RunRequest(script=str(FIXTURES / "counts_and_exits.py"), run_id=same))["run_id"]
    with pytest.raises(UsageError, match="already taken"):
        service.start(RunRequest(script=str(FIXTURES / "counts_and_exits.py"), run_id=same))
    for bad in ("../x", "a/b", "", ".hidden", "x" * 200, "a b"):
        with pytest.raises(UsageError, match="invalid run id"):
            service.start(RunRequest(script=str(FIXTURES / "counts_and_exits.py"), run_id=bad))
    wait_for_end(service, start_id)


def test_the_contract_environment_reaches_the_script(service: Service, tmp_path: Path) -> None:
    script = tmp_path / "env.py"
    script.write_text(
        "import json, os\n"
        "print('ENV', json.dumps({k: v for k, v in os.environ.items() if k.startswith('BACKPROP_')"
        " or k in ('PYTHONUNBUFFERED', 'CUDA_VISIBLE_DEVICES')}), flush=True)\n",
        encoding="utf-8",
    )
    run_id = service.start(
        RunRequest(script=str(script), options={"checkpoint_every_minutes": "0.5", "use_gpu": False})
    )["run_id"]
    wait_for_end(service, run_id)
    line = next(x for x in service.logs(run_id)["lines"] if x.startswith("ENV "))
    seen = json.loads(line[4:])
    run_dir = service.store.run_dir(run_id)
    assert seen["BACKPROP_RUN_ID"] == run_id
    assert seen["BACKPROP_RUN_DIR"] == str(run_dir)
    assert seen["BACKPROP_CHECKPOINT_DIR"] == str(run_dir / "checkpoints")
    assert seen["BACKPROP_ATTEMPT"] == "1"
    assert seen["BACKPROP_CHECKPOINT_EVERY_SECONDS"] == "30"
    assert seen["BACKPROP_FRAMEWORK"] == "none"
    assert float(seen["BACKPROP_DEADLINE"]) > 0
    assert "BACKPROP_RESUME_FROM" not in seen
    assert seen["PYTHONUNBUFFERED"] == "1"
    assert seen["CUDA_VISIBLE_DEVICES"] == ""


def test_the_cli_runs_in_the_foreground_and_exits_with_the_documented_codes(
    env: dict[str, str], tmp_path: Path
) -> None:
    ok = cli(env, "run", str(FIXTURES / "counts_and_exits.py"), "-n", "fg", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "completed" in ok.stdout
    bad = cli(env, "run", str(FIXTURES / "exits_nonzero.py"), cwd=tmp_path)
    assert bad.returncode == 1
    assert "something went wrong" in bad.stdout
    boxed = cli(env, "run", str(FIXTURES / "checkpoints_on_sigint.py"), "-m", "0.01", cwd=tmp_path)
    assert boxed.returncode == 4, boxed.stderr
    rejected = cli(
        env,
        "run",
        str(FIXTURES / "counts_and_exits.py"),
        "--no-queue",
        "--min-free-ram",
        "60000",
        cwd=tmp_path,
    )
    assert rejected.returncode == 3
    assert "RAM" in rejected.stderr and "Traceback" not in rejected.stderr


def test_status_list_logs_and_json_agree(env: dict[str, str], tmp_path: Path) -> None:
    j1 = unique_id("j1")
    started = cli_json(
        env,
        "run",
        str(FIXTURES / "counts_and_exits.py"),
        "--run-id",
        j1,
        "-n",
        "alpha",
        "--detach",
        cwd=tmp_path,
    )
    assert started["run_id"] == j1
    service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=tmp_path)
    wait_for_end(service, j1)
    record = cli_json(env, "status", j1)
    assert record["status"] == "completed" and record["name"] == "alpha"
    page = cli_json(env, "list", "--name", "al*")
    assert [r["run_id"] for r in page["runs"]] == [j1]
    assert cli_json(env, "list", "--status", "failed")["runs"] == []
    tail = cli_json(env, "logs", j1, "--tail", "2")
    assert len(tail["lines"]) == 2
    table = cli(env, "list")
    assert j1 in table.stdout and "completed" in table.stdout


def test_resume_from_an_explicit_checkpoint_starts_a_new_run_with_it(
    service: Service, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "given.ckpt"
    checkpoint.write_text("{}", encoding="utf-8")
    record = service.start(
        RunRequest(script=str(FIXTURES / "counts_and_exits.py"), resume_from="given.ckpt", cwd=str(tmp_path))
    )
    assert record["attempt"] == 1 and record["resume_from"] == str(checkpoint)
    wait_for_end(service, record["run_id"])
    assert f"resume: {checkpoint}" in service.logs(record["run_id"])["lines"]
