"""The MCP server's own output shapes (a run with its log tail and next step; the result of a
wait), the advice each run state gives an agent, and the rendering of errors as text a model can
act on. Everything else the tools return is a shape from `core`."""

from __future__ import annotations

import time
from calendar import timegm
from typing import Any

from typing_extensions import TypedDict

from backprop_mcp.core.errors import BackpropError, RunNotFound
from backprop_mcp.core.records import ACTIVE_STATES, RunRecord

# How many log lines get_status shows; get_logs gives more.
STATUS_LOG_LINES = 10
# Pydantic errors listed in one reply; the rest are counted.
MAX_LISTED_ERRORS = 10

INSTRUCTIONS = """\
backprop runs Python training scripts on this machine safely: each run is admitted by a resource \
governor (RAM, CPU, GPU memory and temperature), time-boxed (10 minutes by default), stopped \
gracefully so the script can checkpoint, and resumable from its last checkpoint.

The pattern:
1. run_training(script=...) starts a run and returns its record at once (status queued or running). \
Use dry_run=true first to see the exact command and whether the governor would admit it now.
2. Follow it with wait_for_run(run_id, since=<the status you saw>) (returns when its state changes \
or, with until="end", when it ends, up to timeout_seconds) or poll get_status(run_id) (record, \
log tail, time left, and the next step).
3. A run that timed_out (or was stopped or lost) continues from its latest checkpoint with \
resume_run(run_id); use from_scratch=true when it saved none.
4. list_experiments browses runs newest first; compare_runs ranks runs by a metric; get_logs shows \
output; stop_run ends a run early.

Keep runs short (a few minutes, max_run_minutes) and resume them, rather than starting long ones: \
sweeps of many short runs are the intended use. Scripts must lie inside the allowed roots. Training \
scripts report progress by printing JSON lines such as {"step": 3, "total": 10, "loss": 0.5} and \
{"event": "checkpoint_saved", "path": "ck.pt", "step": 3}; they read BACKPROP_RESUME_FROM to resume.
"""

NEXT_STEP = {
    "queued": "It waits for the governor to admit it (status_detail says why, queue_position where). "
    "Call wait_for_run(run_id, since='queued') to wait until it starts, or get_status() to see the "
    "machine.",
    "running": "Call wait_for_run(run_id, until='end') to wait for it to end, or get_status(run_id) later; "
    "stop_run(run_id) stops it early (it may checkpoint first).",
    "paused": "The governor paused it (status_detail says why); paused time is not charged to its time "
    "box. Call wait_for_run(run_id, since='paused') to see it resume or end.",
    "completed": "It finished. Compare it with others using compare_runs, read its output with "
    "get_logs, or continue training from its last checkpoint with resume_run(run_id).",
    "timed_out": "Its time box ended and it was stopped gracefully. Continue from its latest checkpoint "
    "with resume_run(run_id) (from_scratch=true if it saved none).",
    "stopped": "It was stopped on request. Continue from its latest checkpoint with resume_run(run_id).",
    "failed": "The script failed (see termination_reason and exit_code). Read get_logs(run_id) to find "
    "why, fix the script, then resume_run(run_id) or start again with run_training.",
    "lost": "Its supervisor died (a reboot or a kill). Continue from its latest checkpoint with "
    "resume_run(run_id).",
    "rejected": "The governor refused it and it was not queued (status_detail lists every failed rule). "
    "Call get_status() to see the machine, then retry with queue=true or lower limits.",
}


class RunStatus(TypedDict):
    """A run now: its record, the end of its log, the time left in its box, and what to do next."""

    run: RunRecord
    """The run's full record."""
    log_tail: list[str]
    """The last lines of the current attempt's log (get_logs gives more)."""
    time_left_seconds: float | None
    """Seconds left in the current attempt's time box while it is live; None otherwise."""
    next_step: str
    """What to call next, in words."""


class RunWait(TypedDict):
    """What happened while waiting for a run."""

    run: RunRecord
    """The run's full record at the end of the wait."""
    log_tail: list[str]
    """The last lines of the current attempt's log."""
    time_left_seconds: float | None
    """Seconds left in the current attempt's time box while it is live; None otherwise."""
    next_step: str
    """What to call next, in words."""
    changed: bool
    """True when the run's state (or attempt) changed during the wait."""
    ended: bool
    """True when the run is in a final state."""
    waited_seconds: float
    """How long the call waited."""


# As in `core.records`: field docstrings become the descriptions of the output schema.
_DOCUMENTED: tuple[Any, ...] = (RunStatus, RunWait)
for _shape in _DOCUMENTED:
    _shape.__pydantic_config__ = {"use_attribute_docstrings": True}


def time_left(record: RunRecord, now: float | None = None) -> float | None:
    """Seconds left in the live attempt's time box, from its deadline."""
    deadline = record["deadline"]
    if record["status"] not in ACTIVE_STATES or not deadline:
        return None
    try:
        at = timegm(time.strptime(deadline[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None
    return round(max(0.0, at - (time.time() if now is None else now)), 1)


def run_status(record: RunRecord, log_tail: list[str]) -> RunStatus:
    return RunStatus(
        run=record,
        log_tail=log_tail,
        time_left_seconds=time_left(record),
        next_step=NEXT_STEP.get(record["status"], "Call get_status(run_id)."),
    )


def run_wait(status: RunStatus, *, changed: bool, waited: float) -> RunWait:
    return RunWait(
        **status,
        changed=changed,
        ended=status["run"]["status"] not in ACTIVE_STATES,
        waited_seconds=round(waited, 2),
    )


def progress_message(record: RunRecord) -> str:
    """One line about a run for a progress notification."""
    parts = [f"{record['run_id']}: {record['status']}"]
    if record["step"] is not None:
        parts.append(f"step {record['step']}" + (f"/{record['total']}" if record["total"] else ""))
    if record["loss"] is not None:
        parts.append(f"loss {record['loss']:.4g}")
    return ", ".join(parts)


def render_error(exc: BackpropError, hint: str | None = None) -> str:
    """An error as the model reads it: what was wrong, then what to do."""
    hint = hint or exc.hint
    if hint is None and isinstance(exc, RunNotFound):
        hint = "call list_experiments to see the run ids that exist (newest first)"
    kind = type(exc).__name__
    return f"{kind}: {exc.message}" + (f"\nWhat to do: {hint}" if hint else "")


def render_invalid_arguments(tool: str, errors: list[Any]) -> str:
    """Pydantic's validation errors of a tool's arguments, one line each."""
    lines = [f"Invalid arguments for {tool}:"]
    for error in errors[:MAX_LISTED_ERRORS]:
        where = ".".join(str(part) for part in error.get("loc", ())) or "(arguments)"
        given = "" if error.get("type") == "missing" else f" (got {_short(error.get('input'))})"
        lines.append(f"- {where}: {error.get('msg', 'invalid')}{given}")
    if len(errors) > MAX_LISTED_ERRORS:
        lines.append(f"- ... and {len(errors) - MAX_LISTED_ERRORS} more")
    lines.append(
        f"What to do: fix these and call {tool} again; its input schema lists every argument "
        "with its type and bounds."
    )
    return "\n".join(lines)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
