"""The shapes of what is stored: a run's record (`RunRecord`, the stored `run.json`), its attempts
and checkpoints, its index row (`RunRow`), the run states, and the constructors of new ones.

They are `TypedDict`s, not pydantic models, on purpose: the supervisor and the fast CLI paths
(`status`, `list`) must start in a few tens of milliseconds and importing pydantic costs ~150 ms.
A TypedDict costs nothing at run time, type-checks strictly, and the MCP server still gets full
JSON schemas from it (pydantic reads TypedDicts, their docstrings and attribute docstrings).
What is stored on disk is exactly one of these shapes, so `--json` and MCP output agree by
construction.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, cast

# pydantic needs typing_extensions.TypedDict on Python < 3.12 to read nested TypedDicts.
from typing_extensions import TypedDict

from backprop_mcp.core.machine import GpuInfo
from backprop_mcp.core.provenance import CodeRef, RerunRef

SCHEMA_VERSION = 1

RunState = Literal[
    "queued", "running", "paused", "completed", "failed", "timed_out", "stopped", "lost", "rejected"
]
ACTIVE_STATES: frozenset[str] = frozenset({"queued", "running", "paused"})
TERMINAL_STATES: frozenset[str] = frozenset(
    {"completed", "failed", "timed_out", "stopped", "lost", "rejected"}
)
ALL_STATES: tuple[str, ...] = (
    "queued",
    "running",
    "paused",
    "completed",
    "failed",
    "timed_out",
    "stopped",
    "lost",
    "rejected",
)

# An index row is appended at every state change of every run and read back by each listing, so
# what it carries of a run's arguments and metrics is bounded: a row stays a few hundred bytes for
# ordinary runs and under 7 KB for the largest (long arguments, many metrics with long names).
MAX_ROW_ARGS = 24
MAX_ROW_ARG_CHARS = 100
MAX_ROW_METRICS = 32
MAX_ROW_METRIC_NAME_CHARS = 100

TerminationReason = Literal[
    "exit_zero",
    "exit_nonzero",
    "signal",
    "deadline",
    "wall_clock_cap",
    "stop_requested",
    "gpu_memory_limit",
    "supervisor_lost",
    "queue_timeout",
    "queue_error",
    "rejected",
    "start_failed",
    "pruned",
]

# Pydantic reads attribute docstrings as field descriptions in the MCP schemas; setting the
# config as a plain dict keeps pydantic out of this module's imports.
_DOC_CONFIG: Any = {"use_attribute_docstrings": True}


class Checkpoint(TypedDict):
    """A checkpoint the script reported."""

    path: str
    """Absolute path of the checkpoint (relative paths are resolved against the run's cwd)."""
    step: int | None
    """Training step at which it was saved, when the script said so."""
    attempt: int
    """Attempt that saved it."""
    saved_at: str
    """When the event was seen, ISO 8601 UTC."""


class AttemptSummary(TypedDict):
    """One attempt of a run (each resume is a new attempt of the same run id)."""

    attempt: int
    """Attempt number, from 1."""
    status: str
    """Final (or current) state of this attempt."""
    started_at: str | None
    """When the script started, ISO 8601 UTC."""
    ended_at: str | None
    """When the attempt ended, ISO 8601 UTC."""
    termination_reason: str | None
    """Why it ended: exit_zero, exit_nonzero, signal, deadline, stop_requested, ..."""
    exit_code: int | None
    """Exit status of the script, when it exited."""
    signal: str | None
    """Signal that ended the script, when one did (e.g. SIGKILL)."""
    step: int | None
    """Last step reported in this attempt."""
    loss: float | None
    """Last loss reported in this attempt."""
    resume_from: str | None
    """Checkpoint this attempt was started from."""
    code: NotRequired[CodeRef]
    """The code it ran, in short, once its script started (see `backprop show`)."""
    code_changed: NotRequired[bool]
    """Present on a resumed attempt: whether its script differs from the previous attempt's."""


class SweepRef(TypedDict):
    """The sweep a run is a trial of, and the parameters it was given."""

    id: str
    """Sweep id."""
    trial: int
    """Trial number within the sweep, from 1."""
    params: dict[str, str | int | float | bool]
    """The trial's parameters (also in the script's environment as BACKPROP_PARAMS)."""


class RunRecord(TypedDict):
    """Everything known about one run; the stored `run.json`, `--json` output and MCP output."""

    schema_version: int
    """Version of this record's schema."""
    run_id: str
    """Unique id: letters, digits, '-', '_' and '.'."""
    name: str | None
    """Human-readable name."""
    status: str
    """queued, running, paused, completed, failed, timed_out, stopped, lost or rejected."""
    status_detail: str | None
    """Why it is in that state now (queue reasons, pause reason, failure cause), in words."""
    attempt: int
    """Current attempt number (1 + number of resumes)."""
    script: str
    """Absolute path of the training script."""
    args: list[str]
    """Extra arguments passed to the script, unchanged."""
    python: str
    """Interpreter that runs the script."""
    python_source: str
    """How the interpreter was chosen: option, config, virtualenv, current, or cluster (the
    `python` of the Ray cluster that ran the current attempt)."""
    cwd: str
    """Working directory of the script."""
    framework: str
    """pytorch, tensorflow, jax or none (auto-detected from imports unless given)."""
    created_at: str
    """When the run was created, ISO 8601 UTC."""
    started_at: str | None
    """When the current attempt's script started."""
    ended_at: str | None
    """When the current attempt ended."""
    deadline: str | None
    """When the time box of the current attempt ends (moves later while paused)."""
    max_run_minutes: float
    """The time box, minutes of running time."""
    max_wall_minutes: float
    """Cap on wall-clock minutes, paused time included."""
    step: int | None
    """Last step reported."""
    total: int | None
    """Total steps, when the script said so."""
    loss: float | None
    """Last loss reported."""
    metrics: dict[str, float]
    """Latest value of each metric reported."""
    eta_seconds: float | None
    """Seconds to reach `total` at the attempt's average rate so far."""
    checkpoints: list[Checkpoint]
    """Reported checkpoints, newest last (at most the last 50 are kept)."""
    latest_checkpoint: str | None
    """Newest reported checkpoint path."""
    exit_code: int | None
    """Exit status of the script's last attempt."""
    signal: str | None
    """Signal that ended the script, e.g. SIGKILL."""
    termination_reason: str | None
    """Why the run ended: exit_zero, exit_nonzero, signal, deadline, wall_clock_cap, stop_requested,
    gpu_memory_limit, supervisor_lost, queue_timeout, queue_error, rejected, start_failed or pruned
    (stopped by its sweep's early-stopping rule)."""
    attempts: list[AttemptSummary]
    """History of attempts, oldest first."""
    resume_from: str | None
    """Checkpoint the current attempt started from."""
    gpu: GpuInfo | None
    """GPU the run is pinned to, if any."""
    cuda_visible_devices: str | None
    """The CUDA_VISIBLE_DEVICES value given to the script."""
    paused_seconds: float
    """Seconds the current attempt spent paused (not charged to the time box)."""
    queue_position: int | None
    """Position in the machine-wide queue while queued (1 = next)."""
    options: dict[str, Any]
    """Run options: grace_seconds, stop_signal, checkpoint_every_minutes, limits, and so on."""
    config_files: NotRequired[list[str]]
    """Config files that applied to the current attempt, lowest precedence first (absent from
    records written before it was kept)."""
    sweep: NotRequired[SweepRef]
    """Present on a trial of a sweep: the sweep, the trial number and its parameters."""
    rerun_of: NotRequired[RerunRef]
    """Present on a run started by `backprop rerun`: the attempt whose snapshot it runs."""
    job_id: NotRequired[str]
    """Present on a run of the ray backend once its current attempt was submitted: the Ray job's
    submission id (docs/cluster.md)."""
    bad_event_lines: int
    """Lines that looked like events but were not valid (logged and skipped)."""
    supervisor_pid: int | None
    """Pid of the supervisor process."""
    supervisor_started: float | None
    """Start time of the supervisor process (pid reuse check)."""
    script_pid: int | None
    """Pid of the script (leader of its process group)."""
    updated_at: str
    """Last write of this record."""


class RunRow(TypedDict):
    """A compact row for listing runs (the index's entries)."""

    run_id: str
    """Run id."""
    name: str | None
    """Name."""
    status: str
    """State; "unknown" when this backprop cannot read the run's record (see `note`)."""
    attempt: int
    """Attempt number."""
    created_at: str
    """Creation time, ISO 8601 UTC."""
    ended_at: str | None
    """End of the latest attempt."""
    step: int | None
    """Last step reported."""
    total: int | None
    """Total steps."""
    loss: float | None
    """Last loss."""
    script: str
    """Script path."""
    termination_reason: str | None
    """Why it ended."""
    sweep: NotRequired[str]
    """Present on a trial of a sweep: the sweep's id."""
    args: NotRequired[list[str]]
    """The script's arguments (its hyperparameters), shortened: at most `MAX_ROW_ARGS`, each cut to
    `MAX_ROW_ARG_CHARS` characters ending in "..."; a last "..." stands for those left out. Absent
    from rows written before it was kept (a listing fills it from the record)."""
    metrics: NotRequired[dict[str, float]]
    """Latest value of each metric, at most `MAX_ROW_METRICS` of them (the first the script
    reported, names up to `MAX_ROW_METRIC_NAME_CHARS` characters). Absent from rows written before
    it was kept (a listing fills it from the record)."""
    note: NotRequired[str]
    """Present only on a run whose record this backprop cannot read (status "unknown"): why, e.g. a
    record written by a newer backprop."""
    tags: NotRequired[list[str]]
    """The run's tags, when it has any: added by a listing from the tag index (`core.notebook`),
    never stored in the run index, whose rows the run's supervisor writes."""


# Set after the class bodies, as pydantic's own `with_config` does: written inside a TypedDict
# body, a type checker takes `__pydantic_config__` for a required key of the shape.
_DOCUMENTED: tuple[Any, ...] = (Checkpoint, AttemptSummary, SweepRef, RunRecord, RunRow)
for _shape in _DOCUMENTED:
    _shape.__pydantic_config__ = _DOC_CONFIG


def row_of(record: RunRecord) -> RunRow:
    """The index row of a record, with its arguments and metrics shortened to fit a row."""
    row = RunRow(
        run_id=record["run_id"],
        name=record["name"],
        status=record["status"],
        attempt=record["attempt"],
        created_at=record["created_at"],
        ended_at=record["ended_at"],
        step=record["step"],
        total=record["total"],
        loss=record["loss"],
        script=record["script"],
        termination_reason=record["termination_reason"],
        args=row_args(record["args"]),
        metrics=row_metrics(record["metrics"]),
    )
    if "sweep" in record:
        row["sweep"] = record["sweep"]["id"]
    return row


def row_args(args: list[str]) -> list[str]:
    """`args` as an index row keeps them (see `RunRow.args`)."""
    cut = MAX_ROW_ARG_CHARS - 3
    kept = [a if len(a) <= MAX_ROW_ARG_CHARS else a[:cut] + "..." for a in args[:MAX_ROW_ARGS]]
    return [*kept, "..."] if len(args) > MAX_ROW_ARGS else kept


def row_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` as an index row keeps them (see `RunRow.metrics`)."""
    kept: dict[str, float] = {}
    for name, value in metrics.items():
        if len(kept) == MAX_ROW_METRICS:
            break
        if len(name) <= MAX_ROW_METRIC_NAME_CHARS:
            kept[name] = value
    return kept


def new_attempt(number: int, resume_from: str | None = None) -> AttemptSummary:
    """The summary of an attempt that has not started yet."""
    return AttemptSummary(
        attempt=number,
        status="queued",
        started_at=None,
        ended_at=None,
        termination_reason=None,
        exit_code=None,
        signal=None,
        step=None,
        loss=None,
        resume_from=resume_from,
    )


def close_attempt(record: RunRecord, status: str, reason: str, detail: str, ended_at: str) -> None:
    """Record the end of the run's current attempt (not written): the run's state and its reason,
    and the same on the attempt's summary with the step and loss it reached."""
    record["status"], record["termination_reason"], record["status_detail"] = status, reason, detail
    record["ended_at"] = ended_at
    record["attempts"][-1].update(
        {
            "status": status,
            "termination_reason": reason,
            "ended_at": ended_at,
            "step": record["step"],
            "loss": record["loss"],
        }
    )


def new_record(*, run_id: str, script: str, created_at: str, **fields: Any) -> RunRecord:
    """A run's record with every field at its empty value, then `fields` (names of RunRecord)."""
    unknown = set(fields) - set(RunRecord.__annotations__)
    if unknown:
        raise TypeError(f"not fields of a RunRecord: {', '.join(sorted(unknown))}")
    record = RunRecord(
        schema_version=SCHEMA_VERSION,
        run_id=run_id,
        name=None,
        status="queued",
        status_detail=None,
        attempt=1,
        script=script,
        args=[],
        python="",
        python_source="",
        cwd="",
        framework="none",
        created_at=created_at,
        started_at=None,
        ended_at=None,
        deadline=None,
        max_run_minutes=10.0,
        max_wall_minutes=30.0,
        step=None,
        total=None,
        loss=None,
        metrics={},
        eta_seconds=None,
        checkpoints=[],
        latest_checkpoint=None,
        exit_code=None,
        signal=None,
        termination_reason=None,
        attempts=[new_attempt(1)],
        resume_from=None,
        gpu=None,
        cuda_visible_devices=None,
        paused_seconds=0.0,
        queue_position=None,
        options={},
        config_files=[],
        bad_event_lines=0,
        supervisor_pid=None,
        supervisor_started=None,
        script_pid=None,
        updated_at=created_at,
    )
    record.update(cast(RunRecord, fields))
    return record
