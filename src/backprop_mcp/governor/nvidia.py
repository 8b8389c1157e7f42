"""Reading NVIDIA GPUs: NVML through `nvidia-ml-py` (imported lazily) or the `nvidia-smi` command.

nvidia-smi output is parsed all-or-nothing: a row that is not a GPU row raises `ProbeError`
(reported as the snapshot's `gpu_error`) instead of being skipped, because silently dropping a GPU
could hide the hot one, and a table we cannot read is an unknown state, which fails closed.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

from backprop_mcp.core.machine import GpuInfo, GpuProcess
from backprop_mcp.governor.probes import ProbeError, warn_once

# Without persistence mode nvidia-smi initialises the driver on each call, 1-3 s on multi-GPU
# machines; past 10 s the driver is wedged and waiting longer only delays the answer "unknown".
NVIDIA_SMI_TIMEOUT_SECONDS = 10.0
# A killed nvidia-smi normally vanishes in milliseconds; one stuck inside the driver (state D)
# ignores SIGKILL until the driver lets go, and we must not wait on it.
NVIDIA_SMI_KILL_WAIT_SECONDS = 1.0

_MIB = 1024.0 * 1024.0
GPU_QUERY = (
    "--query-gpu=index,uuid,name,memory.total,memory.used,memory.free,temperature.gpu,utilization.gpu",
    "--format=csv,noheader,nounits",
)
APPS_QUERY = ("--query-compute-apps=gpu_uuid,pid,used_memory", "--format=csv,noheader,nounits")
# Used with fullmatch (`$` also matches before a final newline); ASCII digits only, as float() reads.
_NUMBER = re.compile(r"([-+]?[0-9]+(?:\.[0-9]+)?)\s*(?:[A-Za-z%]+)?")
_MISSING_WORDS = frozenset({"", "n/a", "na", "not supported", "unknown", "none"})


# --- nvidia-smi parsing ------------------------------------------------------------------------


def _rows(text: str, width: int) -> Iterator[tuple[int, str, list[str]]]:
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        # Older drivers print this sentence instead of an empty compute-apps table.
        if not line or line.lower().startswith("no running"):
            continue
        fields = [f.strip() for f in line.split(",")]
        while len(fields) > width and fields[-1] == "":
            fields.pop()
        yield number, line, fields


def _bad(number: int, line: str, what: str) -> ProbeError:
    shown = line if len(line) <= 120 else line[:117] + "..."
    return ProbeError(f"unreadable nvidia-smi output, line {number}: {what}: {shown!r}")


def _missing(field: str) -> bool:
    # nvidia-smi writes "[N/A]", "[Not Supported]", "[Unknown Error]", "[GPU is lost]", ...
    return field.lower() in _MISSING_WORDS or (field.startswith("[") and field.endswith("]"))


def _number(field: str, number: int, line: str, what: str) -> float | None:
    if _missing(field):
        return None
    match = _NUMBER.fullmatch(field)
    if match is None:
        raise _bad(number, line, f"{what} is not a number")
    return float(match.group(1))


def _integer(field: str, number: int, line: str, what: str) -> int:
    try:
        return int(field)
    except ValueError:
        raise _bad(number, line, f"{what} is not an integer") from None


def parse_gpu_csv(text: str) -> list[GpuInfo]:
    """GPUs from `nvidia-smi --query-gpu=<GPU_QUERY fields> --format=csv,noheader,nounits`.

    Tolerates blank lines, odd spacing, trailing commas, units left in, and missing values
    (`[N/A]`, `[Not Supported]`, `N/A`), which become None. Raises `ProbeError` for any other row.
    """
    gpus: list[GpuInfo] = []
    for number, line, fields in _rows(text, 8):
        if len(fields) < 8:
            raise _bad(number, line, f"expected 8 fields, got {len(fields)}")
        index = _integer(fields[0], number, line, "index")
        uuid = fields[1]
        if _missing(uuid):
            raise _bad(number, line, "no UUID")
        # A name with a comma in it spreads over several fields; the other seven are fixed.
        name = ", ".join(fields[2:-5])
        total, used, free, temp, util = (
            _number(field, number, line, what)
            for field, what in zip(
                fields[-5:],
                ("memory.total", "memory.used", "memory.free", "temperature", "utilization"),
                strict=True,
            )
        )
        if free is None and total is not None and used is not None:
            free = total - used
        gpus.append(
            GpuInfo(
                index=index,
                uuid=uuid,
                name=name if not _missing(name) else f"GPU {index}",
                memory_total_mb=total,
                memory_used_mb=used,
                memory_free_mb=free,
                temperature_c=temp,
                utilization_pct=util,
                processes=[],
            )
        )
    return gpus


def parse_compute_apps_csv(text: str) -> dict[str, list[GpuProcess]]:
    """Processes per GPU UUID from `nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory`.

    Same tolerance as `parse_gpu_csv`; an unknown `used_memory` becomes None.
    """
    apps: dict[str, list[GpuProcess]] = {}
    for number, line, fields in _rows(text, 3):
        if len(fields) != 3:
            raise _bad(number, line, f"expected 3 fields, got {len(fields)}")
        pid = _integer(fields[1], number, line, "pid")
        used = _number(fields[2], number, line, "used_memory")
        apps.setdefault(fields[0], []).append(GpuProcess(pid=pid, used_memory_mb=used))
    return apps


# --- GPU sources -------------------------------------------------------------------------------


def run_tool(name: str, argv: list[str], timeout: float) -> tuple[subprocess.Popen[str], str, str]:
    """Run a GPU tool (no shell) for at most `timeout` seconds: (process, stdout, stderr).
    Raises ProbeError when it cannot start or does not answer in time (it is then killed)."""
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
    except OSError as exc:
        raise ProbeError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=NVIDIA_SMI_KILL_WAIT_SECONDS)
        raise ProbeError(f"{name} did not answer within {timeout:g} s") from None
    return proc, out, err


class NvidiaSmiGpus:
    """GPUs read by running `nvidia-smi` (no shell), each call bounded by `timeout` seconds."""

    name = "nvidia-smi"

    def __init__(self, executable: str, *, timeout: float = NVIDIA_SMI_TIMEOUT_SECONDS) -> None:
        self.executable = executable
        self.timeout = timeout

    def _query(self, args: tuple[str, ...]) -> str:
        proc, out, err = run_tool("nvidia-smi", [self.executable, *args], self.timeout)
        if proc.returncode != 0:
            said = next((ln.strip() for ln in (out + "\n" + err).splitlines() if ln.strip()), "")
            raise ProbeError(f"nvidia-smi exited with status {proc.returncode}: {said[:200]}")
        return out

    def gpus(self) -> list[GpuInfo]:
        gpus = parse_gpu_csv(self._query(GPU_QUERY))
        try:
            apps = parse_compute_apps_csv(self._query(APPS_QUERY))
        except ProbeError as exc:
            # Admission needs the GPU table; the process list only adds detail to it.
            warn_once(f"GPU process list unavailable: {exc}")
            apps = {}
        for gpu in gpus:
            gpu["processes"] = apps.get(gpu["uuid"], [])
        return gpus

    def process_memory(self) -> list[tuple[int, float | None]]:
        apps = parse_compute_apps_csv(self._query(APPS_QUERY))
        return [(p["pid"], p["used_memory_mb"]) for procs in apps.values() for p in procs]


class _NvmlLoader:
    """pynvml, imported and initialised once per process (nvmlInit is slow and refcounted)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._module: Any = None
        self._error: str | None = None

    def get(self) -> Any:
        with self._lock:
            if self._module is None and self._error is None:
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._module = pynvml
                except ImportError:
                    self._error = "NVML bindings not installed (pip install 'backprop-mcp[nvml]')"
                # pynvml raises NVMLError subclasses it creates at import time, and ctypes errors
                # when libnvidia-ml is missing; any of them means "no NVML here".
                except Exception as exc:
                    self._error = f"NVML init failed: {exc}"
            if self._error is not None:
                raise ProbeError(self._error)
            return self._module


nvml_loader = _NvmlLoader()


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _nvml_process(p: Any) -> GpuProcess:
    used = p.usedGpuMemory  # bytes, or None when the driver cannot say (e.g. under WDDM or MIG)
    return GpuProcess(pid=int(p.pid), used_memory_mb=None if used is None else used / _MIB)


class NvmlGpus:
    """GPUs read through NVML; `nvml` may be injected (any object with pynvml's functions)."""

    name = "nvml"

    def __init__(self, nvml: Any = None) -> None:
        self._injected = nvml

    def gpus(self) -> list[GpuInfo]:
        nv = self._injected if self._injected is not None else nvml_loader.get()

        def optional(read: Any) -> Any:
            # Consumer cards lack some sensors: a missing reading is None, not a failed probe.
            try:
                return read()
            except nv.NVMLError:
                return None

        gpus: list[GpuInfo] = []
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                temp = optional(lambda h=h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
                util = optional(lambda h=h: nv.nvmlDeviceGetUtilizationRates(h).gpu)
                procs = optional(lambda h=h: nv.nvmlDeviceGetComputeRunningProcesses(h)) or []
                gpus.append(
                    GpuInfo(
                        index=i,
                        uuid=_text(nv.nvmlDeviceGetUUID(h)),
                        name=_text(nv.nvmlDeviceGetName(h)),
                        memory_total_mb=mem.total / _MIB,
                        memory_used_mb=mem.used / _MIB,
                        memory_free_mb=mem.free / _MIB,
                        temperature_c=None if temp is None else float(temp),
                        utilization_pct=None if util is None else float(util),
                        processes=[_nvml_process(p) for p in procs],
                    )
                )
        except nv.NVMLError as exc:
            raise ProbeError(f"NVML query failed: {exc}") from None
        return gpus

    def process_memory(self) -> list[tuple[int, float | None]]:
        return [(p["pid"], p["used_memory_mb"]) for g in self.gpus() for p in g["processes"]]


class UnavailableGpus:
    """A GPU source that cannot work on this machine; every read reports why."""

    def __init__(self, name: str, error: str) -> None:
        self.name = name
        self._error = error

    def gpus(self) -> list[GpuInfo]:
        raise ProbeError(self._error)

    def process_memory(self) -> list[tuple[int, float | None]]:
        raise ProbeError(self._error)
