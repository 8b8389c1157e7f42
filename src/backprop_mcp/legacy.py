"""Import of the seed's experiment store (`~/.backprop/experiments.json`) into ours."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backprop_mcp.errors import UsageError
from backprop_mcp.models import AttemptSummary, Checkpoint, RunRecord, new_record, row_of
from backprop_mcp.store import RUN_ID_RE, now_iso

if TYPE_CHECKING:
    from backprop_mcp.service import Service

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


def _ms(value: Any) -> str | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return now_iso(value / 1000)
    return None


def import_experiments(service: Service, source: Path) -> ImportReportT:
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
        label = f"entry {position}" + (f" ({run_id})" if isinstance(run_id, str) else "")
        if (
            not isinstance(entry, dict)
            or not isinstance(run_id, str)
            or not RUN_ID_RE.match(run_id)
            or ".." in run_id
        ):
            skipped.append(f"{label}: no valid id (letters, digits, '-', '_', '.')")
            continue
        if service.store.exists(run_id):
            skipped.append(f"{label}: a run with this id already exists")
            continue
        record = _record(entry, run_id)
        try:
            service.store.create(record)
        except UsageError as exc:
            skipped.append(f"{label}: {exc.message}")
            continue
        service.store.index_append(row_of(record), new=True)
        service.store.append_event(run_id, {"type": "imported", "source": str(source)})
        imported.append(run_id)
    from backprop_mcp.models import ImportReport

    return ImportReport(source=str(source), imported=imported, skipped=skipped)


def _record(entry: dict[str, Any], run_id: str) -> RunRecord:
    raw_script = entry.get("scriptPath")
    script = raw_script if isinstance(raw_script, str) else ""
    status = _STATUS.get(str(entry.get("status")), "failed")
    step = entry.get("lastStep") if isinstance(entry.get("lastStep"), int) else None
    loss_raw = entry.get("lastLoss")
    loss = float(loss_raw) if isinstance(loss_raw, int | float) and not isinstance(loss_raw, bool) else None
    started, ended = _ms(entry.get("startTime")), _ms(entry.get("endTime"))
    created = started or now_iso()
    paths = [p for p in entry.get("checkpoints") or [] if isinstance(p, str) and p]
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
    name = entry.get("name") if isinstance(entry.get("name"), str) else None
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
    from backprop_mcp.models import ImportReport as ImportReportT
