"""The settings table: every setting declared once in `FIELDS`, with its seed-compatible file key,
its environment variable, its CLI option, its parser and its help; the file-only defaults of
`backprop run` (`RUN_DEFAULTS`); and `Settings`, the effective values of one call. Files,
variables, CLI options and MCP arguments are all validated through this table, so their errors
name the same things. Stdlib only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from backprop_mcp.core.parsers import (
    MAX_BOX_MINUTES,
    MINUTES,
    STOP_SIGNALS,
    TEMPERATURE,
    Range,
    choice,
    fmt,
    parse_flag,
    parse_globs,
    parse_gpu_list,
    parse_gpu_memory_limit,
    parse_path_list,
    parse_python,
    parse_ray_address,
    parse_run_id,
    parse_stop_signal,
    parse_text,
)

FRAMEWORK_CHOICES = ("auto", "pytorch", "tensorflow", "jax", "none")
PROBE_CHOICES = ("auto", "nvml", "nvidia-smi", "rocm", "none", "static")
BACKEND_CHOICES = ("local", "ray")
# The wall-clock cap defaults to this multiple of the time box: a run may spend up to twice its
# box paused (hot GPU, busy machine) before it is stopped anyway.
WALL_CAP_MULTIPLE = 3.0


class Field(NamedTuple):
    """One setting: where it may be given and how it is checked."""

    name: str
    key: str  # key in config files; dotted for nested objects (the seed's "gpu.maxTempC")
    env: str
    option: str
    parse: Callable[[object, str], Any]
    help: str

    @property
    def bounds(self) -> Range | None:
        """The allowed range of a numeric setting (None for the others)."""
        return self.parse if isinstance(self.parse, Range) else None


FIELDS: tuple[Field, ...] = (
    Field(
        "max_run_minutes",
        "maxRunMinutes",
        "BACKPROP_MAX_RUN_MINUTES",
        "--max-run-minutes",
        MINUTES,
        "time box in minutes of running time (default 10)",
    ),
    Field(
        "max_wall_minutes",
        "maxWallMinutes",
        "BACKPROP_MAX_WALL_MINUTES",
        "--max-wall-minutes",
        Range(
            0,
            MAX_BOX_MINUTES * WALL_CAP_MULTIPLE,
            low_open=True,
            optional=True,
            note="21 days: 3x the longest box",
        ),
        f"wall-clock cap including paused time (default {fmt(WALL_CAP_MULTIPLE)}x the box)",
    ),
    Field(
        "framework",
        "framework",
        "BACKPROP_FRAMEWORK_DEFAULT",
        "--framework",
        choice(FRAMEWORK_CHOICES),
        "pytorch, tensorflow, jax, none or auto (read from the script's imports)",
    ),
    Field(
        "checkpoint_every_minutes",
        "checkpointEveryMinutes",
        "BACKPROP_CHECKPOINT_EVERY_MINUTES",
        "--checkpoint-every-minutes",
        MINUTES,
        "checkpoint interval suggested to the script (default 2)",
    ),
    Field(
        "gpu_memory_limit",
        "gpuMemoryLimit",
        "BACKPROP_GPU_MEMORY_LIMIT",
        "--gpu-memory-limit",
        parse_gpu_memory_limit,
        'GPU memory limit: "80%" of the GPU or a size in GB',
    ),
    Field(
        "max_parallel",
        "maxParallel",
        "BACKPROP_MAX_PARALLEL",
        "--max-parallel",
        Range(1, 1024, whole=True),
        "most runs live at once on this machine (default 2)",
    ),
    Field(
        "min_free_ram_gb",
        "minFreeRamGB",
        "BACKPROP_MIN_FREE_RAM_GB",
        "--min-free-ram",
        Range(0, 65536, note="64 TB"),
        "free RAM needed to start, GB (default 4)",
    ),
    Field(
        "max_cpu_percent",
        "maxCpuPercent",
        "BACKPROP_MAX_CPU_PERCENT",
        "--max-cpu-percent",
        Range(1, 100, note="a percentage"),
        "highest machine CPU load to start or keep running, percent (default 90)",
    ),
    Field(
        "gpu_probe",
        "gpu.probe",
        "BACKPROP_GPU_PROBE",
        "--gpu-probe",
        choice(PROBE_CHOICES),
        "GPU probe: auto, nvml, nvidia-smi, rocm (AMD, rocm-smi), none or static",
    ),
    Field(
        "gpu_min_free_vram_mb",
        "gpu.minFreeVramMB",
        "BACKPROP_GPU_MIN_VRAM_MB",
        "--gpu-min-vram",
        Range(0, 1048576, note="1 TB"),
        "free VRAM a GPU needs, MB (default 2500)",
    ),
    Field(
        "gpu_max_temp_c",
        "gpu.maxTempC",
        "BACKPROP_GPU_MAX_TEMP_C",
        "--gpu-max-temp",
        TEMPERATURE,
        "GPU temperature limit, C (default 85)",
    ),
    Field(
        "gpu_resume_below_c",
        "gpu.resumeBelowC",
        "BACKPROP_GPU_RESUME_BELOW_C",
        "--gpu-resume-below",
        Range(0, 150),
        "a paused run resumes this many degrees below the limit (default 5)",
    ),
    Field(
        "gpus",
        "gpu.devices",
        "BACKPROP_GPUS",
        "--gpus",
        parse_gpu_list,
        "GPUs the run may use: indices or UUIDs (default all)",
    ),
    Field(
        "use_gpu",
        "gpu.enabled",
        "BACKPROP_USE_GPU",
        "--no-gpu",
        parse_flag,
        "false runs on CPU only and skips GPU rules (default true)",
    ),
    Field(
        "grace_seconds",
        "graceSeconds",
        "BACKPROP_GRACE_SECONDS",
        "--grace-seconds",
        Range(0, 3600, note="1 hour"),
        "seconds between the stop signal and SIGTERM (default 30)",
    ),
    Field(
        "stop_signal",
        "stopSignal",
        "BACKPROP_STOP_SIGNAL_DEFAULT",
        "--stop-signal",
        parse_stop_signal,
        f"first signal at the deadline: {', '.join(STOP_SIGNALS)} (default SIGINT)",
    ),
    Field(
        "queue",
        "queue",
        "BACKPROP_QUEUE",
        "--no-queue",
        parse_flag,
        "wait in the queue when the machine is busy (default true)",
    ),
    Field(
        "queue_timeout_minutes",
        "queueTimeoutMinutes",
        "BACKPROP_QUEUE_TIMEOUT_MINUTES",
        "--queue-timeout",
        MINUTES,
        "longest wait in the queue, minutes (default 60)",
    ),
    Field(
        "argv_compat",
        "argvCompat",
        "BACKPROP_ARGV_COMPAT",
        "--argv-compat",
        parse_flag,
        "also pass the seed's argv flags to the script (default false)",
    ),
    Field(
        "python",
        "python",
        "BACKPROP_PYTHON",
        "--python",
        parse_python,
        "interpreter for scripts (default: active virtualenv, else backprop's own)",
    ),
    Field(
        "allowed_roots",
        "allowedRoots",
        "BACKPROP_ALLOWED_ROOTS",
        "--root",
        parse_path_list,
        "directories scripts must lie in (MCP server; os.pathsep-separated in the variable)",
    ),
    Field(
        "snapshot",
        "snapshot",
        "BACKPROP_SNAPSHOT",
        "--snapshot",
        parse_globs,
        "files to copy with the script, a glob relative to the working directory (repeatable)",
    ),
    Field(
        "snapshot_max_mb",
        "snapshotMaxMB",
        "BACKPROP_SNAPSHOT_MAX_MB",
        "--snapshot-max-mb",
        Range(0, 1024, note="1 GB"),
        "most MB copied per attempt; larger files are hashed, not copied (default 1)",
    ),
    Field(
        "backend",
        "backend",
        "BACKPROP_BACKEND",
        "--backend",
        choice(BACKEND_CHOICES),
        "where runs run: local (this machine, the default) or ray (a Ray cluster's Jobs API)",
    ),
    Field(
        "ray_address",
        "ray.address",
        "RAY_ADDRESS",
        "--ray-address",
        parse_ray_address,
        "the Ray dashboard's address for --backend ray (default http://127.0.0.1:8265)",
    ),
    Field(
        "ray_storage",
        "ray.storage",
        "BACKPROP_RAY_STORAGE",
        "--ray-storage",
        parse_text,
        "a folder every Ray node sees at the same path: runs' checkpoints (default: node-local)",
    ),
)
FIELDS_BY_NAME = {f.name: f for f in FIELDS}
FIELDS_BY_KEY = {f.key: f for f in FIELDS}


class FileKey(NamedTuple):
    """A seed key that only config files set: a default for one argument of `backprop run`."""

    name: str
    key: str
    parse: Callable[[object, str], str]
    is_path: bool  # resolved against the folder of the file that sets it
    help: str


RUN_DEFAULTS: tuple[FileKey, ...] = (
    FileKey(
        "default_script",
        "trainingScriptPath",
        parse_text,
        True,
        "the script `backprop run` starts when none is given",
    ),
    FileKey("default_run_id", "runId", parse_run_id, False, "the run id of `backprop run` without --run-id"),
    FileKey(
        "default_resume_from",
        "resumeFrom",
        parse_text,
        True,
        "the checkpoint of `backprop run` without --resume-from",
    ),
)
RUN_DEFAULTS_BY_KEY = {k.key: k for k in RUN_DEFAULTS}
# Settings that are not run options: never stored with a run, never taken from a stored run.
_NOT_OPTIONS = frozenset({"sources", *(k.name for k in RUN_DEFAULTS)})


# NamedTuples rather than dataclasses here and in the other modules on the CLI's fast paths:
# importing `dataclasses` pulls in `inspect`, ~15 ms of every `backprop status`.
class Settings(NamedTuple):
    """The effective settings of one call (immutable)."""

    max_run_minutes: float = 10.0
    max_wall_minutes: float | None = None
    framework: str = "auto"
    checkpoint_every_minutes: float = 2.0
    gpu_memory_limit: str | None = None
    max_parallel: int = 2
    min_free_ram_gb: float = 4.0
    max_cpu_percent: float = 90.0
    gpu_probe: str = "auto"
    gpu_min_free_vram_mb: float = 2500.0
    gpu_max_temp_c: float = 85.0
    gpu_resume_below_c: float = 5.0
    gpus: list[str] | None = None
    use_gpu: bool = True
    grace_seconds: float = 30.0
    stop_signal: str = "SIGINT"
    queue: bool = True
    queue_timeout_minutes: float = 60.0
    argv_compat: bool = False
    python: str | None = None
    allowed_roots: list[str] | None = None
    snapshot: list[str] | None = None
    snapshot_max_mb: float = 1.0
    backend: str = "local"
    ray_address: str | None = None
    ray_storage: str | None = None
    default_script: str | None = None
    """`trainingScriptPath` (absolute): what `backprop run` starts when no script is given."""
    default_run_id: str | None = None
    """`runId`: the run id of `backprop run` without --run-id."""
    default_resume_from: str | None = None
    """`resumeFrom` (absolute): the checkpoint of `backprop run` without --resume-from."""
    sources: tuple[str, ...] = ()
    """Config files read, lowest precedence first."""

    @property
    def wall_minutes(self) -> float:
        """The wall-clock cap in effect."""
        return self.max_wall_minutes or self.max_run_minutes * WALL_CAP_MULTIPLE

    def as_options(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (stored in the run record)."""
        return {name: getattr(self, name) for name in self._fields if name not in _NOT_OPTIONS}
