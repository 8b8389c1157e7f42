"""Figures of the CLI's read commands: `backprop status` and `backprop list` at growing store sizes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from bench_harness import BIN, PYTHON, Plan, Row, Workspace, check, median, ms, prefill, wall

from backprop_mcp.models import RunRecord
from backprop_mcp.store import Store

STATUS_RATIO_TARGET = 2.0
LIST_FLAT_TARGET = 1.5
# The seed measured `list` at 20 runs; measured too so the comparison is like for like.
SEED_LIST_SIZE = 20


@dataclass
class Commands:
    status: float
    status_cold: float
    lists: dict[int, float] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)


def fill_stores(ws: Workspace, template: RunRecord, sizes: tuple[int, ...]) -> None:
    for size in sizes:
        prefill(Store(ws.root / f"list-{size}"), template, size)


def measure_commands(ws: Workspace, plan: Plan, template: RunRecord) -> Commands:
    backprop = str(BIN / "backprop")
    sizes = (SEED_LIST_SIZE, *plan.list_sizes)
    fill_stores(ws, template, sizes)
    reps = max(plan.runs, 5)
    psutil_floor = median([wall([PYTHON, "-c", "import psutil"], ws.base_env(), ws.work) for _ in range(reps)])
    version = median([wall([backprop, "--version"], ws.base_env(), ws.work) for _ in range(reps)])
    env = ws.env(f"list-{plan.list_sizes[0]}")
    # The first call after a minute has no cached CPU sample and samples for 0.1 s; later ones reuse it.
    cold = wall([backprop, "status"], env, ws.work)
    status = median([wall([backprop, "status"], env, ws.work) for _ in range(reps)])
    result = Commands(status=status, status_cold=cold)
    for size in sizes:
        env = ws.env(f"list-{size}")
        wall([backprop, "list"], env, ws.work)  # page cache warm, as for a user listing twice
        result.lists[size] = median([wall([backprop, "list"], env, ws.work) for _ in range(reps)])
    ratio = status / psutil_floor
    result.rows.append(Row("`backprop status` wall time", f"`python -c \"import psutil\"` {ms(psutil_floor)}",
                           ms(status), f"<= {STATUS_RATIO_TARGET:g}x floor", f"{ratio:.2f}x",
                           check(ratio <= STATUS_RATIO_TARGET),
                           f"first call without a cached CPU sample: {ms(cold)}"))
    small, *larger = plan.list_sizes
    base = result.lists[small]
    result.rows.append(Row(f"`backprop list` wall, {small:,} past runs", f"`backprop --version` {ms(version)}",
                           ms(base), "-", f"{base / version:.2f}x floor", "info"))
    for size in larger:
        flat = result.lists[size] / base
        last = size == larger[-1]
        result.rows.append(Row(f"`backprop list` wall, {size:,} past runs", f"{small:,} runs {ms(base)}",
                               ms(result.lists[size]), f"<= {LIST_FLAT_TARGET:g}x {small:,} runs" if last else "-",
                               f"{flat:.2f}x", check(flat <= LIST_FLAT_TARGET) if last else "info",
                               f"{result.lists[size] / version:.2f}x `--version`"))
    return result
