"""Figures of the CLI's read commands: `backprop status` and `backprop list` at growing store sizes."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench_harness import BIN, PYTHON, Plan, Row, Workspace, check, median, ms, wall

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


def measure_commands(ws: Workspace, plan: Plan) -> Commands:
    backprop = str(BIN / "backprop")
    sizes = (SEED_LIST_SIZE, *plan.list_sizes)
    reps = max(plan.runs, 5)
    envs = {size: ws.env(ws.past_runs(size)) for size in sizes}
    status_env = envs[plan.list_sizes[0]]
    plain_env = ws.base_env()
    # The first call after a minute has no cached CPU sample and samples for 0.1 s; later ones reuse it.
    cold = wall([backprop, "status"], status_env, ws.work)
    for env in envs.values():
        wall([backprop, "list"], env, ws.work)  # page cache warm, as for a user listing twice
    samples: dict[str, list[float]] = {}
    for _ in range(reps):  # round robin: floors and figures see the same load
        samples.setdefault("psutil", []).append(wall([PYTHON, "-c", "import psutil"], plain_env, ws.work))
        samples.setdefault("version", []).append(wall([backprop, "--version"], plain_env, ws.work))
        samples.setdefault("status", []).append(wall([backprop, "status"], status_env, ws.work))
        for size, env in envs.items():
            samples.setdefault(f"list {size}", []).append(wall([backprop, "list"], env, ws.work))
    psutil_floor, version, status = (median(samples[k]) for k in ("psutil", "version", "status"))
    result = Commands(status=status, status_cold=cold)
    for size in sizes:
        result.lists[size] = median(samples[f"list {size}"])
    ratio = status / psutil_floor
    result.rows.append(
        Row(
            "`backprop status` wall time",
            f'`python -c "import psutil"` {ms(psutil_floor)}',
            ms(status),
            f"<= {STATUS_RATIO_TARGET:g}x floor",
            f"{ratio:.2f}x",
            check(ratio <= STATUS_RATIO_TARGET),
            f"first call without a cached CPU sample: {ms(cold)}",
        )
    )
    small, *larger = plan.list_sizes
    base = result.lists[small]
    result.rows.append(
        Row(
            f"`backprop list` wall, {small:,} past runs",
            f"`backprop --version` {ms(version)}",
            ms(base),
            "-",
            f"{base / version:.2f}x floor",
            "info",
        )
    )
    for size in larger:
        flat = result.lists[size] / base
        last = size == larger[-1]
        result.rows.append(
            Row(
                f"`backprop list` wall, {size:,} past runs",
                f"{small:,} runs {ms(base)}",
                ms(result.lists[size]),
                f"<= {LIST_FLAT_TARGET:g}x {small:,} runs" if last else "-",
                f"{flat:.2f}x",
                check(flat <= LIST_FLAT_TARGET) if last else "info",
                f"{result.lists[size] / version:.2f}x `--version`",
            )
        )
    return result
