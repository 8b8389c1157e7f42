"""The governor driving real runs through a fake `nvidia-smi` on PATH (issue: Governor)."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from backprop_mcp.core.clock import parse_iso
from backprop_mcp.runs.requests import RunRequest
from backprop_mcp.runs.service import Service
from tests.fake_gpu import FakeNvidiaSmi
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


@pytest.fixture
def fake(tmp_path: Path) -> FakeNvidiaSmi:
    return FakeNvidiaSmi(tmp_path)


@pytest.fixture
def gpu_env(env: dict[str, str], fake: FakeNvidiaSmi) -> dict[str, str]:
    return fake.env(
        {
            **env,
            "BACKPROP_GPU_PROBE": "nvidia-smi",
            "BACKPROP_GPU_MAX_TEMP_C": "85",
            "BACKPROP_GPU_MIN_VRAM_MB": "2500",
            "BACKPROP_SAMPLE_INTERVAL_SECONDS": "0.1",
        }
    )


@pytest.fixture
def gpu_service(gpu_env: dict[str, str], tmp_path: Path) -> Service:
    return Service(Path(gpu_env["BACKPROP_HOME"]), env=gpu_env, cwd=tmp_path)


def log_value(service: Service, run_id: str, prefix: str) -> str:
    """The rest of the first complete log line that starts with `prefix`.

    Complete: `print("a:", b)` reaches the pipe in several writes, so a line may be seen half-written.
    """
    path = service.store.log_path(run_id, 1)

    def complete_line() -> str | None:
        if not path.exists():
            return None
        for line in path.read_bytes().splitlines(keepends=True):
            if line.startswith(prefix.encode()) and line.endswith(b"\n"):
                return line.decode()[len(prefix) :].strip()
        return None

    return wait_until(complete_line, what=f"a complete {prefix!r} line in the log of {run_id}")


def test_the_hot_gpu_is_skipped_and_the_cool_one_is_pinned_by_uuid(
    fake: FakeNvidiaSmi, gpu_service: Service
) -> None:
    fake.set_gpus(
        [
            {"index": 0, "temperature_c": 91, "memory_free_mb": 40000},
            {"index": 1, "temperature_c": 50, "memory_free_mb": 20000},
            {"index": 2, "temperature_c": 40, "memory_free_mb": 1000},
        ]
    )
    run_id = gpu_service.start(
        RunRequest(script=str(FIXTURES / "prints_gpu_and_ticks.py"), options={"max_run_minutes": "0.01"})
    )["run_id"]
    assert log_value(gpu_service, run_id, "cuda:") == "GPU-fake-1 PCI_BUS_ID"
    record = wait_for_end(gpu_service, run_id)
    assert record["gpu"] is not None and record["gpu"]["index"] == 1
    assert record["cuda_visible_devices"] == "GPU-fake-1"


def test_gpus_restricts_the_choice(fake: FakeNvidiaSmi, gpu_service: Service) -> None:
    fake.set_gpus([{"index": 0, "memory_free_mb": 40000}, {"index": 1, "memory_free_mb": 10000}])
    run_id = gpu_service.start(
        RunRequest(
            script=str(FIXTURES / "prints_gpu_and_ticks.py"), options={"max_run_minutes": "0.01", "gpus": "1"}
        )
    )["run_id"]
    assert log_value(gpu_service, run_id, "cuda:") == "GPU-fake-1 PCI_BUS_ID"
    wait_for_end(gpu_service, run_id)


def test_a_run_pauses_when_its_gpu_heats_and_resumes_when_it_cools(
    fake: FakeNvidiaSmi, gpu_service: Service
) -> None:
    fake.set_gpus([{"index": 0, "temperature_c": 60}])
    # The pause lasts several samples, which a loaded machine makes slow: a wall-clock cap well
    # past the default (3x the box) keeps the cap out of this test.
    run_id = gpu_service.start(
        RunRequest(
            script=str(FIXTURES / "prints_gpu_and_ticks.py"),
            options={"max_run_minutes": "0.05", "max_wall_minutes": "5"},
        )
    )["run_id"]
    pid = int(log_value(gpu_service, run_id, "pid:"))
    fake.set_gpus([{"index": 0, "temperature_c": 90}])
    paused = wait_until(lambda: (r := gpu_service.get(run_id))["status"] == "paused" and r, what="pause")
    assert "90" in (paused["status_detail"] or "")
    assert psutil.Process(pid).status() == psutil.STATUS_STOPPED
    fake.set_gpus([{"index": 0, "temperature_c": 82}])  # below the limit but within the hysteresis
    # The supervisor's first GPU query counted after the change reads 82 C; its verdict is acted
    # on before its next sample queries again, so after three more queries at least two samples
    # at 82 C have been decided (and the ticks printed before the pause are drained into the log).
    supervisor = paused["supervisor_pid"]
    assert supervisor is not None
    queried = fake.gpu_queries(by=supervisor)
    wait_until(lambda: fake.gpu_queries(by=supervisor) >= queried + 3, what="three samples at 82 C")
    size = gpu_service.store.log_path(run_id, 1).stat().st_size
    queried = fake.gpu_queries(by=supervisor)
    wait_until(lambda: fake.gpu_queries(by=supervisor) >= queried + 2, what="two more samples at 82 C")
    assert psutil.Process(pid).status() == psutil.STATUS_STOPPED
    assert gpu_service.get(run_id)["status"] == "paused"
    assert gpu_service.store.log_path(run_id, 1).stat().st_size == size  # stopped: prints nothing
    assert ("running", "resumed") not in [
        (e.get("status"), e.get("reason"))
        for e in gpu_service.store.read_events(run_id)
        if e.get("type") == "state"
    ]
    fake.set_gpus([{"index": 0, "temperature_c": 70}])
    wait_until(lambda: gpu_service.get(run_id)["status"] == "running", what="resume")
    # Resumed for real: the script prints again, and at the deadline it handles SIGINT itself.
    log = gpu_service.store.log_path(run_id, 1)
    wait_until(lambda: log.stat().st_size > size, what="the script to print again")
    record = wait_for_end(gpu_service, run_id)
    assert (record["status"], record["termination_reason"]) == ("timed_out", "deadline")
    assert (record["exit_code"], record["signal"]) == (0, None)
    assert record["paused_seconds"] > 0
    kinds = [
        (e.get("status"), e.get("reason"))
        for e in gpu_service.store.read_events(run_id)
        if e.get("type") == "state"
    ]
    assert ("paused", paused["status_detail"]) in kinds and ("running", "resumed") in kinds
    # Paused time is not charged to the box: the script ran for the whole box besides it.
    started, ended = parse_iso(record["started_at"]), parse_iso(record["ended_at"])
    assert started is not None and ended is not None
    assert ended - started >= 0.05 * 60 + record["paused_seconds"] - 0.2
    assert no_survivors(run_id)


def test_paused_time_moves_the_deadline(fake: FakeNvidiaSmi, gpu_service: Service) -> None:
    fake.set_gpus([{"index": 0, "temperature_c": 60}])
    run_id = gpu_service.start(
        RunRequest(script=str(FIXTURES / "prints_gpu_and_ticks.py"), options={"max_run_minutes": "0.05"})
    )["run_id"]
    wait_for_log(gpu_service, run_id, "ready")
    first_deadline = gpu_service.get(run_id)["deadline"]
    fake.set_gpus([{"index": 0, "temperature_c": 95}])
    wait_until(lambda: gpu_service.get(run_id)["status"] == "paused", what="pause")
    fake.set_gpus([{"index": 0, "temperature_c": 50}])
    wait_until(lambda: gpu_service.get(run_id)["status"] == "running", what="resume")
    record = gpu_service.get(run_id)
    assert record["deadline"] is not None and first_deadline is not None
    assert record["deadline"] > first_deadline
    wait_for_end(gpu_service, run_id)


def test_a_run_over_its_gpu_memory_limit_is_stopped_with_that_reason(
    fake: FakeNvidiaSmi, gpu_service: Service
) -> None:
    fake.set_gpus([{"index": 0, "memory_total_mb": 24576, "memory_free_mb": 20000}])
    run_id = gpu_service.start(
        RunRequest(
            script=str(FIXTURES / "prints_gpu_and_ticks.py"),
            options={"gpu_memory_limit": "4", "grace_seconds": "1"},
        )
    )["run_id"]
    pid = int(log_value(gpu_service, run_id, "pid:"))
    fake.set_processes([{"gpu_uuid": "GPU-fake-0", "pid": pid, "used_memory_mb": 5000}])
    record = wait_for_end(gpu_service, run_id)
    assert (record["status"], record["termination_reason"]) == ("failed", "gpu_memory_limit")
    assert "5000 MB > limit 4096 MB" in (record["status_detail"] or "")
    assert any(line.startswith("stopped at tick") for line in gpu_service.logs(run_id, tail=50)["lines"])


def test_the_memory_limit_reaches_the_script_environment(
    fake: FakeNvidiaSmi, gpu_env: dict[str, str], tmp_path: Path
) -> None:
    fake.set_gpus([{"index": 0, "memory_total_mb": 10000, "memory_free_mb": 9000}])
    report = cli_json(
        gpu_env,
        "run",
        str(FIXTURES / "counts_and_exits.py"),
        "-g",
        "80%",
        "-f",
        "jax",
        "--dry-run",
        cwd=tmp_path,
    )
    environment = report["environment"]
    assert environment["BACKPROP_GPU_MEMORY_LIMIT_MB"] == "8000"
    assert environment["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.8000"
    assert environment["CUDA_VISIBLE_DEVICES"] == "GPU-fake-0"


def test_an_unknown_gpu_state_refuses_gpu_runs_but_not_cpu_runs(
    fake: FakeNvidiaSmi, gpu_env: dict[str, str], tmp_path: Path
) -> None:
    fake.fail("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver", 9)
    refused = cli(gpu_env, "run", str(FIXTURES / "counts_and_exits.py"), "--no-queue", cwd=tmp_path)
    assert refused.returncode == 3
    assert "GPU state unknown" in refused.stderr
    allowed = cli(
        gpu_env, "run", str(FIXTURES / "counts_and_exits.py"), "--no-queue", "--no-gpu", cwd=tmp_path
    )
    assert allowed.returncode == 0, allowed.stderr


def test_status_shows_each_gpu_and_the_verdict(fake: FakeNvidiaSmi, gpu_env: dict[str, str]) -> None:
    fake.set_gpus([{"index": 0, "temperature_c": 90}, {"index": 1, "temperature_c": 45}])
    status = cli_json(gpu_env, "status")
    assert [g["index"] for g in status["snapshot"]["gpus"]] == [0, 1]
    assert status["verdict"]["allowed"] is True
    assert status["verdict"]["gpu"]["index"] == 1
    text = cli(gpu_env, "status", "--gpu-max-temp", "40").stdout
    assert "gpu 0" in text and "a new run would wait" in text


def test_sixteen_concurrent_starters_never_exceed_max_parallel(
    env: dict[str, str], tmp_path: Path, service: Service
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    limited = {**env, "BACKPROP_MAX_PARALLEL": "2"}
    run_ids = [unique_id(f"q{n:02d}") for n in range(16)]
    start_at_once(limited, tmp_path, FIXTURES / "records_its_lifetime.py", run_ids, str(marks))
    records = [wait_for_end(service, run_id, timeout=120) for run_id in run_ids]
    assert all(r["status"] == "completed" for r in records)
    spans = [
        (float((marks / f"{run_id}.start").read_text()), float((marks / f"{run_id}.end").read_text()))
        for run_id in run_ids
    ]
    for start, _ in spans:
        overlapping = sum(1 for s, e in spans if s <= start < e)
        assert overlapping <= 2


def test_a_run_that_waits_past_its_queue_timeout_is_rejected_with_that_reason(
    env: dict[str, str], tmp_path: Path
) -> None:
    limited = Service(Path(env["BACKPROP_HOME"]), env={**env, "BACKPROP_MAX_PARALLEL": "1"}, cwd=tmp_path)
    first = limited.start(RunRequest(script=str(FIXTURES / "waits_forever.py")))["run_id"]
    wait_for_log(limited, first, "ready")
    second = limited.start(
        RunRequest(script=str(FIXTURES / "counts_and_exits.py"), options={"queue_timeout_minutes": "0.01"})
    )["run_id"]
    queued = wait_until(lambda: (r := limited.get(second))["queue_position"] == 1 and r, what="queued")
    assert queued["status_detail"] == "position 1 in the queue: 1 run live >= max parallel 1"
    record = wait_for_end(limited, second)
    assert (record["status"], record["termination_reason"]) == ("rejected", "queue_timeout")
    assert record["started_at"] is None
    limited.stop(first)
    wait_for_end(limited, first)


def test_a_run_held_paused_past_its_wall_clock_cap_is_timed_out_with_that_reason(
    fake: FakeNvidiaSmi, gpu_service: Service
) -> None:
    fake.set_gpus([{"index": 0, "temperature_c": 60}])
    run_id = gpu_service.start(
        RunRequest(
            script=str(FIXTURES / "prints_gpu_and_ticks.py"),
            options={"max_run_minutes": "1", "max_wall_minutes": "0.03", "grace_seconds": "1"},
        )
    )["run_id"]
    wait_for_log(gpu_service, run_id, "ready")
    fake.set_gpus([{"index": 0, "temperature_c": 99}])
    record = wait_for_end(gpu_service, run_id)
    assert (record["status"], record["termination_reason"]) == ("timed_out", "wall_clock_cap")
    assert record["paused_seconds"] > 0
    assert no_survivors(run_id)
