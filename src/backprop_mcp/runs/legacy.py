"""Import of the seed's experiment store (`~/.backprop/experiments.json`) into ours.

Each entry is imported whole or not at all: its values are checked before anything is written,
and an entry whose writing fails is removed again; skipped entries are reported with the reason.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.errors import StoreError, UsageError
from backprop_mcp.core.ids import valid_run_id
from backprop_mcp.core.records import AttemptSummary, Checkpoint, RunRecord, new_record, row_of
from backprop_mcp.core.store import Store
from backprop_mcp.core.stored import Invalid, check_record

# The seed recorded these states; a run it left "running" has no supervisor any more.
_STATUS = {
    "completed": "completed",
    "failed": "failed",
    "running": "lost",
    "queued": "lost",
    "stopped": "stopped",
    "timed_out": "timed_out",
    "killed": "stopped",
}


# The seed's times are milliseconds since 1970; past the year 9999 a time cannot be written in ISO
# 8601, so a larger value is damage, not a time.
_MAX_MS = 253_402_300_799_999
# The seed's steps are counts; the store keeps integers below this (as events do).
_MAX_STEP = 2**63


class _Skip(ValueError):
    """Why one entry is not imported."""


def _number(entry: dict[str, Any], key: str) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isfinite(number):
            return number
    raise _Skip(f"{key} must be a finite number or null, got {_shown(value)}")


def _ms(entry: dict[str, Any], key: str) -> str | None:
    value = _number(entry, key)
    if value is None:
        return None
    if not 0 <= value <= _MAX_MS:
        raise _Skip(f"{key} must be a time in milliseconds since 1970 (up to the year 9999), got {value:g}")
    return now_iso(value / 1000) if value > 0 else None


def _text(entry: dict[str, Any], key: str, limit: int) -> str | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit or "\0" in value:
        raise _Skip(f"{key} must be a string of at most {limit} characters without NUL, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def import_experiments(store: Store, source: Path) -> ImportReportT:
    """Bring every valid experiment of the seed's file into the store; skip what is not valid."""
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"no legacy store at {source}; pass the path of the seed's experiments.json"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {source}: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"{source} is not valid JSON ({exc}); nothing was imported") from None
    entries = data.get("experiments", data) if isinstance(data, dict) else data
    if isinstance(entries, dict):
        entries = list(entries.values())
    if not isinstance(entries, list):
        raise UsageError(f'{source}: expected a list of experiments (or {{"experiments": [...]}})')
    imported: list[str] = []
    skipped: list[str] = []
    for position, entry in enumerate(entries):
        run_id = entry.get("id") if isinstance(entry, dict) else None
        # The id is shown as repr: it may be anything, a newline or an escape code included.
        label = f"entry {position}" + (f" ({_shown(run_id)})" if isinstance(run_id, str) else "")
        if not isinstance(entry, dict) or not valid_run_id(run_id):
            skipped.append(f"{label}: no valid id (1-128 letters, digits, '-', '_', '.')")
            continue
        if store.record_path(run_id).parent.exists():
            skipped.append(f"{label}: a run with this id already exists")
            continue
        try:
            record = check_record(_record(entry, run_id))
        except (_Skip, Invalid) as exc:
            skipped.append(f"{label}: {exc}; nothing of it was imported")
            continue
        try:
            _store(store, record, source)
        except (UsageError, StoreError) as exc:  # the id taken meanwhile, a full disk
            skipped.append(f"{label}: {exc.message}")
            continue
        imported.append(run_id)
    from backprop_mcp.core.answers import ImportReport

    return ImportReport(source=str(source), imported=imported, skipped=skipped)


def _store(store: Store, record: RunRecord, source: Path) -> None:
    """Create the run, its history and its index row, or nothing: a failure removes the run."""
    run_id = record["run_id"]
    store.create(record)
    try:
        store.append_event(run_id, {"type": "imported", "source": str(source)})
        store.index_append(row_of(record), new=True)  # last: once indexed, the run is whole
    except BaseException:
        shutil.rmtree(store.run_dir(run_id), ignore_errors=True)
        raise


def _record(entry: dict[str, Any], run_id: str) -> RunRecord:
    script = _text(entry, "scriptPath", 4096) or ""
    status = _STATUS.get(str(entry.get("status")), "failed")
    step_raw = entry.get("lastStep")
    if step_raw is not None and not (
        isinstance(step_raw, int) and not isinstance(step_raw, bool) and 0 <= step_raw < _MAX_STEP
    ):
        raise _Skip(f"lastStep must be a whole number from 0 below 2**63 or null, got {_shown(step_raw)}")
    step = step_raw
    loss = _number(entry, "lastLoss")
    started, ended = _ms(entry, "startTime"), _ms(entry, "endTime")
    created = started or now_iso()
    raw_paths = entry.get("checkpoints")
    if raw_paths is not None and not isinstance(raw_paths, list):
        raise _Skip(f"checkpoints must be a list of paths, got {_shown(raw_paths)}")
    paths = [p for p in raw_paths or [] if isinstance(p, str) and p and "\0" not in p]
    checkpoints = [Checkpoint(path=os.path.abspath(p), step=None, attempt=1, saved_at=created) for p in paths]
    attempt = AttemptSummary(
        attempt=1,
        status=status,
        started_at=started,
        ended_at=ended,
        termination_reason="supervisor_lost" if status == "lost" else None,
        exit_code=None,
        signal=None,
        step=step,
        loss=loss,
        resume_from=None,
    )
    name = _text(entry, "name", 200)
    return new_record(
        run_id=run_id,
        script=script,
        created_at=created,
        name=name,
        status=status,
        status_detail="imported from the seed's experiments.json",
        python="python3",
        python_source="imported",
        cwd=os.path.dirname(script) or os.getcwd(),
        started_at=started,
        ended_at=ended,
        step=step,
        loss=loss,
        checkpoints=checkpoints,
        latest_checkpoint=checkpoints[-1]["path"] if checkpoints else None,
        termination_reason=attempt["termination_reason"],
        attempts=[attempt],
        updated_at=now_iso(),
    )


if TYPE_CHECKING:
    from backprop_mcp.core.answers import ImportReport as ImportReportT
