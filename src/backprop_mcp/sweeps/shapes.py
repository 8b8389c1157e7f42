"""The shapes of sweeps: the stored record (`SweepRecord`, `sweeps/<id>/sweep.json`) with its
trials, and the answers of the use-cases (`SweepAnswer`, `SweepRow`). TypedDicts, like every
stored shape (see `core.records` for why): the runner starts fast, and the MCP server still reads
full schemas from them."""

from __future__ import annotations

from typing import Any, NotRequired

from typing_extensions import TypedDict

SWEEP_SCHEMA_VERSION = 1

# Bounds of a sweep's request, here (a light module) so the MCP schema publishes the same ones.
MAX_TRIALS = 10_000
MAX_PARALLEL = 64
# A week: a budget beyond it is a typo (minutes for seconds), not a plan.
MAX_BUDGET_MINUTES = 7 * 24 * 60.0
MAX_SEED = 2**31 - 1

SWEEP_STATES: tuple[str, ...] = ("running", "completed", "stopped", "failed", "lost")
ACTIVE_SWEEP_STATES: frozenset[str] = frozenset({"running"})
# A trial between its entry in the sweep record and its run's creation (the runner may die there).
STARTING = "starting"

_DOC_CONFIG: Any = {"use_attribute_docstrings": True}

ParamValue = str | int | float | bool


class Trial(TypedDict):
    """One trial of a sweep: a run with its parameters."""

    number: int
    """Trial number, from 1."""
    run_id: str
    """The trial's run (an ordinary run: `backprop status RUN_ID`, resume_run)."""
    params: dict[str, ParamValue]
    """Its parameters."""
    status: str
    """The run's state ("starting" until the run exists)."""
    reason: NotRequired[str]
    """Why the run ended: pruned, deadline, exit_nonzero, ... (absent while it runs)."""
    objective: float | None
    """Its score: the metric's final (or best) value; None while unreported, and for a trial that failed."""
    step: NotRequired[int]
    """Last step reported."""
    unfinished: NotRequired[bool]
    """True for a scored trial that did not run to its end (timed out or stopped): resume it."""
    resume: NotRequired[bool]
    """Set by a sweep's resume: the runner starts the trial's next attempt."""


class SweepRecord(TypedDict):
    """Everything known about one sweep; the stored `sweep.json`."""

    schema_version: int
    sweep_id: str
    name: str | None
    status: str
    status_detail: str | None
    script: str
    args: list[str]
    cwd: str
    python: str | None
    options: dict[str, Any]
    """Run options for the trials, as given (validated at the sweep's start)."""
    source: str
    config_file: str | None
    allowed_roots: list[str] | None
    params: dict[str, Any]
    """The space as given: each name maps to a list or a distribution string."""
    metric: str
    mode: str
    objective: str
    method: str
    seed: int
    max_trials: int
    parallel: int
    budget_minutes: float | None
    prune: bool
    created_at: str
    started_at: str | None
    ended_at: str | None
    elapsed_seconds: float
    """Seconds of the time budget used by earlier runners of this sweep (resumes add to it)."""
    runner_pid: int | None
    runner_started: float | None
    trials: list[Trial]
    updated_at: str
    tags: NotRequired[list[str]]
    """Tags every trial's notebook starts with."""
    note: NotRequired[str]
    """A note every trial's notebook starts with (the sweep's hypothesis)."""


class Best(TypedDict):
    """The best scored trial."""

    run_id: str
    number: int
    params: dict[str, ParamValue]
    objective: float
    status: str
    """Its run's state: a timed-out or stopped best trial is worth resuming."""


class Spread(TypedDict):
    """The objective over the scored trials."""

    min: float
    median: float
    max: float
    scored: int


class ParamSummary(TypedDict):
    """How one parameter related to the objective."""

    best: ParamValue
    """Its value in the best trial."""
    rho: NotRequired[float]
    """Spearman rank correlation of its values with the objective (numbers, 3+ scored trials);
    with mode min, a negative rho means larger values scored better."""
    by_value: NotRequired[dict[str, float]]
    """For listed values: the best objective each value reached."""


class SweepBudget(TypedDict):
    max_trials: int
    started: int
    parallel: int
    budget_minutes: float | None
    elapsed_minutes: float


class SweepAnswer(TypedDict):
    """A sweep's state and results, bounded in size."""

    sweep_id: str
    name: str | None
    status: str
    """running, completed, stopped, failed or lost (its runner died; resume continues it)."""
    status_detail: str | None
    metric: str
    mode: str
    method: str
    counts: dict[str, int]
    """Trials by state."""
    trials: list[Trial]
    """The trials: all of them when few, else the best ones and those still active."""
    trials_left_out: int
    """Trials not in `trials` (ask for all of them to see them)."""
    best: Best | None
    spread: Spread | None
    param_summary: dict[str, ParamSummary]
    budget: SweepBudget
    next_step: str
    """What to do next, in one line."""


class SweepRow(TypedDict):
    """A sweep in a list."""

    sweep_id: str
    name: str | None
    status: str
    metric: str
    mode: str
    trials: int
    best_objective: float | None
    created_at: str


_DOCUMENTED: tuple[Any, ...] = (
    Trial,
    SweepRecord,
    Best,
    Spread,
    ParamSummary,
    SweepBudget,
    SweepAnswer,
    SweepRow,
)
for _shape in _DOCUMENTED:
    _shape.__pydantic_config__ = _DOC_CONFIG
