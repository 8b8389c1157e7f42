"""wait_for_run over one run or several: poll their records until the condition asked for holds
(a state change, one ended, all ended) or the timeout passes, with progress notifications
meanwhile, and answer with their summaries and one next step."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal

import anyio

from backprop_mcp.core.errors import RunNotFound
from backprop_mcp.core.records import ACTIVE_STATES, RunRecord
from backprop_mcp.mcp_server.summary import counts, next_step, summaries
from backprop_mcp.runs.compare import not_found

Until = Literal["change", "end", "all", "any"]
Report = Callable[[float, float | None, str | None], Awaitable[None]]
Reader = Callable[[str], Awaitable[RunRecord]]

# A progress notification goes out at least this often (and at every new step), so that clients
# see the call is alive and do not time it out.
PROGRESS_EVERY_SECONDS = 5.0
# A progress message about several runs names at most this many of the live ones.
PROGRESS_RUNS = 3


def settled(records: Sequence[RunRecord], until: Until, moved: Callable[[RunRecord], bool]) -> bool:
    """True when the wait is over: "end"/"all" every run ended, "any" one has, "change" one moved
    from the state the caller last saw (or nothing can change any more)."""
    ended = [r["status"] not in ACTIVE_STATES for r in records]
    if until == "any":
        return any(ended)
    if until == "change":
        return all(ended) or any(moved(r) for r in records)
    return all(ended)


def progress(records: Sequence[RunRecord]) -> str:
    """One line about the runs for a progress notification."""
    if len(records) == 1:
        return _one(records[0])
    live = [r for r in records if r["status"] in ACTIVE_STATES]
    done = len(records) - len(live)
    return f"{done}/{len(records)} ended" + "".join(f"; {_one(r)}" for r in live[:PROGRESS_RUNS])


def _one(record: RunRecord) -> str:
    parts = [f"{record['run_id']}: {record['status']}"]
    if record["step"] is not None:
        parts.append(f"step {record['step']}" + (f"/{record['total']}" if record["total"] else ""))
    if record["loss"] is not None:
        parts.append(f"loss {record['loss']:.4g}")
    return ", ".join(parts)


async def wait(
    read: Reader,
    run_ids: Sequence[str],
    *,
    timeout: float,
    until: Until,
    since: str | None,
    report: Report,
    poll_seconds: float,
) -> dict[str, Any]:
    """Poll the runs until `settled` or the timeout, and answer with their summaries."""
    started = time.monotonic()
    records, missing = [], []
    for run_id in run_ids:
        try:
            records.append(await read(run_id))
        except RunNotFound:
            missing.append(run_id)
    if missing:
        raise not_found(missing)  # every one at once: the agent fixes its list in one call
    baseline = {r["run_id"]: (since or r["status"], r["attempt"]) for r in records}

    def moved(record: RunRecord) -> bool:
        return (record["status"], record["attempt"]) != baseline[record["run_id"]]

    reported, last_steps = -PROGRESS_EVERY_SECONDS, None
    with anyio.move_on_after(timeout):
        while not settled(records, until, moved):
            waited = time.monotonic() - started
            steps = [r["step"] for r in records]
            if steps != last_steps or waited - reported >= PROGRESS_EVERY_SECONDS:
                await report(round(waited, 2), float(timeout), progress(records))
                reported, last_steps = waited, steps
            await anyio.sleep(poll_seconds)
            records = [await read(run_id) for run_id in run_ids]
    return answer(records, moved, waited=time.monotonic() - started)


def answer(
    records: Sequence[RunRecord], moved: Callable[[RunRecord], bool], *, waited: float
) -> dict[str, Any]:
    rows = summaries(records)
    ended = sum(r["status"] not in ACTIVE_STATES for r in records)
    return {
        "runs": rows,
        "changed": any(moved(r) for r in records),
        "ended": ended == len(records),
        "waited_s": round(waited, 1),
        "next_step": advice(records, rows, ended),
    }


def advice(records: Sequence[RunRecord], rows: Sequence[Mapping[str, Any]], ended: int) -> str:
    """The next step after a wait: the run's own for one run, else one for the lot."""
    if len(records) == 1:
        return next_step(records[0])
    if ended < len(records):
        return (
            f"{ended} of {len(records)} ended ({counts(rows)}); wait_for_run with the same run_id list "
            'and until="end" waits for the rest.'
        )
    return (
        f"All {len(records)} ended ({counts(rows)}). Rank them with compare_runs(run_ids=...) or "
        'list_experiments(sort="loss"); resume_run the best to train it longer (new args or '
        "max_run_minutes)."
    )
