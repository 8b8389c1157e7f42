"""The governor's decisions, as tables: admission rules, GPU choice, and pause hysteresis."""

from __future__ import annotations

import pytest

from backprop_mcp.core.machine import ActiveRun, GpuInfo, Limits, SystemSnapshot
from backprop_mcp.governor.decisions import (
    CPU_RESUME_MARGIN_PERCENT,
    PROMISE_WINDOW_SECONDS,
    default_limits,
    evaluate,
    pause_verdict,
    resume_threshold,
)

NOW = 1_700_000_000.0


def gpu(
    index: int, *, free: float | None = 20000.0, temp: float | None = 50.0, name: str = "NVIDIA A100"
) -> GpuInfo:
    return GpuInfo(
        index=index,
        uuid=f"GPU-{index}",
        name=name,
        memory_total_mb=40960.0,
        memory_used_mb=None if free is None else 40960.0 - free,
        memory_free_mb=free,
        temperature_c=temp,
        utilization_pct=0.0,
        processes=[],
    )


def snap(
    *,
    cpu: float | None = 10.0,
    ram: float | None = 32.0,
    gpus: list[GpuInfo] | None = None,
    gpu_host: bool = True,
    gpu_error: str | None = None,
    probe: str = "nvidia-smi",
) -> SystemSnapshot:
    return SystemSnapshot(
        taken_at="2024-01-01T00:00:00.000Z",
        cpu_percent=cpu,
        cpu_count=8,
        ram_total_gb=64.0,
        ram_available_gb=ram,
        gpu_probe=probe,
        gpus=[gpu(0)] if gpus is None and gpu_error is None else gpus,
        gpu_error=gpu_error,
        gpu_host=gpu_host,
    )


def limits(
    *,
    ram: float = 4.0,
    cpu: float = 90.0,
    parallel: int = 2,
    vram: float = 2500.0,
    temp: float = 85.0,
    use_gpu: bool = True,
    gpus: list[str] | None = None,
) -> Limits:
    return Limits(
        min_free_ram_gb=ram,
        max_cpu_percent=cpu,
        max_parallel=parallel,
        gpu_min_free_vram_mb=vram,
        gpu_max_temp_c=temp,
        gpu_resume_below_c=default_limits()["gpu_resume_below_c"],
        use_gpu=use_gpu,
        gpus=gpus,
    )


def run(
    run_id: str,
    *,
    gpu_uuid: str | None = None,
    promise: float = 0.0,
    ago: float | None = None,
    status: str = "running",
) -> ActiveRun:
    return ActiveRun(
        run_id=run_id,
        status=status,
        gpu_uuid=gpu_uuid,
        vram_promise_mb=promise,
        admitted_at=None if ago is None else NOW - ago,
    )


# --- one rule at a time ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("free", "need", "allowed", "line"),
    [
        (8.0, 4.0, True, "RAM 8 GB free >= 4 GB required"),
        (4.0, 4.0, True, "RAM 4 GB free >= 4 GB required"),
        (2.1, 4.0, False, "RAM 2.1 GB free < 4 GB required"),
        (3.96, 4.0, False, "RAM 3.96 GB free < 4 GB required"),
        (0.0, 0.5, False, "RAM 0 GB free < 0.5 GB required"),
        (None, 4.0, True, "RAM free unknown; not blocking (4 GB required)"),
    ],
)
def test_the_ram_rule(free: float | None, need: float, allowed: bool, line: str) -> None:
    decision = evaluate(snap(ram=free), limits(ram=need), [], now=NOW)
    assert decision["allowed"] is allowed
    assert line in decision["checks"]
    assert decision["reasons"] == ([] if allowed else [line])


@pytest.mark.parametrize(
    ("load", "most", "allowed", "line"),
    [
        (12.0, 90.0, True, "CPU load 12% <= 90% allowed"),
        (90.0, 90.0, True, "CPU load 90% <= 90% allowed"),
        (93.0, 90.0, False, "CPU load 93% > 90% allowed"),
        (90.04, 90.0, False, "CPU load 90.04% > 90% allowed"),
        (None, 90.0, True, "CPU load unknown; not blocking (90% allowed)"),
    ],
)
def test_the_cpu_rule(load: float | None, most: float, allowed: bool, line: str) -> None:
    decision = evaluate(snap(cpu=load), limits(cpu=most), [], now=NOW)
    assert decision["allowed"] is allowed
    assert line in decision["checks"]
    assert decision["reasons"] == ([] if allowed else [line])


@pytest.mark.parametrize(
    ("active", "most", "allowed", "line"),
    [
        ([], 2, True, "0 runs live < max parallel 2"),
        ([run("a")], 2, True, "1 run live < max parallel 2"),
        ([run("a"), run("b", status="paused")], 2, False, "2 runs live >= max parallel 2"),
        ([run("a"), run("b"), run("c")], 2, False, "3 runs live >= max parallel 2"),
        (
            [run("a"), run("q", status="queued"), run("d", status="completed")],
            2,
            True,
            "1 run live < max parallel 2",
        ),
        ([run("a")], 1, False, "1 run live >= max parallel 1"),
    ],
)
def test_the_parallel_rule_counts_only_live_runs(
    active: list[ActiveRun], most: int, allowed: bool, line: str
) -> None:
    decision = evaluate(snap(), limits(parallel=most), active, now=NOW)
    assert decision["allowed"] is allowed
    assert line in decision["checks"]


@pytest.mark.parametrize(
    ("the_gpu", "allowed", "line"),
    [
        (gpu(0, free=2500.0), True, "GPU 0 (NVIDIA A100): 2500 MB free >= 2500 MB required"),
        (gpu(0, free=1200.0), False, "GPU 0 (NVIDIA A100): 1200 MB free < 2500 MB required"),
        (gpu(0, free=None), False, "GPU 0 (NVIDIA A100): free memory unknown"),
        (gpu(0, temp=84.9), True, "GPU 0 (NVIDIA A100): 84.9 C < 85 C limit"),
        (gpu(0, temp=85.0), False, "GPU 0 (NVIDIA A100): 85 C >= 85 C limit"),
        (gpu(0, temp=88.0), False, "GPU 0 (NVIDIA A100): 88 C >= 85 C limit"),
        (gpu(0, temp=None), True, "GPU 0 (NVIDIA A100): temperature unknown; not blocking"),
    ],
)
def test_the_gpu_rules(the_gpu: GpuInfo, allowed: bool, line: str) -> None:
    decision = evaluate(snap(gpus=[the_gpu]), limits(), [], now=NOW)
    assert decision["allowed"] is allowed
    assert line in decision["checks"]
    assert (line in decision["reasons"]) is not allowed
    assert (decision["gpu"] is not None) is allowed


# --- every failure at once ---------------------------------------------------------------------


def test_every_failed_rule_is_reported_together_with_its_numbers() -> None:
    decision = evaluate(
        snap(cpu=93.0, ram=2.1, gpus=[gpu(0, free=1200.0), gpu(1, temp=88.0)]),
        limits(),
        [run("a", gpu_uuid="GPU-0", promise=800.0, ago=10.0), run("b")],
        now=NOW,
    )
    assert decision["allowed"] is False
    assert decision["gpu"] is None
    assert decision["reasons"] == [
        "RAM 2.1 GB free < 4 GB required",
        "CPU load 93% > 90% allowed",
        "2 runs live >= max parallel 2",
        "GPU 0 (NVIDIA A100): 400 MB free (after 800 MB promised) < 2500 MB required",
        "GPU 1 (NVIDIA A100): 88 C >= 85 C limit",
    ]
    assert set(decision["reasons"]) <= set(decision["checks"])


def test_a_passing_gpu_is_not_pinned_when_another_rule_refuses_the_run() -> None:
    decision = evaluate(snap(ram=1.0), limits(), [], now=NOW)
    assert decision["allowed"] is False
    assert decision["gpu"] is None
    assert decision["reasons"] == ["RAM 1 GB free < 4 GB required"]


def test_a_gpu_failing_both_its_rules_reports_both() -> None:
    decision = evaluate(snap(gpus=[gpu(0, free=100.0, temp=90.0)]), limits(), [], now=NOW)
    assert decision["reasons"] == [
        "GPU 0 (NVIDIA A100): 100 MB free < 2500 MB required",
        "GPU 0 (NVIDIA A100): 90 C >= 85 C limit",
    ]


# --- choosing a GPU ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpus", "chosen"),
    [
        ([gpu(0, free=10000.0), gpu(1, free=30000.0), gpu(2, free=20000.0)], 1),
        ([gpu(0, free=10000.0), gpu(1, free=30000.0, temp=90.0), gpu(2, free=20000.0)], 2),
        ([gpu(0, free=1000.0), gpu(1, free=3000.0)], 1),
        ([gpu(0, free=5000.0), gpu(1, free=5000.0)], 0),
        ([gpu(0, free=None), gpu(1, free=3000.0, temp=None)], 1),
    ],
)
def test_the_passing_gpu_with_the_most_free_vram_is_chosen(gpus: list[GpuInfo], chosen: int) -> None:
    decision = evaluate(snap(gpus=gpus), limits(), [], now=NOW)
    assert decision["allowed"] is True
    assert decision["reasons"] == []
    assert decision["gpu"] is not None
    assert decision["gpu"]["index"] == chosen
    assert (
        f"chose GPU {chosen} (NVIDIA A100): the most free VRAM among the GPUs that pass" in decision["checks"]
    )


def test_failures_of_gpus_not_chosen_stay_in_the_checks_only() -> None:
    decision = evaluate(snap(gpus=[gpu(0, temp=95.0), gpu(1)]), limits(), [], now=NOW)
    assert decision["allowed"] is True
    assert "GPU 0 (NVIDIA A100): 95 C >= 85 C limit" in decision["checks"]


@pytest.mark.parametrize(
    ("active", "allowed", "line"),
    [
        ([], True, "GPU 0 (NVIDIA A100): 5000 MB free >= 2500 MB required"),
        (
            [run("a", gpu_uuid="GPU-0", promise=3000.0, ago=10.0)],
            False,
            "GPU 0 (NVIDIA A100): 2000 MB free (after 3000 MB promised) < 2500 MB required",
        ),
        (
            [
                run("a", gpu_uuid="GPU-0", promise=1500.0, ago=1.0),
                run("b", gpu_uuid="GPU-0", promise=1500.0, ago=2.0),
            ],
            False,
            "GPU 0 (NVIDIA A100): 2000 MB free (after 3000 MB promised) < 2500 MB required",
        ),
        (
            [run("a", gpu_uuid="GPU-0", promise=3000.0, ago=PROMISE_WINDOW_SECONDS + 1)],
            True,
            "GPU 0 (NVIDIA A100): 5000 MB free >= 2500 MB required",
        ),
        (
            [run("a", gpu_uuid="GPU-0", promise=3000.0, ago=None)],
            True,
            "GPU 0 (NVIDIA A100): 5000 MB free >= 2500 MB required",
        ),
        (
            [run("a", gpu_uuid="GPU-9", promise=3000.0, ago=1.0)],
            True,
            "GPU 0 (NVIDIA A100): 5000 MB free >= 2500 MB required",
        ),
        (
            [run("a", gpu_uuid="GPU-0", promise=3000.0, ago=1.0, status="completed")],
            True,
            "GPU 0 (NVIDIA A100): 5000 MB free >= 2500 MB required",
        ),
    ],
)
def test_vram_promised_to_runs_admitted_moments_ago_is_counted(
    active: list[ActiveRun], allowed: bool, line: str
) -> None:
    decision = evaluate(snap(gpus=[gpu(0, free=5000.0)]), limits(parallel=9), active, now=NOW)
    assert decision["allowed"] is allowed
    assert line in decision["checks"]


def test_promised_vram_can_move_the_choice_to_another_gpu() -> None:
    decision = evaluate(
        snap(gpus=[gpu(0, free=8000.0), gpu(1, free=6000.0)]),
        limits(),
        [run("a", gpu_uuid="GPU-0", promise=7000.0, ago=5.0)],
        now=NOW,
    )
    assert decision["gpu"] is not None
    assert decision["gpu"]["index"] == 1


@pytest.mark.parametrize(
    ("allowed_gpus", "chosen"),
    [(["1"], 1), (["GPU-2"], 2), ([" 0 ", "2"], 2), (["0"], 0)],
)
def test_a_gpu_restriction_limits_the_choice_by_index_or_uuid(allowed_gpus: list[str], chosen: int) -> None:
    gpus = [gpu(0, free=3000.0), gpu(1, free=9000.0), gpu(2, free=30000.0)]
    decision = evaluate(snap(gpus=gpus), limits(gpus=allowed_gpus), [], now=NOW)
    assert decision["gpu"] is not None
    assert decision["gpu"]["index"] == chosen


def test_a_gpu_restriction_matching_no_gpu_refuses_and_lists_what_was_seen() -> None:
    decision = evaluate(snap(gpus=[gpu(0), gpu(1)]), limits(gpus=["7"]), [], now=NOW)
    assert decision["reasons"] == ["no GPU matches the allowed GPUs 7 (GPUs seen: 0 GPU-0, 1 GPU-1)"]


def test_gpus_outside_the_restriction_are_skipped_even_when_they_are_best() -> None:
    decision = evaluate(snap(gpus=[gpu(0, free=30000.0), gpu(1, temp=90.0)]), limits(gpus=["1"]), [], now=NOW)
    assert decision["allowed"] is False
    assert decision["reasons"] == ["GPU 1 (NVIDIA A100): 90 C >= 85 C limit"]
    assert "GPU 0 (NVIDIA A100): not in the allowed GPUs; skipped" in decision["checks"]


# --- unknown and absent GPUs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("snapshot", "use_gpu", "allowed", "line"),
    [
        (
            snap(gpus=None, gpu_error="nvidia-smi did not answer within 10 s", gpu_host=True),
            True,
            False,
            "GPU state unknown: nvidia-smi did not answer within 10 s; "
            "refusing GPU runs (use --no-gpu to run on CPU)",
        ),
        (
            snap(gpus=None, gpu_error="NVML init failed: no driver", gpu_host=False),
            True,
            True,
            "GPU state unknown (NVML init failed: no driver) on a host without NVIDIA GPUs; running on CPU",
        ),
        (
            snap(gpus=None, gpu_error="nvidia-smi did not answer within 10 s", gpu_host=True),
            False,
            True,
            "GPU rules skipped: CPU-only run",
        ),
        (
            snap(gpus=[], gpu_host=False, probe="none"),
            True,
            True,
            "GPU probing is off (probe none): GPU rules skipped, no GPU pinned",
        ),
        (snap(gpus=[], gpu_host=False), True, True, "no GPUs on this host; running on CPU"),
        (
            snap(gpus=[], gpu_host=True),
            True,
            False,
            "no GPUs found by nvidia-smi on a host that appears to have NVIDIA GPUs; "
            "refusing GPU runs (use --no-gpu to run on CPU)",
        ),
    ],
)
def test_unknown_gpu_state_fails_closed_only_where_gpus_exist(
    snapshot: SystemSnapshot, use_gpu: bool, allowed: bool, line: str
) -> None:
    decision = evaluate(snapshot, limits(use_gpu=use_gpu), [], now=NOW)
    assert decision["allowed"] is allowed
    assert decision["gpu"] is None
    assert line in decision["checks"]
    assert decision["reasons"] == ([] if allowed else [line])


def test_a_cpu_only_run_ignores_hot_and_full_gpus() -> None:
    decision = evaluate(snap(gpus=[gpu(0, free=10.0, temp=99.0)]), limits(use_gpu=False), [], now=NOW)
    assert decision["allowed"] is True
    assert decision["gpu"] is None
    assert not any(c.startswith("GPU 0") for c in decision["checks"])


def test_checks_list_every_rule_checked_in_order() -> None:
    decision = evaluate(snap(gpus=[gpu(0, free=9000.0, temp=40.0)]), limits(), [run("a")], now=NOW)
    assert decision["checks"] == [
        "RAM 32 GB free >= 4 GB required",
        "CPU load 10% <= 90% allowed",
        "1 run live < max parallel 2",
        "GPU 0 (NVIDIA A100): 9000 MB free >= 2500 MB required",
        "GPU 0 (NVIDIA A100): 40 C < 85 C limit",
        "chose GPU 0 (NVIDIA A100): the most free VRAM among the GPUs that pass",
    ]


def test_the_chosen_gpu_is_a_copy_of_the_snapshot_entry() -> None:
    snapshot = snap()
    decision = evaluate(snapshot, limits(), [], now=NOW)
    assert decision["gpu"] == snapshot["gpus"][0]  # type: ignore[index]
    assert decision["gpu"] is not snapshot["gpus"][0]  # type: ignore[index]


# --- pausing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("temp", "load", "own", "paused", "pause", "reason"),
    [
        # Running: pause at the limits.
        (84.0, 50.0, 0.0, False, False, None),
        (85.0, 50.0, 0.0, False, True, "GPU 0 (NVIDIA A100): 85 C >= 85 C limit"),
        (
            84.0,
            95.0,
            0.0,
            False,
            True,
            "CPU load 95% from other processes > 90% allowed (this run's own 0% excluded)",
        ),
        (84.0, 95.0, 20.0, False, False, None),
        (84.0, 90.0, 0.0, False, False, None),
        (
            90.0,
            99.0,
            4.0,
            False,
            True,
            "GPU 0 (NVIDIA A100): 90 C >= 85 C limit; "
            "CPU load 95% from other processes > 90% allowed (this run's own 4% excluded)",
        ),
        # Paused: resume only well below the limits.
        (84.0, 50.0, 0.0, True, True, "GPU 0 (NVIDIA A100): 84 C; resumes below 80 C"),
        (80.0, 50.0, 0.0, True, True, "GPU 0 (NVIDIA A100): 80 C; resumes below 80 C"),
        (79.9, 50.0, 0.0, True, False, None),
        (70.0, 85.0, 0.0, True, True, "CPU load 85% from other processes; resumes below 80%"),
        (70.0, 80.0, 0.0, True, True, "CPU load 80% from other processes; resumes below 80%"),
        (70.0, 79.0, 0.0, True, False, None),
        (70.0, None, 0.0, True, False, None),
        (70.0, None, 0.0, False, False, None),
        (None, 50.0, 0.0, False, False, None),
        (None, 50.0, 0.0, True, False, None),
    ],
)
def test_pause_verdict_table(
    temp: float | None, load: float | None, own: float, paused: bool, pause: bool, reason: str | None
) -> None:
    snapshot = snap(cpu=load, gpus=[gpu(0, temp=temp)])
    assert pause_verdict(snapshot, limits(), gpu_uuid="GPU-0", paused=paused, own_cpu_percent=own) == (
        pause,
        reason,
    )


def test_a_gpu_heating_and_cooling_pauses_once_and_resumes_once() -> None:
    temps = [80.0, 86.0, 84.0, 81.0, 79.0, 84.0, 86.0]
    paused, seen = False, []
    for t in temps:
        paused, _ = pause_verdict(
            snap(gpus=[gpu(0, temp=t)]), limits(), gpu_uuid="GPU-0", paused=paused, own_cpu_percent=0.0
        )
        seen.append(paused)
    assert seen == [False, True, True, True, False, False, True]


@pytest.mark.parametrize(
    ("paused", "pause", "reason"),
    [
        (False, False, None),
        (
            True,
            True,
            "GPU GPU-0 state unknown (nvidia-smi did not answer within 10 s); "
            "resumes once it reads below 80 C",
        ),
    ],
)
def test_unknown_gpu_state_never_pauses_a_run_but_keeps_a_paused_one_paused(
    paused: bool, pause: bool, reason: str | None
) -> None:
    snapshot = snap(gpus=None, gpu_error="nvidia-smi did not answer within 10 s")
    assert pause_verdict(snapshot, limits(), gpu_uuid="GPU-0", paused=paused, own_cpu_percent=0.0) == (
        pause,
        reason,
    )


def test_a_run_without_a_gpu_ignores_gpu_heat() -> None:
    snapshot = snap(gpus=[gpu(0, temp=99.0)])
    assert pause_verdict(snapshot, limits(), gpu_uuid=None, paused=False, own_cpu_percent=0.0) == (
        False,
        None,
    )
    assert pause_verdict(
        snapshot, limits(use_gpu=False), gpu_uuid="GPU-0", paused=False, own_cpu_percent=0.0
    ) == (
        False,
        None,
    )


def test_a_busy_run_is_not_paused_for_its_own_cpu_load() -> None:
    snapshot = snap(cpu=95.0)
    assert pause_verdict(snapshot, limits(), gpu_uuid="GPU-0", paused=False, own_cpu_percent=60.0) == (
        False,
        None,
    )
    assert pause_verdict(snapshot, limits(), gpu_uuid="GPU-0", paused=False, own_cpu_percent=0.0)[0] is True


# --- hysteresis over the whole range of limits (issue 9, item 10) ------------------------------

# CPU limits over (0, 100]: the small ones are where the fixed 10-point margin reached zero.
CPU_LIMITS = [0.001, 0.5, 1.0, 5.0, 9.99, 10.0, 10.01, 15.0, 20.0, 50.0, 90.0, 99.9, 100.0]
# GPU limits with margins from none to far more than the limit itself.
GPU_CASES = [
    (temp, margin)
    for temp in (0.5, 1.0, 5.0, 10.0, 40.0, 85.0, 100.0, 150.0)
    for margin in (0.0, 0.1, 1.0, 5.0, 10.0, 85.0, 200.0)
]


@pytest.mark.parametrize("limit", CPU_LIMITS)
def test_the_cpu_resume_threshold_is_above_zero_and_below_the_limit(limit: float) -> None:
    threshold = resume_threshold(limit, CPU_RESUME_MARGIN_PERCENT)
    assert 0 < threshold < limit


@pytest.mark.parametrize(("limit", "margin"), GPU_CASES)
def test_the_gpu_resume_threshold_is_above_zero_and_below_the_limit(limit: float, margin: float) -> None:
    threshold = resume_threshold(limit, margin)
    assert 0 < threshold < limit


@pytest.mark.parametrize(
    ("limit", "margin", "threshold"),
    [(90.0, 10.0, 80.0), (20.0, 10.0, 10.0), (10.0, 10.0, 5.0), (85.0, 5.0, 80.0), (6.0, 10.0, 3.0)],
)
def test_the_configured_margin_holds_until_it_would_take_half_the_limit(
    limit: float, margin: float, threshold: float
) -> None:
    assert resume_threshold(limit, margin) == pytest.approx(threshold)


@pytest.mark.parametrize("limit", CPU_LIMITS)
def test_a_run_paused_for_cpu_load_resumes_once_the_machine_is_idle(limit: float) -> None:
    busy = snap(cpu=min(limit * 2 + 1, 100.0), gpus=[])
    idle = snap(cpu=0.0, gpus=[])
    paused, _ = pause_verdict(busy, limits(cpu=limit), gpu_uuid=None, paused=False, own_cpu_percent=0.0)
    assert paused or limit == 100.0  # a 100% limit is never exceeded
    assert pause_verdict(idle, limits(cpu=limit), gpu_uuid=None, paused=True, own_cpu_percent=0.0) == (
        False,
        None,
    )


@pytest.mark.parametrize(("limit", "margin"), GPU_CASES)
def test_a_run_paused_for_heat_resumes_once_its_gpu_is_cool(limit: float, margin: float) -> None:
    cold = snap(cpu=0.0, gpus=[gpu(0, temp=0.0)])
    bounds = Limits(**{**limits(temp=limit), "gpu_resume_below_c": margin})
    assert pause_verdict(cold, bounds, gpu_uuid="GPU-0", paused=True, own_cpu_percent=0.0) == (False, None)
