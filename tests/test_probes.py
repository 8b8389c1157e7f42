"""Probes: nvidia-smi parsing, NVML translation, the CPU sample cache, the static probe, make_probe."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from backprop_mcp.core.errors import ConfigError
from backprop_mcp.governor import probes
from backprop_mcp.governor.decisions import default_limits, evaluate
from backprop_mcp.governor.nvidia import NvmlGpus, parse_compute_apps_csv, parse_gpu_csv
from backprop_mcp.governor.probe_choice import ENV_STATIC_PROBE, make_probe
from backprop_mcp.governor.probes import CachedCpu, CpuSampler, ProbeError
from backprop_mcp.governor.static_probe import StaticProbe, static_snapshot_from_json
from tests.fake_gpu import FakeNvidiaSmi

DATA = Path(__file__).parent / "data" / "nvidia_smi"


def read(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


@pytest.fixture(autouse=True)
def _no_static_probe_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_STATIC_PROBE, raising=False)


# --- nvidia-smi parsing ------------------------------------------------------------------------


def test_one_gpu_is_parsed_with_every_field() -> None:
    (gpu,) = parse_gpu_csv(read("one_gpu.csv"))
    assert gpu == {
        "index": 0,
        "uuid": "GPU-5e3b2f71-1c4d-9a3e-7b21-8f0c2d6e4a19",
        "name": "NVIDIA GeForce RTX 3090",
        "memory_total_mb": 24576.0,
        "memory_used_mb": 1536.0,
        "memory_free_mb": 22735.0,
        "temperature_c": 47.0,
        "utilization_pct": 3.0,
        "processes": [],
    }


def test_two_gpus_keep_their_order_and_figures() -> None:
    gpus = parse_gpu_csv(read("two_gpus.csv"))
    assert [(g["index"], g["memory_free_mb"], g["temperature_c"]) for g in gpus] == [
        (0, 28421.0, 61.0),
        (1, 40448.0, 33.0),
    ]


def test_eight_gpus_are_all_read() -> None:
    gpus = parse_gpu_csv(read("eight_gpus.csv"))
    assert [g["index"] for g in gpus] == list(range(8))
    assert {g["name"] for g in gpus} == {"NVIDIA H100 80GB HBM3"}
    assert len({g["uuid"] for g in gpus}) == 8


def test_missing_values_become_none_and_free_memory_is_derived_when_possible() -> None:
    a10, k80, blank = parse_gpu_csv(read("na_fields.csv"))
    assert (a10["temperature_c"], a10["utilization_pct"], a10["memory_free_mb"]) == (None, None, 22563.0)
    assert k80["memory_free_mb"] == 11441.0 - 3.0
    assert k80["utilization_pct"] is None
    assert blank["name"] == "GPU 2"
    assert blank["memory_total_mb"] is None
    assert blank["memory_free_mb"] is None


def test_odd_spacing_blank_lines_crlf_and_trailing_commas_are_tolerated() -> None:
    gpus = parse_gpu_csv(read("odd_spacing.csv"))
    assert [(g["index"], g["uuid"], g["name"], g["utilization_pct"]) for g in gpus] == [
        (0, "GPU-aaaa1111-2222-3333-4444-555566667777", "Quadro RTX 6000", 0.0),
        (1, "GPU-bbbb1111-2222-3333-4444-555566667777", "Quadro RTX 6000", 1.0),
    ]


def test_a_name_with_a_comma_in_it_is_kept_whole() -> None:
    (gpu,) = parse_gpu_csv("0, GPU-x, Weird, Inc. Card, 100, 10, 90, 30, 5\n")
    assert gpu["name"] == "Weird, Inc. Card"
    assert gpu["memory_free_mb"] == 90.0


def test_units_left_in_the_output_are_ignored() -> None:
    (gpu,) = parse_gpu_csv("0, GPU-x, Card, 100 MiB, 10 MiB, 90 MiB, 30 C, 5 %\n")
    assert (gpu["memory_total_mb"], gpu["temperature_c"], gpu["utilization_pct"]) == (100.0, 30.0, 5.0)


def test_empty_output_means_no_gpus() -> None:
    assert parse_gpu_csv("\n  \n") == []


@pytest.mark.parametrize(
    ("fixture", "says"),
    [
        ("garbage_number.csv", "line 2: memory.total is not a number"),
        ("garbage_driver_mismatch.txt", "line 1: expected 8 fields, got 1"),
        ("garbage_short_row.csv", "line 1: expected 8 fields, got 2"),
    ],
)
def test_a_garbage_row_fails_the_whole_table_with_the_line_named(fixture: str, says: str) -> None:
    with pytest.raises(ProbeError, match=says):
        parse_gpu_csv(read(fixture))


def test_a_row_without_a_uuid_or_index_is_garbage() -> None:
    with pytest.raises(ProbeError, match="no UUID"):
        parse_gpu_csv("0, [N/A], Card, 1, 1, 0, 30, 0\n")
    with pytest.raises(ProbeError, match="index is not an integer"):
        parse_gpu_csv("zero, GPU-x, Card, 1, 1, 0, 30, 0\n")


def test_compute_apps_are_grouped_by_gpu_uuid() -> None:
    apps = parse_compute_apps_csv(read("compute_apps.csv"))
    assert apps == {
        "GPU-0a1b2c3d-4e5f-6789-abcd-ef0123456789": [
            {"pid": 23817, "used_memory_mb": 10240.0},
            {"pid": 24010, "used_memory_mb": 1733.0},
        ],
        "GPU-9f8e7d6c-5b4a-3210-fedc-ba9876543210": [{"pid": 23817, "used_memory_mb": 512.0}],
    }


def test_compute_apps_with_unknown_memory_keep_the_pid() -> None:
    apps = parse_compute_apps_csv(read("compute_apps_na.csv"))
    assert apps["GPU-1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718"] == [
        {"pid": 4242, "used_memory_mb": None},
        {"pid": 4243, "used_memory_mb": None},
    ]


def test_the_no_running_processes_sentence_means_no_processes() -> None:
    assert parse_compute_apps_csv(read("compute_apps_none.txt")) == {}


def test_a_compute_app_without_a_numeric_pid_is_garbage() -> None:
    with pytest.raises(ProbeError, match="pid is not an integer"):
        parse_compute_apps_csv(read("compute_apps_garbage.csv"))


# --- NVML translation, with NVML injected --------------------------------------------------------


class _FakeNvmlError(Exception):
    pass


def fake_nvml(*, broken: bool = False) -> Any:
    def temperature(handle: int, sensor: int) -> int:
        if handle == 1:
            raise _FakeNvmlError("Not Supported")
        return 55

    def count() -> int:
        if broken:
            raise _FakeNvmlError("GPU is lost")
        return 2

    gib = 1024**3
    return SimpleNamespace(
        NVMLError=_FakeNvmlError,
        NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetCount=count,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=16 * gib, used=4 * gib, free=12 * gib),
        nvmlDeviceGetTemperature=temperature,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=70, memory=10),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [
            SimpleNamespace(pid=100 + h, usedGpuMemory=None if h else 2 * gib)
        ],
        nvmlDeviceGetUUID=lambda h: f"GPU-nvml-{h}".encode(),
        nvmlDeviceGetName=lambda h: "NVIDIA L4",
    )


def test_nvml_readings_are_translated_to_mib_and_missing_sensors_to_none() -> None:
    first, second = NvmlGpus(fake_nvml()).gpus()
    assert first == {
        "index": 0,
        "uuid": "GPU-nvml-0",
        "name": "NVIDIA L4",
        "memory_total_mb": 16384.0,
        "memory_used_mb": 4096.0,
        "memory_free_mb": 12288.0,
        "temperature_c": 55.0,
        "utilization_pct": 70.0,
        "processes": [{"pid": 100, "used_memory_mb": 2048.0}],
    }
    assert second["temperature_c"] is None
    assert second["processes"] == [{"pid": 101, "used_memory_mb": None}]


def test_an_nvml_failure_becomes_a_probe_error() -> None:
    with pytest.raises(ProbeError, match="NVML query failed: GPU is lost"):
        NvmlGpus(fake_nvml(broken=True)).gpus()


# --- CPU ---------------------------------------------------------------------------------------


def test_a_missing_cpu_cache_costs_one_blocking_sample_and_is_then_written(tmp_path: Path) -> None:
    cache = tmp_path / "governor" / "cpu_sample.json"
    pct = CachedCpu(cache).percent()
    assert pct is not None
    assert 0.0 <= pct <= 100.0
    assert json.loads(cache.read_text(encoding="utf-8"))["version"] == 1


@pytest.mark.parametrize("garbage", ["{not json", "[]", '{"version": 1, "busy": "x"}', '{"version": 7}', ""])
def test_a_corrupt_cpu_cache_is_ignored_and_replaced(tmp_path: Path, garbage: str) -> None:
    cache = tmp_path / "cpu_sample.json"
    cache.write_text(garbage, encoding="utf-8")
    pct = CachedCpu(cache).percent()
    assert pct is not None
    assert 0.0 <= pct <= 100.0
    assert set(json.loads(cache.read_text(encoding="utf-8"))) == {
        "version",
        "busy",
        "total",
        "monotonic",
        "percent",
    }


def _planted_cache(path: Path, *, percent: float, age: float) -> None:
    times = psutil.cpu_times()._asdict()
    total = sum(v for k, v in times.items() if k not in ("guest", "guest_nice"))
    busy = total - times["idle"] - times.get("iowait", 0.0)
    # A huge planted interval makes the last moments' real load vanish from the ratio.
    span = 1e9
    data = {
        "version": 1,
        "busy": busy - span * percent / 100,
        "total": total - span,
        "monotonic": time.monotonic() - age,
    }
    path.write_text(json.dumps(data), encoding="utf-8")


def test_a_recent_cpu_sample_in_the_cache_gives_the_load_since_then(tmp_path: Path) -> None:
    cache = tmp_path / "cpu_sample.json"
    _planted_cache(cache, percent=12.3456, age=5.0)
    assert CachedCpu(cache).percent() == pytest.approx(12.3456, abs=1e-3)


def test_a_cpu_sample_older_than_a_minute_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cpu_sample.json"
    _planted_cache(cache, percent=12.3456, age=3600.0)
    # The machine's CPU times as the fresh sample reads them: 30% busy between its two readings.
    first = probes._read_cpu_times()
    second = first._replace(busy=first.busy + 30.0, total=first.total + 100.0, at=first.at + 0.5)
    readings = iter([first, second])
    monkeypatch.setattr(probes, "_read_cpu_times", lambda: next(readings))
    assert CachedCpu(cache, blocking_seconds=0.0).percent() == pytest.approx(30.0)
    cached = json.loads(cache.read_text(encoding="utf-8"))
    assert (cached["percent"], cached["monotonic"]) == (pytest.approx(30.0), second.at)


def test_the_live_sampler_gives_a_percentage_on_every_call() -> None:
    sampler = CpuSampler()
    readings = [sampler.percent() for _ in range(3)]
    assert all(r is not None and 0.0 <= r <= 100.0 for r in readings)


# --- static probe ------------------------------------------------------------------------------


def write_snapshot(path: Path, data: object) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)
    return path


def test_the_static_probe_rereads_its_file_on_every_snapshot(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path / "snap.json", {"gpus": [{"index": 0, "temperature_c": 40}]})
    probe = make_probe("static", cpu_cache=None, static_path=path)
    assert probe.snapshot()["gpus"][0]["temperature_c"] == 40.0  # type: ignore[index]
    write_snapshot(path, {"gpus": [{"index": 0, "temperature_c": 91}]})
    assert probe.snapshot()["gpus"][0]["temperature_c"] == 91.0  # type: ignore[index]


def test_the_environment_variable_selects_the_static_probe_whatever_the_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_snapshot(tmp_path / "snap.json", {"cpu_percent": 12, "ram_available_gb": 7.5})
    monkeypatch.setenv(ENV_STATIC_PROBE, str(path))
    probe = make_probe("nvidia-smi", cpu_cache=None)
    assert isinstance(probe, StaticProbe)
    snap = probe.snapshot()
    assert (snap["cpu_percent"], snap["ram_available_gb"], snap["gpus"], snap["gpu_host"]) == (
        12.0,
        7.5,
        [],
        False,
    )


def test_a_partial_static_snapshot_gets_documented_defaults() -> None:
    snap = static_snapshot_from_json({"gpus": [{"index": 3, "memory_total_mb": 1000, "memory_used_mb": 250}]})
    (gpu,) = snap["gpus"] or []
    assert (gpu["uuid"], gpu["name"], gpu["memory_free_mb"]) == ("GPU-static-3", "Static GPU 3", 750.0)
    assert (snap["gpu_probe"], snap["gpu_host"], snap["cpu_percent"]) == ("static", True, None)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ([], "the top level must be a JSON object"),
        ({"cpu": 5}, "unknown key cpu"),
        ({"cpu_percent": "high"}, 'cpu_percent must be a number or null, got "high"'),
        ({"cpu_percent": True}, "cpu_percent must be a number"),
        ({"gpu_host": "yes"}, "gpu_host must be true or false"),
        ({"gpus": [{"temperature_c": 30}]}, r"gpus\[0\].index is required"),
        ({"gpus": [{"index": 0, "temperature_c": "hot"}]}, r"gpus\[0\].temperature_c must be a number"),
        ({"gpus": [{"index": 0, "fan": 3}]}, r"unknown key gpus\[0\].fan"),
        ({"gpus": [{"index": 0, "processes": [{"used_memory_mb": 1}]}]}, r"processes\[0\].pid is required"),
        ({"gpus": [{"index": 0}, {"index": 0}]}, "two GPUs have the same index"),
        ({"gpus": [{"index": 0, "uuid": "GPU-a"}, {"index": 1, "uuid": "GPU-a"}]}, "same uuid"),
        ({"gpus": {"index": 0}}, "gpus must be a list"),
    ],
)
def test_an_invalid_static_snapshot_is_a_config_error_naming_the_key(data: object, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        static_snapshot_from_json(data, "snap.json")


def test_a_static_snapshot_file_that_is_not_json_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "snap.json"
    path.write_text("{oops", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"snap\.json: not valid JSON"):
        StaticProbe.from_file(path)
    with pytest.raises(ConfigError, match="cannot read the static probe snapshot"):
        StaticProbe.from_file(tmp_path / "absent.json")


def test_a_static_file_broken_mid_run_reads_as_unknown_gpus_and_fails_closed(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path / "snap.json", {"gpus": [{"index": 0, "memory_free_mb": 9000}]})
    probe = StaticProbe.from_file(path)
    path.write_text('{"gpus": [{"index": "zero"}]}', encoding="utf-8")
    snap = probe.snapshot()
    assert snap["gpus"] is None
    assert snap["gpu_host"] is True
    assert "index is required" in (snap["gpu_error"] or "")
    assert not evaluate(snap, default_limits(), [], now=0.0)["allowed"]


def test_the_static_probe_sums_gpu_memory_of_the_given_pids_across_gpus() -> None:
    snap = static_snapshot_from_json(
        {
            "gpus": [
                {
                    "index": 0,
                    "processes": [{"pid": 10, "used_memory_mb": 100}, {"pid": 11, "used_memory_mb": 5}],
                },
                {"index": 1, "processes": [{"pid": 10, "used_memory_mb": 50}, {"pid": 12}]},
            ]
        }
    )
    probe = StaticProbe(snap)
    assert probe.gpu_process_memory({10}) == 150.0
    assert probe.gpu_process_memory({99}) == 0.0
    assert probe.gpu_process_memory({10, 12}) is None  # pid 12's figure is unknown


# --- make_probe --------------------------------------------------------------------------------


def test_the_none_probe_reports_cpu_and_ram_and_no_gpus(tmp_path: Path) -> None:
    snap = make_probe("none", cpu_cache=tmp_path / "cpu.json").snapshot()
    assert snap["gpu_probe"] == "none"
    assert snap["gpus"] == []
    assert snap["gpu_error"] is None
    assert snap["cpu_percent"] is not None
    assert snap["ram_available_gb"] is not None
    assert snap["ram_total_gb"] is not None
    assert 0 < snap["ram_available_gb"] <= snap["ram_total_gb"]


def test_an_unknown_probe_kind_is_a_config_error_listing_the_kinds() -> None:
    with pytest.raises(ConfigError, match="allowed: auto, nvml, nvidia-smi, rocm, none, static"):
        make_probe("cuda", cpu_cache=None)


def test_the_static_kind_without_a_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=ENV_STATIC_PROBE):
        make_probe("static", cpu_cache=None)


def test_nvidia_smi_probe_reads_the_fake_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvidiaSmi(tmp_path)
    fake.set_gpus(
        [
            {
                "index": 0,
                "name": "NVIDIA A100",
                "memory_total_mb": 40960,
                "memory_used_mb": 40000,
                "temperature_c": 70,
            },
            {
                "index": 1,
                "name": "NVIDIA A100",
                "memory_total_mb": 40960,
                "memory_used_mb": 960,
                "temperature_c": None,
            },
        ]
    )
    fake.set_processes(
        [
            {"gpu_uuid": "GPU-fake-0", "pid": 4242, "used_memory_mb": 39000},
            {"gpu_uuid": "GPU-fake-1", "pid": 4242, "used_memory_mb": 700},
            {"gpu_uuid": "GPU-fake-1", "pid": 5000, "used_memory_mb": 260},
        ]
    )
    monkeypatch.setenv("PATH", fake.path)
    probe = make_probe("nvidia-smi", cpu_cache=tmp_path / "cpu.json")
    snap = probe.snapshot()
    assert snap["gpu_probe"] == "nvidia-smi"
    assert snap["gpu_host"] is True
    assert snap["gpus"] is not None
    first, second = snap["gpus"]
    assert (first["uuid"], first["memory_free_mb"], first["temperature_c"]) == ("GPU-fake-0", 960.0, 70.0)
    assert (second["memory_free_mb"], second["temperature_c"]) == (40000.0, None)
    assert second["processes"] == [
        {"pid": 4242, "used_memory_mb": 700.0},
        {"pid": 5000, "used_memory_mb": 260.0},
    ]
    assert probe.gpu_process_memory([4242]) == 39700.0

    fake.set_gpus([{"index": 0, "temperature_c": 88}])
    assert [g["temperature_c"] for g in probe.snapshot()["gpus"] or []] == [88.0]


def test_a_failing_nvidia_smi_yields_unknown_gpus_with_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeNvidiaSmi(tmp_path)
    fake.fail("Failed to initialize NVML: Driver/library version mismatch", status=18)
    monkeypatch.setenv("PATH", fake.path)
    probe = make_probe("nvidia-smi", cpu_cache=None)
    snap = probe.snapshot()
    assert snap["gpus"] is None
    assert (
        snap["gpu_error"]
        == "nvidia-smi exited with status 18: Failed to initialize NVML: Driver/library version mismatch"
    )
    assert probe.gpu_process_memory([1]) is None
    reasons = evaluate(snap, default_limits(), [], now=0.0)["reasons"]
    # The real machine's CPU and RAM may add reasons of their own on a busy test host.
    assert (
        f"GPU state unknown: {snap['gpu_error']}; refusing GPU runs (use --no-gpu to run on CPU)" in reasons
    )


def test_a_hanging_nvidia_smi_is_bounded_by_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeNvidiaSmi(tmp_path)
    fake.set_gpus([{"index": 0}])
    fake.hang()
    monkeypatch.setenv("PATH", fake.path)
    snap = make_probe("nvidia-smi", cpu_cache=None, nvidia_smi_timeout=0.3).snapshot()
    assert snap["gpus"] is None
    assert snap["gpu_error"] == "nvidia-smi did not answer within 0.3 s"


def test_the_nvidia_smi_kind_without_nvidia_smi_on_path_is_unknown_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    snap = make_probe("nvidia-smi", cpu_cache=None).snapshot()
    assert snap["gpus"] is None
    assert snap["gpu_error"] == "nvidia-smi not found on PATH"


def test_auto_falls_back_to_nvidia_smi_when_nvml_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backprop_mcp.governor.nvidia import nvml_loader

    try:
        nvml_loader.get()
    except ProbeError:
        pass
    else:
        pytest.skip("NVML works on this machine, so auto rightly picks it")
    fake = FakeNvidiaSmi(tmp_path)
    fake.set_gpus([{"index": 0}])
    monkeypatch.setenv("PATH", fake.path)
    snap = make_probe("auto", cpu_cache=None).snapshot()
    assert snap["gpu_probe"] == "nvidia-smi"
    assert [g["uuid"] for g in snap["gpus"] or []] == ["GPU-fake-0"]


def test_a_cpu_reading_younger_than_the_minimum_age_is_reused_not_resampled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backprop_mcp.governor import probes

    monkeypatch.setattr(probes, "CPU_CACHE_MIN_AGE_SECONDS", 30.0)  # wide, so a slow machine still fits
    cache = tmp_path / "cpu_sample.json"
    assert CachedCpu(cache).percent() is not None
    data = json.loads(cache.read_text(encoding="utf-8"))
    data["percent"] = 42.5  # a marker: a fresh sample would not give exactly this
    cache.write_text(json.dumps(data), encoding="utf-8")
    assert CachedCpu(cache).percent() == 42.5
