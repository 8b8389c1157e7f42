"""The governor's decisions: may a run start now, on which GPU, and should a running one pause.

Pure functions over a `SystemSnapshot`, the run's `Limits` and the live runs; no I/O, so every
rule is tested with tables. Reasons and checks are sentences with the numbers in them, shown as
they are by the CLI and the MCP tools.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from backprop_mcp.core.machine import ActiveRun, Decision, GpuInfo, Limits, SystemSnapshot
from backprop_mcp.core.records import ACTIVE_STATES

# The seed's documented default: room for the OS, a data loader's workers and an editor.
DEFAULT_MIN_FREE_RAM_GB = 4.0
# Training saturates cores by itself (data loaders, tokenisers), so a busy machine is normal;
# only a machine already near 100% would starve both the new run and what is running.
DEFAULT_MAX_CPU_PERCENT = 90.0
# The seed's default: two short runs at once keep a workstation usable.
DEFAULT_MAX_PARALLEL = 2
# The seed's default: enough for a CUDA context (~300-500 MiB) plus a small model and batch.
DEFAULT_GPU_MIN_FREE_VRAM_MB = 2500.0
# The seed's default: consumer and datacenter GPUs start throttling at 83-90 C.
DEFAULT_GPU_MAX_TEMP_C = 85.0
# GPU temperature moves a degree or two between samples under steady load; 5 C of hysteresis
# stops a run near the limit from flapping between paused and running.
DEFAULT_GPU_RESUME_BELOW_C = 5.0
# Two-second CPU samples of a busy machine jitter by several points; a paused run resumes only
# when the other load is this far under the limit, for the same reason as above.
CPU_RESUME_MARGIN_PERCENT = 10.0
# The hysteresis is the configured margin, but at most this share of the limit, so the resume
# threshold stays above zero: a 10% CPU limit resumes below 5%, not below 0% (which no machine
# reaches, so the run never resumed), and a 6 C limit with a 10 C margin below 3 C.
HYSTERESIS_MAX_SHARE = 0.5
# ... and at least this share of it, so a run at the limit never flaps between paused and running,
# even with a margin of 0 (a 85 C limit then resumes below 83.3 C).
HYSTERESIS_MIN_SHARE = 0.02
# Heat and load change over tens of seconds, and one nvidia-smi call costs up to ~0.3 s of CPU:
# every 2 s reacts well inside the thermal margin while keeping the probe's own cost small.
SAMPLE_INTERVAL_SECONDS = 2.0
# Frameworks allocate their CUDA context and model in the first tens of seconds; after a minute
# the GPU's own free-memory figure already includes the run, and counting the promise longer
# would count the same memory twice.
PROMISE_WINDOW_SECONDS = 60.0
# A run without a GPU memory limit is assumed to take what it asked to find free.
DEFAULT_VRAM_PROMISE_MB = DEFAULT_GPU_MIN_FREE_VRAM_MB


def default_limits() -> Limits:
    """The limits a run gets when nothing is configured."""
    return Limits(
        min_free_ram_gb=DEFAULT_MIN_FREE_RAM_GB,
        max_cpu_percent=DEFAULT_MAX_CPU_PERCENT,
        max_parallel=DEFAULT_MAX_PARALLEL,
        gpu_min_free_vram_mb=DEFAULT_GPU_MIN_FREE_VRAM_MB,
        gpu_max_temp_c=DEFAULT_GPU_MAX_TEMP_C,
        gpu_resume_below_c=DEFAULT_GPU_RESUME_BELOW_C,
        use_gpu=True,
        gpus=None,
    )


def _fmt(x: float, digits: int = 1) -> str:
    text = f"{x:.{digits}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _pair(value: float, limit: float) -> tuple[str, str]:
    """Both figures, with enough decimals that a failing 3.96 never reads as "4 < 4"."""
    for digits in (1, 2, 3):
        a, b = _fmt(value, digits), _fmt(limit, digits)
        if a != b or value == limit:
            break
    return a, b


def _label(gpu: GpuInfo) -> str:
    return f"GPU {gpu['index']} ({gpu['name']})"


def _live(active: Sequence[ActiveRun]) -> list[ActiveRun]:
    # A queued run holds nothing yet; a finished one has let go of everything.
    return [r for r in active if r["status"] in ACTIVE_STATES and r["status"] != "queued"]


class _Verdict:
    def __init__(self) -> None:
        self.checks: list[str] = []
        self.reasons: list[str] = []

    def ok(self, line: str) -> None:
        self.checks.append(line)

    def fail(self, line: str) -> None:
        self.checks.append(line)
        self.reasons.append(line)


def _check_ram(snap: SystemSnapshot, limits: Limits, v: _Verdict) -> None:
    need, have = limits["min_free_ram_gb"], snap["ram_available_gb"]
    if have is None:
        v.ok(f"RAM free unknown; not blocking ({_fmt(need)} GB required)")
        return
    h, n = _pair(have, need)
    if have >= need:
        v.ok(f"RAM {h} GB free >= {n} GB required")
    else:
        v.fail(f"RAM {h} GB free < {n} GB required")


def _check_cpu(snap: SystemSnapshot, limits: Limits, v: _Verdict) -> None:
    limit, load = limits["max_cpu_percent"], snap["cpu_percent"]
    if load is None:
        v.ok(f"CPU load unknown; not blocking ({_fmt(limit)}% allowed)")
        return
    a, b = _pair(load, limit)
    if load <= limit:
        v.ok(f"CPU load {a}% <= {b}% allowed")
    else:
        v.fail(f"CPU load {a}% > {b}% allowed")


def _check_parallel(limits: Limits, live: list[ActiveRun], v: _Verdict) -> None:
    n, most = len(live), limits["max_parallel"]
    runs = "run" if n == 1 else "runs"
    if n < most:
        v.ok(f"{n} {runs} live < max parallel {most}")
    else:
        v.fail(f"{n} {runs} live >= max parallel {most}")


def _promised_mb(gpu: GpuInfo, live: list[ActiveRun], now: float) -> float:
    return sum(
        r["vram_promise_mb"]
        for r in live
        if r["gpu_uuid"] == gpu["uuid"]
        and r["admitted_at"] is not None
        and now - r["admitted_at"] < PROMISE_WINDOW_SECONDS
    )


def _allowed(gpu: GpuInfo, allowed: list[str]) -> bool:
    wanted = {a.strip() for a in allowed}
    return str(gpu["index"]) in wanted or gpu["uuid"] in wanted


def _check_gpu(gpu: GpuInfo, limits: Limits, promised: float) -> tuple[float | None, _Verdict]:
    """One GPU's checks, and its effective free VRAM when it passes them all."""
    v, label = _Verdict(), _label(gpu)
    need, free = limits["gpu_min_free_vram_mb"], gpu["memory_free_mb"]
    effective = None if free is None else free - promised
    if effective is None:
        v.fail(f"{label}: free memory unknown")
    else:
        after = f" (after {_fmt(promised, 0)} MB promised)" if promised else ""
        e, n = _fmt(effective, 0), _fmt(need, 0)
        if effective >= need:
            v.ok(f"{label}: {e} MB free{after} >= {n} MB required")
        else:
            v.fail(f"{label}: {e} MB free{after} < {n} MB required")
    temp, limit = gpu["temperature_c"], limits["gpu_max_temp_c"]
    if temp is None:
        v.ok(f"{label}: temperature unknown; not blocking")
    else:
        t, m = _pair(temp, limit)
        if temp < limit:
            v.ok(f"{label}: {t} C < {m} C limit")
        else:
            v.fail(f"{label}: {t} C >= {m} C limit")
    return (None if v.reasons else effective), v


def _choose_gpu(
    snap: SystemSnapshot, limits: Limits, live: list[ActiveRun], now: float, v: _Verdict
) -> GpuInfo | None:
    gpus, probe = snap["gpus"], snap["gpu_probe"]
    if gpus is None:
        error = snap["gpu_error"] or "the GPU probe failed"
        if snap["gpu_host"]:
            v.fail(f"GPU state unknown: {error}; refusing GPU runs (use --no-gpu to run on CPU)")
        else:
            v.ok(f"GPU state unknown ({error}) on a host without NVIDIA GPUs; running on CPU")
        return None
    if probe == "none":
        v.ok("GPU probing is off (probe none): GPU rules skipped, no GPU pinned")
        return None
    allowed = limits["gpus"]
    if not gpus and allowed is None:
        if snap["gpu_host"]:
            v.fail(
                f"no GPUs found by {probe} on a host that appears to have NVIDIA GPUs; "
                "refusing GPU runs (use --no-gpu to run on CPU)"
            )
        else:
            v.ok("no GPUs on this host; running on CPU")
        return None
    candidates = [g for g in gpus if allowed is None or _allowed(g, allowed)]
    if not candidates:
        seen = ", ".join(f"{g['index']} {g['uuid']}" for g in gpus) or "none"
        v.fail(f"no GPU matches the allowed GPUs {', '.join(allowed or [])} (GPUs seen: {seen})")
        return None
    for g in gpus:
        if g not in candidates:
            v.ok(f"{_label(g)}: not in the allowed GPUs; skipped")
    failures: list[str] = []
    best: tuple[float, GpuInfo] | None = None
    for g in candidates:
        effective, checked = _check_gpu(g, limits, _promised_mb(g, live, now))
        v.checks.extend(checked.checks)
        failures.extend(checked.reasons)
        # Strictly greater keeps the lowest index among equals: a stable, predictable choice.
        if effective is not None and (best is None or effective > best[0]):
            best = (effective, g)
    if best is None:
        v.reasons.extend(failures)
        return None
    v.ok(f"chose {_label(best[1])}: the most free VRAM among the GPUs that pass")
    return copy.deepcopy(best[1])


def evaluate(
    snapshot: SystemSnapshot, limits: Limits, active: Sequence[ActiveRun], *, now: float
) -> Decision:
    """May a run start now, and on which GPU.

    `active` is every other run on the machine the caller knows of; queued and finished ones are
    ignored. `now` is Unix time, used to count the VRAM promised by runs admitted within
    `PROMISE_WINDOW_SECONDS`. Rules: free RAM >= min_free_ram_gb; CPU load <= max_cpu_percent;
    live runs < max_parallel; and for GPU runs, on some allowed GPU, free VRAM minus promised VRAM
    >= gpu_min_free_vram_mb and temperature < gpu_max_temp_c, choosing the passing GPU with the
    most effective free VRAM. Unknown CPU, RAM or GPU temperature are noted and do not block; an
    unknown GPU state on a GPU host, or unknown free VRAM, does (fail closed). Every failed rule
    is in `reasons`; every rule checked is in `checks`. `gpu` is set only when allowed.
    """
    v = _Verdict()
    live = _live(active)
    _check_ram(snapshot, limits, v)
    _check_cpu(snapshot, limits, v)
    _check_parallel(limits, live, v)
    gpu = None
    if limits["use_gpu"]:
        gpu = _choose_gpu(snapshot, limits, live, now, v)
    else:
        v.ok("GPU rules skipped: CPU-only run")
    allowed = not v.reasons
    return Decision(allowed=allowed, reasons=v.reasons, gpu=gpu if allowed else None, checks=v.checks)


def resume_threshold(limit: float, margin: float) -> float:
    """Below what a paused run resumes, for a pause `limit` > 0 and a hysteresis `margin` >= 0:
    strictly between 0 and the limit (see `HYSTERESIS_MAX_SHARE` and `HYSTERESIS_MIN_SHARE`)."""
    return limit - min(max(margin, limit * HYSTERESIS_MIN_SHARE), limit * HYSTERESIS_MAX_SHARE)


def pause_verdict(
    snapshot: SystemSnapshot,
    limits: Limits,
    *,
    gpu_uuid: str | None,
    paused: bool,
    own_cpu_percent: float,
) -> tuple[bool, str | None]:
    """Should a running run be paused, or a paused one stay paused: (pause, reason).

    Hysteresis: a running run pauses when its GPU is at or above `gpu_max_temp_c`, or when the
    machine's CPU load without the run's own share (`own_cpu_percent`, in percent of all cores)
    is above `max_cpu_percent`. A paused run resumes only when its GPU is below
    `resume_threshold(gpu_max_temp_c, gpu_resume_below_c)` and the other load is below
    `resume_threshold(max_cpu_percent, CPU_RESUME_MARGIN_PERCENT)`. Unknown readings never pause
    a running run (a probe hiccup must not stop training), but an unknown GPU state keeps a paused
    run paused (fail closed: it may have been paused for heat). A GPU without a temperature sensor
    is never a reason to pause.
    """
    holds: list[str] = []
    if gpu_uuid is not None and limits["use_gpu"]:
        gpus = snapshot["gpus"]
        gpu = next((g for g in gpus if g["uuid"] == gpu_uuid), None) if gpus is not None else None
        limit = limits["gpu_max_temp_c"]
        resume = resume_threshold(limit, limits["gpu_resume_below_c"])
        if gpu is None:
            if paused:
                why = snapshot["gpu_error"] or "GPU not in the probe's list"
                holds.append(
                    f"GPU {gpu_uuid} state unknown ({why}); resumes once it reads below {_fmt(resume)} C"
                )
        elif gpu["temperature_c"] is not None:
            temp = gpu["temperature_c"]
            if not paused and temp >= limit:
                t, m = _pair(temp, limit)
                holds.append(f"{_label(gpu)}: {t} C >= {m} C limit")
            elif paused and temp >= resume:
                t, r = _pair(temp, resume)
                holds.append(f"{_label(gpu)}: {t} C; resumes below {r} C")
    load = snapshot["cpu_percent"]
    if load is not None:
        other = max(0.0, load - own_cpu_percent)
        mine = f" (this run's own {_fmt(own_cpu_percent)}% excluded)"
        most = limits["max_cpu_percent"]
        resume_cpu = resume_threshold(most, CPU_RESUME_MARGIN_PERCENT)
        if not paused and other > most:
            o, m = _pair(other, most)
            holds.append(f"CPU load {o}% from other processes > {m}% allowed{mine}")
        elif paused and other >= resume_cpu:
            o, r = _pair(other, resume_cpu)
            holds.append(f"CPU load {o}% from other processes; resumes below {r}%")
    return (True, "; ".join(holds)) if holds else (False, None)
