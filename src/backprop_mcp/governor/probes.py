"""The probe boundary: what the governor can see of this machine's CPU, RAM and GPUs.

The protocols every probe implements (`SystemProbe`, `GpuSource`), the CPU sampling and its
machine-wide cache, and `HostProbe`, the real machine. The GPU readers live in `nvidia` (NVIDIA)
and `rocm` (AMD), the fixed machine for tests and `--dry-run` in `static_probe`; `probe_choice`
picks one (`make_probe`), so that this module imports none of them.

A failing GPU probe never raises out of `snapshot()`: it yields `gpus=None` with `gpu_error` set
(logged once per process), and `gpu_host` says whether the machine looks like it has GPUs,
so that the governor can fail closed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple, Protocol

import psutil

from backprop_mcp.core.files import replace_json
from backprop_mcp.core.machine import GpuInfo, SystemSnapshot

log = logging.getLogger(__name__)

# Spans ten scheduler ticks (USER_HZ=100) per CPU, so the figure is a real measurement, yet keeps
# `backprop status` interactive when no recent sample is cached.
CPU_BLOCKING_SAMPLE_SECONDS = 0.1
# Under 50 ms the tick counters barely move and the percentage is mostly rounding noise.
CPU_CACHE_MIN_AGE_SECONDS = 0.05
# An average over more than a minute no longer describes the machine "now".
CPU_CACHE_MAX_AGE_SECONDS = 60.0

_GIB = 1024.0**3
_warned: set[str] = set()


class ProbeError(Exception):
    """A probe could not read the machine (internal: it becomes `gpu_error`, never a user error)."""


class SystemProbe(Protocol):
    """What the governor and supervisor need from a probe."""

    def snapshot(self) -> SystemSnapshot:
        """The machine now; never raises for GPU trouble (see the module docstring)."""
        ...

    def gpu_process_memory(self, pids: Collection[int]) -> float | None:
        """GPU MiB held by these pids across all GPUs; None when unknown."""
        ...


def warn_once(message: str) -> None:
    """Log a warning the first time this process sees it (shared by the probe modules)."""
    # A broken driver would otherwise log the same line every sample for hours.
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def now_iso() -> str:
    """Now as ISO 8601 UTC with milliseconds, the form of `SystemSnapshot.taken_at`."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- CPU and RAM -------------------------------------------------------------------------------


class _CpuTimes(NamedTuple):
    busy: float
    total: float
    at: float  # time.monotonic(): CLOCK_MONOTONIC is one clock for every process on the machine


def _read_cpu_times() -> _CpuTimes:
    fields: dict[str, float] = psutil.cpu_times()._asdict()
    # Same accounting as psutil.cpu_percent: guest time is already inside user/nice on Linux,
    # and iowait is idle time.
    total = sum(v for k, v in fields.items() if k not in ("guest", "guest_nice"))
    idle = fields.get("idle", 0.0) + fields.get("iowait", 0.0)
    return _CpuTimes(busy=total - idle, total=total, at=time.monotonic())


def _percent(a: _CpuTimes, b: _CpuTimes) -> float | None:
    elapsed = b.total - a.total
    if elapsed <= 0:
        return None
    return min(100.0, max(0.0, 100.0 * (b.busy - a.busy) / elapsed))


def _percent_since(prev: _CpuTimes | None, blocking_seconds: float) -> tuple[float | None, _CpuTimes]:
    now = _read_cpu_times()
    if prev is not None and CPU_CACHE_MIN_AGE_SECONDS <= now.at - prev.at <= CPU_CACHE_MAX_AGE_SECONDS:
        pct = _percent(prev, now)
        if pct is not None:
            return pct, now
    time.sleep(blocking_seconds)
    later = _read_cpu_times()
    return _percent(now, later), later


class CpuSource(Protocol):
    """Machine CPU load in percent of all cores; None when unknown."""

    def percent(self) -> float | None: ...


class CpuSampler:
    """Live machine CPU load for a long-lived process: each call measures since the previous one.

    Primed on construction, like `psutil.cpu_percent(interval=None)` but with its own baseline, so
    two samplers in one process do not steal each other's interval. A call less than
    `CPU_CACHE_MIN_AGE_SECONDS` after the previous one takes a short blocking sample instead.
    """

    def __init__(self, *, blocking_seconds: float = CPU_BLOCKING_SAMPLE_SECONDS) -> None:
        self._blocking = blocking_seconds
        self._last: _CpuTimes | None = _read_cpu_times()

    def percent(self) -> float | None:
        try:
            pct, self._last = _percent_since(self._last, self._blocking)
        except (OSError, psutil.Error) as exc:
            warn_once(f"CPU load unavailable: {exc}")
            return None
        return pct


class CachedCpu:
    """Machine CPU load for short-lived commands, measured since the sample a previous one cached.

    The cache file holds the last CPU time totals; a sample between `CPU_CACHE_MIN_AGE_SECONDS`
    and `CPU_CACHE_MAX_AGE_SECONDS` old gives a real figure at no cost, otherwise a blocking sample
    of `blocking_seconds` is taken. A missing, corrupt or unwritable cache only costs that sample.
    """

    def __init__(self, path: Path, *, blocking_seconds: float = CPU_BLOCKING_SAMPLE_SECONDS) -> None:
        self.path = path
        self._blocking = blocking_seconds

    def percent(self) -> float | None:
        recent = self._recent_percent()
        if recent is not None:
            return recent
        try:
            pct, latest = _percent_since(self._load(), self._blocking)
        except (OSError, psutil.Error) as exc:
            warn_once(f"CPU load unavailable: {exc}")
            return None
        data = {
            "version": 1,
            "busy": latest.busy,
            "total": latest.total,
            "monotonic": latest.at,
            "percent": pct,
        }
        try:
            replace_json(self.path, data)
        except OSError as exc:
            log.debug("cannot write the CPU sample cache %s: %s", self.path, exc)
        return pct

    def _recent_percent(self) -> float | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            age = time.monotonic() - float(data["monotonic"])
            pct = data.get("percent")
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None
        if 0 <= age < CPU_CACHE_MIN_AGE_SECONDS and isinstance(pct, int | float):
            return float(pct)
        return None

    def _load(self) -> _CpuTimes | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("version") != 1:
                raise ValueError("unknown version")
            return _CpuTimes(
                busy=float(data["busy"]), total=float(data["total"]), at=float(data["monotonic"])
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.info("ignoring the CPU sample cache %s: %s", self.path, exc)
            return None


def prime_cpu_cache(path: Path) -> None:
    """Start a CPU sample in the cache file without waiting, unless a usable one is there."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if 0 <= time.monotonic() - float(data["monotonic"]) <= CPU_CACHE_MAX_AGE_SECONDS:
            return
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    with contextlib.suppress(OSError, psutil.Error):
        now = _read_cpu_times()
        replace_json(path, {"version": 1, "busy": now.busy, "total": now.total, "monotonic": now.at})


def _ram() -> tuple[float | None, float | None]:
    try:
        vm = psutil.virtual_memory()
    except (OSError, psutil.Error) as exc:
        warn_once(f"RAM figures unavailable: {exc}")
        return None, None
    return vm.total / _GIB, vm.available / _GIB


def looks_like_gpu_host(nvidia_smi: str | None = None) -> bool:
    """True when this machine appears to have NVIDIA GPUs, whether or not a probe can read them."""
    with contextlib.suppress(OSError):
        if any(Path("/proc/driver/nvidia/gpus").iterdir()):
            return True
    return Path("/dev/nvidia0").exists() or (nvidia_smi or shutil.which("nvidia-smi")) is not None


def looks_like_amd_gpu_host(rocm_smi: str | None) -> bool:
    """True when this machine appears to have AMD GPUs for ROCm (the KFD device, or rocm-smi)."""
    return Path("/dev/kfd").exists() or rocm_smi is not None


# --- probes ------------------------------------------------------------------------------------


def process_total(processes: list[tuple[int, float | None]], pids: Collection[int]) -> float | None:
    wanted = set(pids)
    total = 0.0
    for pid, used in processes:
        if pid in wanted:
            if used is None:
                return None
            total += used
    return total


class GpuSource(Protocol):
    """One way of reading the GPUs (see `backprop_mcp.governor.nvidia`)."""

    name: str

    def gpus(self) -> list[GpuInfo]:
        """The GPUs now; raises ProbeError."""
        ...

    def process_memory(self) -> list[tuple[int, float | None]]:
        """(pid, MiB) for every compute process on every GPU; raises ProbeError."""
        ...


class HostProbe:
    """The real machine: CPU and RAM from psutil, GPUs from one GPU source or none."""

    def __init__(self, gpu: GpuSource | None, *, cpu: CpuSource, gpu_host: bool) -> None:
        self._gpu = gpu
        self._cpu = cpu
        self._gpu_host = gpu_host

    def snapshot(self) -> SystemSnapshot:
        gpus: list[GpuInfo] | None = []
        error = None
        if self._gpu is not None:
            try:
                gpus = self._gpu.gpus()
            except ProbeError as exc:
                gpus, error = None, str(exc)
                warn_once(f"GPU state unknown ({self._gpu.name}): {error}")
        total, available = _ram()
        return SystemSnapshot(
            taken_at=now_iso(),
            cpu_percent=self._cpu.percent(),
            cpu_count=psutil.cpu_count() or os.cpu_count() or 1,
            ram_total_gb=total,
            ram_available_gb=available,
            gpu_probe=self._gpu.name if self._gpu is not None else "none",
            gpus=gpus,
            gpu_error=error,
            gpu_host=self._gpu_host,
        )

    def gpu_process_memory(self, pids: Collection[int]) -> float | None:
        if self._gpu is None:
            return None
        try:
            return process_total(self._gpu.process_memory(), pids)
        except ProbeError as exc:
            warn_once(f"GPU process memory unknown ({self._gpu.name}): {exc}")
            return None
