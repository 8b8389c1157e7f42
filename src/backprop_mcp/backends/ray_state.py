"""What this store keeps about its ray runs (docs/cluster.md), shared by the backend and the
queue waiter: each run's `ray-job.json` (the attempt's job id and log token, how far the job log was
folded, the supervisor's process on its node, a stop that was asked for, the waiter of a queued
attempt), the governor's `ray-runs/` (the runs that hold a job, counted against `maxParallel`) and
`ray-queue/` (the store's FIFO queue of ray runs waiting for the cluster), and ending an attempt
here when the cluster cannot say how it ended.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.errors import StoreError
from backprop_mcp.core.files import replace_json
from backprop_mcp.core.records import ACTIVE_STATES, RunRecord, close_attempt
from backprop_mcp.core.settings import Settings
from backprop_mcp.core.store import Store
from backprop_mcp.governor.admission import Admission

STATE_FILE = "ray-job.json"
RUNS_FOLDER = "ray-runs"
QUEUE_FOLDER = "ray-queue"
# A cluster that does not answer for this long (BACKPROP_RAY_SILENT_SECONDS overrides it) has lost
# the run as far as anyone can tell: a head that restarts answers again within a minute, and a head
# that is gone took its jobs with it (Ray ends every job of a cluster whose head dies).
SILENT_SECONDS = 120.0


def settings_of(record: RunRecord) -> Settings:
    return Settings(**{k: v for k, v in record["options"].items() if k in Settings._fields})


def silent_seconds() -> float:
    try:
        value = float(os.environ.get("BACKPROP_RAY_SILENT_SECONDS", ""))
    except ValueError:
        return SILENT_SECONDS
    return value if 0 < value <= 86400 else SILENT_SECONDS


def ray_queue(store: Store, *, lock_timeout: float | None = None) -> Admission:
    """The store's queue of ray runs waiting for the cluster (FIFO tickets, as the machine's run
    queue keeps them, in a folder of its own: ray runs neither wait for this machine's runs nor
    hold them up)."""
    root = store.governor_dir / QUEUE_FOLDER
    return Admission(root) if lock_timeout is None else Admission(root, lock_timeout=lock_timeout)


def show_place(store: Store, record: RunRecord, position: int | None, reasons: list[str]) -> None:
    """Say in the record where a queued run stands and why it waits (written only on a change)."""
    ahead = f"position {position} in the ray queue" if position else "in the ray queue"
    detail = f"{ahead}: {'; '.join(reasons)}" if reasons else ahead
    if (record["status_detail"], record["queue_position"]) != (detail, position):
        record["status_detail"], record["queue_position"] = detail, position
        store.write(record, index=False)


def read_state(store: Store, run_id: str) -> dict[str, Any] | None:
    try:
        data = json.loads((store.run_dir(run_id) / STATE_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_state(store: Store, run_id: str, state: dict[str, Any]) -> None:
    replace_json(store.run_dir(run_id) / STATE_FILE, state)


def live_runs(store: Store) -> list[str]:
    """Ray runs of this store that hold a job and are not known to have ended."""
    folder = store.governor_dir / RUNS_FOLDER
    live = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        run_id = path.stem
        try:
            status = store.read(run_id)["status"]
        except Exception:  # a run removed or unreadable holds no place
            status = None
        if status in ACTIVE_STATES:
            live.append(run_id)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return live


def end_attempt(store: Store, record: RunRecord, status: str, reason: str, why: str) -> RunRecord:
    """End the run's current attempt here, with its reason (the cluster could not say it)."""
    close_attempt(record, status, reason, why, now_iso())
    record["queue_position"] = None
    # Everything else before the final record: whoever sees the run ended finds the store
    # quiescent for it (its place among the live ray runs gone, its history complete).
    (store.governor_dir / RUNS_FOLDER / f"{record['run_id']}.json").unlink(missing_ok=True)
    with contextlib.suppress(StoreError):
        store.append_event(record["run_id"], {"type": "state", "status": status, "detail": why})
    store.write(record)
    return record
