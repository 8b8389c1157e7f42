"""Hostile training scripts (issue 5, item 1): each ends in the right state with the right reason,
the supervisor survives what it prints, and no process of the run is left alive."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import psutil
import pytest

from backprop_mcp.core.errors import NoCheckpoint
from backprop_mcp.runs.events import MAX_EVENT_BYTES
from backprop_mcp.runs.service import Service
from backprop_mcp.runs.views import MAX_LOG_LINE_CHARS
from tests.fault_helpers import alive, assert_nothing_survives, start, strict_json, supervisor_pid
from tests.helpers import wait_for_end, wait_for_log, wait_until

# Short boxes keep the suite fast; the grace is short because these scripts never checkpoint.
SHORT_BOX = 0.03  # minutes
SHORT_GRACE = 0.5  # seconds


def test_a_script_ignoring_sigint_and_sigterm_with_grandchildren_is_killed_whole(service: Service) -> None:
    run_id = start(service, "spawns_grandchildren.py", max_run_minutes=SHORT_BOX, grace_seconds=SHORT_GRACE)
    wait_for_log(service, run_id, "ready")
    record = wait_for_end(service, run_id)
    assert (record["status"], record["termination_reason"], record["signal"]) == (
        "timed_out",
        "deadline",
        "SIGKILL",
    )
    assert_nothing_survives(run_id)


def test_a_double_forked_setsid_daemon_is_killed_when_the_run_is_stopped(
    service: Service, tmp_path: Path
) -> None:
    pid_file = tmp_path / "daemon.pid"
    run_id = start(service, "spawns_daemon.py", str(pid_file), grace_seconds=SHORT_GRACE)
    wait_for_log(service, run_id, "ready")
    daemon = int(pid_file.read_text(encoding="utf-8"))
    service.stop(run_id)
    record = wait_for_end(service, run_id)
    assert (record["status"], record["termination_reason"]) == ("stopped", "stop_requested")
    assert not alive(daemon)
    assert_nothing_survives(run_id)


def test_two_hundred_children_ignoring_signals_are_all_killed_on_stop(service: Service) -> None:
    run_id = start(service, "spawns_200_children.py", "200", grace_seconds=SHORT_GRACE)
    wait_for_log(service, run_id, "ready")
    tree = psutil.Process(supervisor_pid(service, run_id)).children(recursive=True)
    assert len(tree) >= 201
    service.stop(run_id)
    record = wait_for_end(service, run_id)
    assert (record["status"], record["termination_reason"], record["signal"]) == (
        "stopped",
        "stop_requested",
        "SIGKILL",
    )
    assert not [p for p in tree if alive(p.pid)]
    assert_nothing_survives(run_id)


def test_a_script_that_closes_stdout_early_keeps_being_supervised_until_its_deadline(
    service: Service,
) -> None:
    run_id = start(service, "closes_stdout_early.py", max_run_minutes=SHORT_BOX, grace_seconds=SHORT_GRACE)
    wait_for_log(service, run_id, "ready")
    assert service.get(run_id)["status"] == "running"  # stdout's EOF did not end the supervision
    record = wait_for_end(service, run_id)
    assert (record["status"], record["termination_reason"]) == ("timed_out", "deadline")
    assert_nothing_survives(run_id)


def test_a_script_that_closes_stdout_and_stderr_runs_on_and_completes_on_its_own(service: Service) -> None:
    run_id = start(service, "closes_both_pipes_and_keeps_working.py")
    run_dir = service.store.run_dir(run_id)
    wait_until((run_dir / "pipes-closed").exists, what="the script to close its pipes")
    # Both pipes are at EOF now; the supervision must go on until the script itself ends.
    script_pid = wait_until(lambda: service.get(run_id)["script_pid"], what="the script's pid")
    assert alive(script_pid), "the script was killed when it closed its pipes"
    assert service.get(run_id)["status"] == "running"
    (run_dir / "finish").write_text("now", encoding="utf-8")
    record = wait_for_end(service, run_id)
    assert (record["status"], record["termination_reason"], record["exit_code"]) == (
        "completed",
        "exit_zero",
        0,
    )
    assert_nothing_survives(run_id)


def test_a_50_mb_line_without_newline_is_logged_and_skipped_in_bounded_memory(service: Service) -> None:
    run_id = start(service, "prints_50mb_line.py")
    supervisor = psutil.Process(supervisor_pid(service, run_id))
    peak = 0

    def ended_sampling_memory() -> bool:
        nonlocal peak
        with contextlib.suppress(psutil.NoSuchProcess):
            peak = max(peak, supervisor.memory_info().rss)
        return service.get(run_id)["status"] in ("completed", "failed")

    wait_until(ended_sampling_memory, what="the 50 MB line run to end")
    record = service.get(run_id)
    assert (record["status"], record["termination_reason"]) == ("completed", "exit_zero")
    assert record["step"] == 2 and record["loss"] == 0.5
    assert record["bad_event_lines"] == 1
    bad = [e for e in service.store.read_events(run_id) if e["type"] == "bad_line"]
    assert f"at most {MAX_EVENT_BYTES} bytes" in bad[0]["error"]
    assert peak < 150 * 1024 * 1024  # the line was never held whole (the log file is 51 MB)
    tail = service.logs(run_id, tail=3)
    assert tail["lines"] and all(len(line) <= MAX_LOG_LINE_CHARS for line in tail["lines"])
    assert_nothing_survives(run_id)


def test_invalid_utf8_and_nul_bytes_are_logged_and_counted_never_fatal(service: Service) -> None:
    run_id = start(service, "prints_invalid_utf8.py")
    record = wait_for_end(service, run_id)
    assert (record["status"], record["termination_reason"]) == ("completed", "exit_zero")
    assert (record["step"], record["loss"]) == (3, 0.25)
    assert record["bad_event_lines"] == 2
    errors = [e["error"] for e in service.store.read_events(run_id) if e["type"] == "bad_line"]
    assert any("not valid UTF-8" in e for e in errors)
    lines = service.logs(run_id)["lines"]
    assert any(line.startswith("plain ") for line in lines)
    assert any("surrogate" in line for line in lines)
    strict_json(service.store.record_path(run_id).read_bytes())
    assert_nothing_survives(run_id)


def test_a_script_flooding_stdout_for_its_whole_box_is_timed_out_with_progress_recorded(
    service: Service,
) -> None:
    run_id = start(service, "floods_stdout.py", max_run_minutes=SHORT_BOX, grace_seconds=SHORT_GRACE)
    record = wait_for_end(service, run_id)
    assert (record["status"], record["termination_reason"]) == ("timed_out", "deadline")
    assert record["step"] is not None and record["step"] >= 10000
    assert service.store.log_path(run_id, 1).stat().st_size > 0
    assert service.logs(run_id, tail=5)["lines"]
    assert_nothing_survives(run_id)


def test_a_script_exiting_while_its_child_holds_the_pipes_completes_and_the_child_dies(
    service: Service, tmp_path: Path
) -> None:
    pid_file = tmp_path / "child.pid"
    run_id = start(service, "exits_leaving_child_with_pipes.py", str(pid_file))
    record = wait_for_end(service, run_id)
    assert (record["status"], record["termination_reason"], record["exit_code"]) == (
        "completed",
        "exit_zero",
        0,
    )
    assert not alive(int(pid_file.read_text(encoding="utf-8")))
    assert "parent exiting" in service.logs(run_id)["lines"]
    assert_nothing_survives(run_id)


def test_a_script_dying_by_sigsegv_is_failed_with_the_signal_and_keeps_its_progress(service: Service) -> None:
    run_id = start(service, "dies_by_sigsegv.py")
    record = wait_for_end(service, run_id)
    assert (record["status"], record["termination_reason"], record["signal"]) == (
        "failed",
        "signal",
        "SIGSEGV",
    )
    assert record["exit_code"] is None
    assert (record["step"], record["loss"]) == (4, 0.7)
    assert record["attempts"][0]["signal"] == "SIGSEGV"
    assert_nothing_survives(run_id)


def test_hostile_event_lines_are_skipped_and_the_good_ones_between_them_recorded(
    service: Service, tmp_path: Path
) -> None:
    run_id = start(service, "prints_hostile_events.py")
    record = wait_for_end(service, run_id)
    assert (record["status"], record["termination_reason"]) == ("completed", "exit_zero")
    assert record["bad_event_lines"] == 20  # "[[[..." and a bare string are plain output
    assert record["loss"] == 0.5 and record["total"] == 10 and record["step"] == 8
    assert record["metrics"] == {"acc": 0.5, "val": 1e308}
    paths = [c["path"] for c in record["checkpoints"]]
    assert paths == [
        str(tmp_path / "missing" / "ckpt-that-never-existed.pt"),
        str(tmp_path / "real.ckpt"),  # "sub/../real.ckpt", normalised
        str(tmp_path.parent / "outside" / "gone.ckpt"),
    ]
    strict_json(service.store.record_path(run_id).read_bytes())
    for line in service.store.events_path(run_id).read_bytes().splitlines():
        strict_json(line)
    # Resume skips the checkpoints that do not exist for the newest one that does.
    assert service.resume(run_id, options={"max_run_minutes": 0.05})["resume_from"] == str(
        tmp_path / "real.ckpt"
    )
    wait_for_end(service, run_id)
    (tmp_path / "real.ckpt").unlink()
    with pytest.raises(NoCheckpoint, match="none of its 3 reported checkpoints exists"):
        service.resume(run_id)
    assert_nothing_survives(run_id)


def test_every_hostile_run_leaves_its_record_strict_json(service: Service) -> None:
    run_ids = [start(service, name) for name in ("prints_invalid_utf8.py", "dies_by_sigsegv.py")]
    for run_id in run_ids:
        wait_for_end(service, run_id)
        data = strict_json(service.store.record_path(run_id).read_bytes())
        assert isinstance(data, dict) and data["run_id"] == run_id
        json.dumps(data, allow_nan=False)
    assert_nothing_survives(*run_ids)
