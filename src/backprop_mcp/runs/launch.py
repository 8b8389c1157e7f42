"""How a run's script is started: interpreter choice, the argv and the contract environment (the
framework is detected by `runs.detect`); and the handshake by which a new supervisor waits for
its starter's go (the starter's side belongs to the backend: `backends.local.spawn_supervisor`)."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from backprop_mcp.core import contract
from backprop_mcp.core.machine import GpuInfo, Limits
from backprop_mcp.core.records import RunRecord
from backprop_mcp.core.settings import Settings

# JAX's variables for the share of the GPU it preallocates: the old name, which every JAX reads,
# and the newer one that replaces it in recent JAX releases.
XLA_MEM_FRACTION_VARIABLES = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION")


def choose_python(option: str | None, settings: Settings, env: Mapping[str, str]) -> tuple[str, str]:
    """(interpreter, how it was chosen): --python, else config, else an active virtualenv's
    python, else the python running backprop."""
    if option:
        return option, "option"
    if settings.python:
        return settings.python, "config"
    venv = env.get("VIRTUAL_ENV")
    if venv:
        candidate = Path(venv) / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
        if candidate.exists():
            return str(candidate), "virtualenv"
    return sys.executable, "current"


def limits_of(settings: Settings) -> Limits:
    """The governor's limits from the settings."""
    return Limits(
        min_free_ram_gb=settings.min_free_ram_gb,
        max_cpu_percent=settings.max_cpu_percent,
        max_parallel=settings.max_parallel,
        gpu_min_free_vram_mb=settings.gpu_min_free_vram_mb,
        gpu_max_temp_c=settings.gpu_max_temp_c,
        gpu_resume_below_c=settings.gpu_resume_below_c,
        use_gpu=settings.use_gpu,
        gpus=settings.gpus,
    )


def gpu_memory_limit_mb(limit: str | None, gpu: GpuInfo | None) -> float | None:
    """The limit in MiB: a share of the chosen GPU's memory, or GB given directly."""
    if not limit:
        return None
    if limit.endswith("%"):
        total = gpu["memory_total_mb"] if gpu else None
        return float(limit[:-1]) / 100 * total if total else None
    return float(limit) * 1024


def command(record: RunRecord) -> list[str]:
    """The exact argv of the script: never through a shell, extra args passed unchanged."""
    argv = [record["python"], record["script"], *record["args"]]
    options = record["options"]
    if options.get("argv_compat"):
        argv += ["--run-id", record["run_id"], "--max-minutes", f"{record['max_run_minutes']:g}"]
        argv += ["--checkpoint-every-seconds", f"{options['checkpoint_every_minutes'] * 60:g}"]
        if record["resume_from"]:
            argv += ["--resume-from", record["resume_from"]]
        argv += ["--framework", record["framework"]]
    return argv


def contract_env(record: RunRecord, run_dir: Path, deadline: float | None) -> dict[str, str]:
    """The contract variables a script receives (DESIGN §4)."""
    options = record["options"]
    env = {
        contract.ENV_RUN_ID: record["run_id"],
        contract.ENV_RUN_DIR: str(run_dir),
        contract.ENV_CHECKPOINT_DIR: str(run_dir / "checkpoints"),
        contract.ENV_ATTEMPT: str(record["attempt"]),
        contract.ENV_CHECKPOINT_EVERY_SECONDS: f"{options['checkpoint_every_minutes'] * 60:g}",
        contract.ENV_FRAMEWORK: record["framework"],
        contract.ENV_STOP_SIGNAL: options["stop_signal"],
        "PYTHONUNBUFFERED": "1",
    }
    if deadline is not None:
        env[contract.ENV_DEADLINE] = f"{deadline:.3f}"
    if record["resume_from"]:
        env[contract.ENV_RESUME_FROM] = record["resume_from"]
    if "sweep" in record:
        env[contract.ENV_SWEEP_ID] = record["sweep"]["id"]
        env[contract.ENV_PARAMS] = json.dumps(record["sweep"]["params"], separators=(",", ":"))
    rerun = record.get("rerun_of")
    if rerun is not None and rerun["script"] != record["script"]:
        # A rerun of a script that changed since runs its stored copy, from the run's folder: the
        # original's folder goes on the path so its sibling modules still import (those that were
        # snapshotted lie beside the copy, first on the path, and win).
        inherited = os.environ.get("PYTHONPATH", "")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(rerun["script"]).parent), inherited) if p)
    gpu = record["gpu"]
    if gpu is not None and options.get("gpu_probe") == "rocm":
        # AMD: ROCr exposes only the chosen GPU (by the UUID rocm-smi gave, else by index); HIP's
        # and CUDA's indices count within what ROCr exposes, so 0 is that GPU. Both are set, and
        # equal, because an inherited one would apply on top and PyTorch refuses the two differing.
        env["ROCR_VISIBLE_DEVICES"] = gpu["uuid"] if gpu["uuid"].startswith("GPU-") else str(gpu["index"])
        env["HIP_VISIBLE_DEVICES"] = env["CUDA_VISIBLE_DEVICES"] = "0"
    elif gpu is not None:
        # By UUID, in PCI order: indices differ between nvidia-smi and CUDA's default ordering.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = gpu["uuid"]
    elif not options.get("use_gpu", True):
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU-only run must not touch any GPU
    limit = options.get("gpu_memory_limit")
    limit_mb = gpu_memory_limit_mb(limit, gpu)
    if limit_mb:
        env[contract.ENV_GPU_MEMORY_LIMIT_MB] = str(int(limit_mb))
    fraction = gpu_memory_fraction(limit, gpu)
    if fraction is not None:
        env[contract.ENV_GPU_MEMORY_FRACTION] = f"{fraction:.4f}"
        if record["framework"] == "jax":
            # JAX preallocates 75% of the GPU when its backend starts, before the script could
            # limit it, unless told otherwise here; newer JAX reads the second name.
            for name in XLA_MEM_FRACTION_VARIABLES:
                env[name] = f"{fraction:.4f}"
    return env


def gpu_memory_fraction(limit: str | None, gpu: GpuInfo | None) -> float | None:
    """The limit as a share (0 to 1] of the GPU: a percentage as given (the GPU need not be
    known), or GB over the chosen GPU's total memory; None when neither can be had."""
    if not limit:
        return None
    if limit.endswith("%"):
        return min(float(limit[:-1]) / 100, 1.0)
    total = gpu["memory_total_mb"] if gpu else None
    return min(float(limit) * 1024 / total, 1.0) if total else None


# Held (blocked) in a new supervisor from its first instruction until its handlers exist: a stop
# sent at once after starting a run stays pending instead of killing the half-started supervisor,
# and is handled the moment the supervisor unblocks them. A blocked mask survives fork and exec.
HELD_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP})
# The flag that makes a supervisor wait for its starter's go (see `backends.local.spawn_supervisor`).
AWAIT_GO_FLAG = "--await-go"
# What the starter writes on the supervisor's stdin once the start is complete.
GO = b"go"
