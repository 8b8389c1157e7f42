"""`StaticProbe`: a fixed machine for tests and `--dry-run`, shipped the way httpx ships MockTransport.

A static snapshot is JSON holding a (partial) `SystemSnapshot`; see `static_snapshot_from_json`
for the defaults. `make_probe` returns a `StaticProbe` reading the file named by
`BACKPROP_STATIC_PROBE` whatever probe kind was asked for, and the file is re-read on every
snapshot so a test can heat a GPU while a run is going.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from backprop_mcp.core.errors import ConfigError
from backprop_mcp.core.machine import GpuInfo, GpuProcess, SystemSnapshot
from backprop_mcp.governor.probes import now_iso, process_total, warn_once

_NUM, _INT, _STR, _BOOL, _LIST = "a number", "an integer", "a string", "true or false", "a list"
_TYPES: dict[str, tuple[type, ...]] = {
    _NUM: (int, float),
    _INT: (int,),
    _STR: (str,),
    _BOOL: (bool,),
    _LIST: (list,),
}
_SNAPSHOT_KEYS = SystemSnapshot.__required_keys__ | SystemSnapshot.__optional_keys__
_GPU_KEYS = GpuInfo.__required_keys__ | GpuInfo.__optional_keys__
_PROCESS_KEYS = GpuProcess.__required_keys__ | GpuProcess.__optional_keys__


class StaticProbe:
    """A fixed machine, from a `SystemSnapshot` or from a JSON file re-read on every call.

    If the file turns invalid while in use, `snapshot()` reports the GPU state as unknown on a
    GPU host (failing closed) rather than raising, like a real probe whose driver broke.
    """

    def __init__(self, snapshot: SystemSnapshot, *, path: Path | None = None) -> None:
        self._snapshot = snapshot
        self.path = path

    @classmethod
    def from_file(cls, path: Path) -> StaticProbe:
        """A probe reading `path`; raises ConfigError now if the file is not a valid snapshot."""
        return cls(load_static_snapshot(path), path=path)

    def _current(self) -> SystemSnapshot:
        if self.path is not None:
            return load_static_snapshot(self.path)
        snap = copy.deepcopy(self._snapshot)
        snap["taken_at"] = now_iso()
        return snap

    def snapshot(self) -> SystemSnapshot:
        try:
            return self._current()
        except ConfigError as exc:
            warn_once(exc.message)
            return SystemSnapshot(
                taken_at=now_iso(),
                cpu_percent=None,
                cpu_count=os.cpu_count() or 1,
                ram_total_gb=None,
                ram_available_gb=None,
                gpu_probe="static",
                gpus=None,
                gpu_error=exc.message,
                gpu_host=True,
            )

    def gpu_process_memory(self, pids: Collection[int]) -> float | None:
        try:
            gpus = self._current()["gpus"]
        except ConfigError:
            return None
        if gpus is None:
            return None
        return process_total([(p["pid"], p["used_memory_mb"]) for g in gpus for p in g["processes"]], pids)


def _invalid(source: str, what: str) -> ConfigError:
    return ConfigError(
        f"invalid static probe snapshot {source}: {what}",
        hint="The file holds a SystemSnapshot as JSON; every key is optional.",
    )


def _object(value: object, allowed: frozenset[str], where: str, source: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(source, f"{where.rstrip('.') or 'the top level'} must be a JSON object")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise _invalid(source, f"unknown key {where}{unknown[0]} (allowed: {', '.join(sorted(allowed))})")
    return value


def _get(obj: dict[str, Any], key: str, kind: str, default: Any, *, at: tuple[str, str]) -> Any:
    """obj[key] checked against kind; null is accepted where the default is None."""
    where, source = at
    if key not in obj:
        return default
    value = obj[key]
    if value is None and default is None:
        return None
    if not isinstance(value, _TYPES[kind]) or (isinstance(value, bool) and kind != _BOOL):
        shown = json.dumps(value)[:60]
        raise _invalid(source, f"{where}{key} must be {kind}{' or null' * (default is None)}, got {shown}")
    return float(obj[key]) if kind == _NUM else obj[key]


def _required_int(obj: dict[str, Any], key: str, where: str, source: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _invalid(source, f"{where}{key} is required and must be an integer")
    return value


def _static_gpu(raw: object, where: str, source: str) -> GpuInfo:
    obj = _object(raw, _GPU_KEYS, where, source)
    index = _required_int(obj, "index", where, source)
    at = (where, source)
    total = _get(obj, "memory_total_mb", _NUM, None, at=at)
    used = _get(obj, "memory_used_mb", _NUM, None, at=at)
    free = _get(obj, "memory_free_mb", _NUM, None, at=at)
    if "memory_free_mb" not in obj and total is not None and used is not None:
        free = total - used
    processes: list[GpuProcess] = []
    for j, item in enumerate(_get(obj, "processes", _LIST, [], at=at)):
        pwhere = f"{where}processes[{j}]."
        proc = _object(item, _PROCESS_KEYS, pwhere, source)
        processes.append(
            GpuProcess(
                pid=_required_int(proc, "pid", pwhere, source),
                used_memory_mb=_get(proc, "used_memory_mb", _NUM, None, at=(pwhere, source)),
            )
        )
    return GpuInfo(
        index=index,
        uuid=_get(obj, "uuid", _STR, f"GPU-static-{index}", at=at),
        name=_get(obj, "name", _STR, f"Static GPU {index}", at=at),
        memory_total_mb=total,
        memory_used_mb=used,
        memory_free_mb=free,
        temperature_c=_get(obj, "temperature_c", _NUM, None, at=at),
        utilization_pct=_get(obj, "utilization_pct", _NUM, None, at=at),
        processes=processes,
    )


def static_snapshot_from_json(data: object, source: str = "<data>") -> SystemSnapshot:
    """A SystemSnapshot from parsed JSON; raises ConfigError naming the bad key.

    Every key is optional. Defaults: `taken_at` now, `cpu_count` this machine's, `gpu_probe`
    "static", `gpus` [] (a machine without GPUs; null means "GPU state unknown"), `gpu_host` true
    when `gpus` is null or non-empty, everything else null (unknown). A GPU needs `index`; its
    `uuid` defaults to `GPU-static-<index>`, its free memory to total minus used. Unknown keys are
    errors, so a typo cannot silently leave a figure at its default.
    """
    obj = _object(data, _SNAPSHOT_KEYS, "", source)
    at = ("", source)
    raw_gpus = _get(obj, "gpus", _LIST, None, at=at) if "gpus" in obj else []
    gpus = (
        None if raw_gpus is None else [_static_gpu(g, f"gpus[{i}].", source) for i, g in enumerate(raw_gpus)]
    )
    for label, values in (
        ("index", [g["index"] for g in gpus or []]),
        ("uuid", [g["uuid"] for g in gpus or []]),
    ):
        if len(set(values)) != len(values):
            raise _invalid(source, f"two GPUs have the same {label}")
    return SystemSnapshot(
        taken_at=_get(obj, "taken_at", _STR, now_iso(), at=at),
        cpu_percent=_get(obj, "cpu_percent", _NUM, None, at=at),
        cpu_count=_get(obj, "cpu_count", _INT, os.cpu_count() or 1, at=at),
        ram_total_gb=_get(obj, "ram_total_gb", _NUM, None, at=at),
        ram_available_gb=_get(obj, "ram_available_gb", _NUM, None, at=at),
        gpu_probe=_get(obj, "gpu_probe", _STR, "static", at=at),
        gpus=gpus,
        gpu_error=_get(obj, "gpu_error", _STR, None, at=at),
        gpu_host=_get(obj, "gpu_host", _BOOL, gpus is None or bool(gpus), at=at),
    )


def load_static_snapshot(path: Path) -> SystemSnapshot:
    """The snapshot in a JSON file (see `static_snapshot_from_json`); raises ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the static probe snapshot {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _invalid(str(path), f"not valid JSON ({exc})") from None
    return static_snapshot_from_json(data, str(path))
