"""The governor's shapes: what a probe saw of the machine (`SystemSnapshot`, `GpuInfo`), the
limits a run is held to, the live runs it counts and its verdict (`Decision`).

TypedDicts, like every shape in `core` (see `records` for why).
"""

from __future__ import annotations

from typing import Any

# pydantic needs typing_extensions.TypedDict on Python < 3.12 to read nested TypedDicts.
from typing_extensions import TypedDict

# Pydantic reads attribute docstrings as field descriptions in the MCP schemas; setting the
# config as a plain dict keeps pydantic out of this module's imports.
_DOC_CONFIG: Any = {"use_attribute_docstrings": True}


class GpuProcess(TypedDict):
    """A process using a GPU."""

    pid: int
    """Process id."""
    used_memory_mb: float | None
    """GPU memory it holds, in MiB, when known."""


class GpuInfo(TypedDict):
    """One GPU as the probe saw it."""

    index: int
    """Index in PCI bus order."""
    uuid: str
    """Stable UUID (GPU-...), used for CUDA_VISIBLE_DEVICES."""
    name: str
    """Marketing name."""
    memory_total_mb: float | None
    """Total memory in MiB."""
    memory_used_mb: float | None
    """Used memory in MiB."""
    memory_free_mb: float | None
    """Free memory in MiB."""
    temperature_c: float | None
    """Core temperature in Celsius."""
    utilization_pct: float | None
    """Compute utilisation in percent."""
    processes: list[GpuProcess]
    """Compute processes on this GPU."""


class SystemSnapshot(TypedDict):
    """What the governor saw of the machine at one moment."""

    taken_at: str
    """When, ISO 8601 UTC."""
    cpu_percent: float | None
    """Machine-wide CPU load in percent of all cores; None when unknown."""
    cpu_count: int
    """Logical CPUs."""
    ram_total_gb: float | None
    """Total RAM in GB."""
    ram_available_gb: float | None
    """RAM available to new processes in GB (psutil 'available', not 'free')."""
    gpu_probe: str
    """Probe that produced the GPU list: nvml, nvidia-smi, rocm-smi, static or none."""
    gpus: list[GpuInfo] | None
    """GPUs seen; None when the GPU state is unknown (the probe failed)."""
    gpu_error: str | None
    """Why the GPU state is unknown, when it is."""
    gpu_host: bool
    """True when this machine appears to have NVIDIA GPUs (so an unknown state fails closed)."""


class Limits(TypedDict):
    """The governor's limits for one run."""

    min_free_ram_gb: float
    """Free RAM needed to start, GB."""
    max_cpu_percent: float
    """Highest machine CPU load at which a run may start or keep running, percent."""
    max_parallel: int
    """Most runs live at once on this machine."""
    gpu_min_free_vram_mb: float
    """Free VRAM a GPU needs to be chosen, MiB."""
    gpu_max_temp_c: float
    """A GPU at or above this temperature is not chosen, and pauses runs on it."""
    gpu_resume_below_c: float
    """A paused run resumes when its GPU is this much cooler than gpu_max_temp_c (hysteresis), C."""
    use_gpu: bool
    """False for CPU-only runs: GPU rules are skipped."""
    gpus: list[str] | None
    """Allowed GPUs (indices or UUIDs); None allows all."""


class ActiveRun(TypedDict):
    """A live run, as the governor counts it."""

    run_id: str
    status: str
    gpu_uuid: str | None
    vram_promise_mb: float
    """VRAM this run may still be about to allocate (admitted moments ago)."""
    admitted_at: float | None
    """Unix time of admission."""


class Decision(TypedDict):
    """The governor's verdict for a run now."""

    allowed: bool
    """True when the run may start now."""
    reasons: list[str]
    """Every rule that failed, with numbers (e.g. 'RAM 2.1 GB free < 4 GB required')."""
    gpu: GpuInfo | None
    """The GPU chosen for the run, when it uses one."""
    checks: list[str]
    """Every rule checked, passed or not, with numbers."""


# Set after the class bodies, as pydantic's own `with_config` does: written inside a TypedDict
# body, a type checker takes `__pydantic_config__` for a required key of the shape.
_DOCUMENTED: tuple[Any, ...] = (GpuProcess, GpuInfo, SystemSnapshot, Limits, ActiveRun, Decision)
for _shape in _DOCUMENTED:
    _shape.__pydantic_config__ = _DOC_CONFIG
