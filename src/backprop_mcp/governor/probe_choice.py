"""Which probe a `gpu_probe` setting names: `make_probe` builds it, importing the GPU readers
(`nvidia`, `rocm`) and the static probe only when they are the ones asked for.

Setting `BACKPROP_STATIC_PROBE=/path/to/snapshot.json` makes `make_probe` return a `StaticProbe`
reading that file on every snapshot, whatever probe kind was asked for.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from backprop_mcp.core.errors import ConfigError
from backprop_mcp.governor.probes import (
    CachedCpu,
    CpuSampler,
    CpuSource,
    GpuSource,
    HostProbe,
    ProbeError,
    SystemProbe,
    looks_like_amd_gpu_host,
    looks_like_gpu_host,
)

ENV_STATIC_PROBE = "BACKPROP_STATIC_PROBE"
PROBE_KINDS = ("auto", "nvml", "nvidia-smi", "rocm", "none", "static")


def make_probe(
    kind: str,
    *,
    cpu_cache: Path | None,
    static_path: Path | None = None,
    nvidia_smi_timeout: float | None = None,
    rocm_smi_timeout: float | None = None,
) -> SystemProbe:
    """The probe for `kind`: auto, nvml, nvidia-smi, rocm, none or static.

    `cpu_cache` is the CPU sample cache file for short-lived commands; None gives a live
    `CpuSampler` (for the supervisor). `static` reads `BACKPROP_STATIC_PROBE`, else `static_path`;
    the variable, when set, selects the static probe whatever `kind` says. `auto` is NVML if it
    imports and initialises, else nvidia-smi if on PATH, else no GPU probe on a machine without
    NVIDIA GPUs and "GPU state unknown" on one with them. `nvidia_smi_timeout` shrinks
    `NVIDIA_SMI_TIMEOUT_SECONDS` and `rocm_smi_timeout` `ROCM_SMI_TIMEOUT_SECONDS` (for tests).
    `rocm` reads AMD GPUs with rocm-smi; `auto` never does (the GPU a run is pinned to is given in
    NVIDIA's variables unless the probe is `rocm`). Raises ConfigError for an unknown kind or an
    invalid static snapshot file.
    """
    if kind not in PROBE_KINDS:
        raise ConfigError(f"unknown GPU probe {kind!r}; allowed: {', '.join(PROBE_KINDS)}")
    env_static = os.environ.get(ENV_STATIC_PROBE)
    if kind == "static" or env_static:
        from backprop_mcp.governor.static_probe import StaticProbe

        path = Path(env_static) if env_static else static_path
        if path is None:
            raise ConfigError(
                f"the static probe needs a snapshot file: set {ENV_STATIC_PROBE}=/path/to/it.json"
            )
        return StaticProbe.from_file(path)

    from backprop_mcp.governor import nvidia

    timeout = nvidia.NVIDIA_SMI_TIMEOUT_SECONDS if nvidia_smi_timeout is None else nvidia_smi_timeout
    cpu: CpuSource = CachedCpu(cpu_cache) if cpu_cache is not None else CpuSampler()
    smi = shutil.which("nvidia-smi")
    gpu_host = looks_like_gpu_host(smi)
    gpu: GpuSource | None = None
    if kind == "rocm":
        from backprop_mcp.governor import rocm

        rocm_smi = shutil.which("rocm-smi")
        wait = rocm.ROCM_SMI_TIMEOUT_SECONDS if rocm_smi_timeout is None else rocm_smi_timeout
        gpu = rocm.RocmSmiGpus(rocm_smi, timeout=wait) if rocm_smi else None
        gpu = gpu or nvidia.UnavailableGpus("rocm-smi", "rocm-smi not found on PATH")
        gpu_host = gpu_host or looks_like_amd_gpu_host(rocm_smi)
    elif kind == "nvml":
        gpu = nvidia.NvmlGpus()
    elif kind == "nvidia-smi":
        gpu = nvidia.NvidiaSmiGpus(smi, timeout=timeout) if smi else None
        gpu = gpu or nvidia.UnavailableGpus("nvidia-smi", "nvidia-smi not found on PATH")
    elif kind == "auto" and (gpu_host or smi):
        # On a machine with no sign of an NVIDIA GPU, `auto` skips NVML: importing and
        # initialising it costs tens of milliseconds on every `backprop status` for nothing.
        try:
            nvidia.nvml_loader.get()
            gpu = nvidia.NvmlGpus()
        except ProbeError as exc:
            if smi:
                gpu = nvidia.NvidiaSmiGpus(smi, timeout=timeout)
            elif gpu_host:
                gpu = nvidia.UnavailableGpus("auto", f"no GPU probe works ({exc}; no nvidia-smi on PATH)")
    return HostProbe(gpu, cpu=cpu, gpu_host=gpu_host)
