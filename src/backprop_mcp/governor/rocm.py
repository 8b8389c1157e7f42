"""Reading AMD GPUs through `rocm-smi --json` (`--gpu-probe rocm`).

Like nvidia-smi's table, rocm-smi's JSON is read all-or-nothing: a card whose figures are not
numbers raises `ProbeError` (the snapshot's `gpu_error`), because a card we cannot read is an
unknown state, which fails closed. A figure rocm-smi reports as "N/A", or does not report at all,
is None (unknown), as with nvidia-smi.
"""

from __future__ import annotations

import json
import re
from typing import Any

from backprop_mcp.core.machine import GpuInfo
from backprop_mcp.governor.nvidia import run_tool
from backprop_mcp.governor.probes import ProbeError

# rocm-smi is a Python program reading sysfs: ~0.5-2 s on a loaded machine. Past 10 s the driver
# is wedged, as for nvidia-smi, and waiting longer only delays the answer "unknown".
ROCM_SMI_TIMEOUT_SECONDS = 10.0
ROCM_SMI_QUERY = (
    "--showproductname",
    "--showuniqueid",
    "--showbus",
    "--showmeminfo",
    "vram",
    "--showtemp",
    "--showuse",
    "--json",
)
_MIB = 1024.0 * 1024.0
_CARD = re.compile(r"card(\d+)")
# The JSON starts at the first line that opens an object: some versions print warnings first.
_JSON_START = re.compile(r"^\s*\{", re.M)
_MISSING_WORDS = frozenset({"", "n/a", "na", "not supported", "unknown", "none"})
# Edge is the sensor comparable with nvidia-smi's temperature.gpu (the default 85 C limit); cards
# without one (MI300) report the junction (hotspot) instead.
_TEMPERATURE_KEYS = ("Temperature (Sensor edge) (C)", "Temperature (Sensor junction) (C)")
_NAME_KEYS = ("Device Name", "Card Series", "Card series", "Card SKU")


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _MISSING_WORDS)


def _number(card: dict[str, Any], key: str, where: str) -> float | None:
    value = card.get(key)
    if _missing(value):
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ProbeError(f'unreadable rocm-smi output: {where} "{key}" is not a number: {json.dumps(value)[:80]}')


def _uuid(card: dict[str, Any], index: int) -> str:
    unique = card.get("Unique ID")
    if isinstance(unique, str) and re.fullmatch(r"(0x)?[0-9a-fA-F]{1,16}", unique.strip()):
        digits = unique.strip().lower().removeprefix("0x")
        # The form ROCm's runtime gives a GPU's UUID, which ROCR_VISIBLE_DEVICES accepts.
        return f"GPU-{digits.zfill(16)}"
    bus = card.get("PCI Bus")
    return bus.strip() if isinstance(bus, str) and not _missing(bus) else f"card{index}"


def _name(card: dict[str, Any], index: int) -> str:
    for key in _NAME_KEYS:
        value = card.get(key)
        # Old versions put the vendor's PCI id ("0x1002") where the series goes: not a name.
        if isinstance(value, str) and not _missing(value) and not value.startswith("0x"):
            return value.strip()
    return f"AMD GPU {index}"


def parse_rocm_smi_json(text: str) -> list[GpuInfo]:
    """GPUs from `rocm-smi <ROCM_SMI_QUERY>`: one `cardN` object per GPU (N is its index); other
    top-level objects ("system") are ignored. Memory is given in bytes and becomes MiB."""
    start = _JSON_START.search(text)
    if start is None:
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")
        raise ProbeError(f"unreadable rocm-smi output: no JSON object: {first[:120]!r}")
    try:
        data, _ = json.JSONDecoder().raw_decode(text, start.start() + len(start.group()) - 1)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ProbeError(f"unreadable rocm-smi output: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ProbeError("unreadable rocm-smi output: not a JSON object")
    gpus: list[GpuInfo] = []
    for key, card in data.items():
        match = _CARD.fullmatch(key)
        if match is None:
            continue
        if not isinstance(card, dict):
            raise ProbeError(f'unreadable rocm-smi output: "{key}" is not an object')
        index = int(match.group(1))
        total_b = _number(card, "VRAM Total Memory (B)", key)
        used_b = _number(card, "VRAM Total Used Memory (B)", key)
        temperature = None
        for temp_key in _TEMPERATURE_KEYS:
            temperature = _number(card, temp_key, key)
            if temperature is not None:
                break
        total = None if total_b is None else total_b / _MIB
        used = None if used_b is None else used_b / _MIB
        gpus.append(
            GpuInfo(
                index=index,
                uuid=_uuid(card, index),
                name=_name(card, index),
                memory_total_mb=total,
                memory_used_mb=used,
                memory_free_mb=None if total is None or used is None else total - used,
                temperature_c=temperature,
                utilization_pct=_number(card, "GPU use (%)", key),
                processes=[],
            )
        )
    return sorted(gpus, key=lambda g: g["index"])


class RocmSmiGpus:
    """AMD GPUs read by running `rocm-smi` (no shell), each call bounded by `timeout` seconds."""

    name = "rocm-smi"

    def __init__(self, executable: str, *, timeout: float = ROCM_SMI_TIMEOUT_SECONDS) -> None:
        self.executable = executable
        self.timeout = timeout

    def gpus(self) -> list[GpuInfo]:
        proc, out, err = run_tool("rocm-smi", [self.executable, *ROCM_SMI_QUERY], self.timeout)
        if proc.returncode == 0:
            return parse_rocm_smi_json(out)
        # rocm-smi also exits non-zero when one asked field is not supported by a card, after
        # printing the whole table: a table that reads is used, anything else is the failure.
        try:
            gpus = parse_rocm_smi_json(out)
        except ProbeError:
            gpus = []
        if gpus:
            return gpus
        said = next((ln.strip() for ln in (out + "\n" + err).splitlines() if ln.strip()), "")
        raise ProbeError(f"rocm-smi exited with status {proc.returncode}: {said[:200]}")

    def process_memory(self) -> list[tuple[int, float | None]]:
        raise ProbeError("rocm-smi does not report GPU memory per process")
