"""The shapes of the service's answers, shared by the CLI's `--json` and the MCP tools: a page of
runs, the machine's status, a log tail, a dry run, a comparison, metric histories, their curves
drawn (`Plot`) and an import report.

TypedDicts, like every shape in `core` (see `records` for why).
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired

# pydantic needs typing_extensions.TypedDict on Python < 3.12 to read nested TypedDicts.
from typing_extensions import TypedDict

from backprop_mcp.core.machine import Decision, Limits, SystemSnapshot
from backprop_mcp.core.notebook import Notebook
from backprop_mcp.core.provenance import CodeRef, Provenance
from backprop_mcp.core.records import RunRecord, RunRow

# Pydantic reads attribute docstrings as field descriptions in the MCP schemas; setting the
# config as a plain dict keeps pydantic out of this module's imports.
_DOC_CONFIG: Any = {"use_attribute_docstrings": True}


class RunPage(TypedDict):
    """One page of runs, newest first unless sorted."""

    runs: list[RunRow]
    """Runs on this page, newest first, or in the order asked for."""
    next_cursor: str | None
    """Pass as `cursor` to get the next page; None on the last page."""
    total_matching: int | None
    """How many runs match in all, when it was cheap to count."""


class ClusterResources(TypedDict):
    """Free and total resources of a Ray cluster, or of one of its nodes."""

    cpus_free: float
    cpus_total: float
    gpus_free: float
    gpus_total: float
    memory_free_gb: float
    memory_total_gb: float


class ClusterNode(ClusterResources):
    """One node of a Ray cluster, as its dashboard last reported it."""

    node: str
    """Its address (or Ray's node id when it reports none)."""
    head: bool


class ClusterView(ClusterResources):
    """The Ray cluster a new run would go to (the `ray` backend): its free and total resources,
    summed over its nodes, and its freest nodes."""

    address: str
    nodes: list[ClusterNode]
    """The freest nodes first, at most a few (see nodes_left_out)."""
    nodes_left_out: int
    error: str | None
    """Why the cluster could not be read now (then every figure is 0)."""


class SystemStatus(TypedDict):
    """The machine now: resources, live and queued runs, and the verdict for a new run."""

    snapshot: SystemSnapshot
    """CPU, RAM and GPUs."""
    limits: Limits
    """The limits a new run would be held to."""
    live_runs: list[RunRow]
    """Runs running or paused now."""
    queued_runs: list[RunRow]
    """Runs waiting in the machine-wide queue, in order."""
    verdict: Decision
    """Whether a new run with these limits could start now, and why not."""
    cluster: NotRequired[ClusterView]
    """With the ray backend: the cluster's resources. Its runs are among the live and queued
    ones, and the verdict is the cluster's."""


class LogTail(TypedDict):
    """The end of a run's log."""

    run_id: str
    """Run id."""
    attempt: int
    """Attempt whose log this is."""
    lines: list[str]
    """Last lines of combined stdout and stderr, oldest first."""
    truncated: bool
    """True when earlier lines were left out."""
    path: str
    """Log file path."""
    note: NotRequired[str]
    """Present only when there are no lines: why (the script printed nothing, or has not started)."""


class StopResult(TypedDict):
    """What became of one run asked to stop."""

    run_id: str
    """Run id."""
    stopped: bool
    """True when the stop was sent (the run ends `stopped` soon, or already has with force)."""
    error: str | None
    """Why the run could not be stopped (it had ended, no such run), when it could not."""
    record: RunRecord | None
    """The run's record after the request; None when it cannot be read."""


class StopReport(TypedDict):
    """Several runs asked to stop, each reported."""

    runs: list[StopResult]
    """One entry per run id, in the order given (repeats once)."""
    all_stopped: bool
    """True when every run was asked to stop; False when some could not be (see their error)."""


class DryRun(TypedDict):
    """What `run` would do, without starting anything."""

    command: list[str]
    """The exact argv the script would be started with (no shell)."""
    cwd: str
    """Working directory."""
    python: str
    """Interpreter."""
    python_source: str
    """How the interpreter was chosen."""
    environment: dict[str, str]
    """The contract variables the script would receive (the rest of the environment is inherited)."""
    decision: Decision
    """The governor's verdict now."""
    limits: Limits
    """Limits applied."""
    options: dict[str, Any]
    """Effective run options."""
    config_files: list[str]
    """Config files that were read, lowest precedence first."""


class ComparedRun(TypedDict):
    """One run in a comparison."""

    run_id: str
    """Run id."""
    name: str | None
    """Name."""
    status: str
    """State."""
    step: int | None
    """Last step."""
    loss: float | None
    """Last loss."""
    last_value: float | None
    """The compared metric's last reported value (an ended run's final one), when reported."""
    best_value: float | None
    """The metric's best value on the run's curve (lowest or highest, as `lower_is_better` says),
    from its metric history; the last value when the run has no history (it predates it)."""
    value: float | None
    """The value ranked by: `best_value` or `last_value`, as `ranked_by` says."""
    ended_early: bool
    """The run ended without completing its steps: not completed, or its step short of its total
    (false while it is still active)."""
    metrics: dict[str, float]
    """Latest metrics."""
    duration_seconds: float | None
    """Running time summed over attempts."""


class Comparison(TypedDict):
    """Runs side by side on one metric."""

    metric: str
    """Metric compared ('loss' by default)."""
    lower_is_better: bool
    """Direction used to rank."""
    ranked_by: Literal["last", "best"]
    """What the ranking compares: each run's last reported value, or its best one."""
    runs: list[ComparedRun]
    """The runs ranked by `value`, best first; runs without the metric last."""
    top_run_id: str | None
    """The run ranked first, when any reported the metric."""


class Series(TypedDict):
    """One metric of one run over its steps, downsampled (first, last and best points kept)."""

    steps: list[float]
    """Steps of the points shown, ascending (attempts joined; see `joins`)."""
    values: list[float]
    """The metric at those steps (about 5 significant digits)."""
    last: float
    """Last value on the curve."""
    last_step: float
    """Its step."""
    best: float
    """Best value on the curve: the lowest, or the highest when `lower_is_better` is false."""
    best_step: float
    """The step where `best` was first reached."""
    lower_is_better: bool
    """Direction read from the name (loss, err, perplexity... rank lower-first)."""
    reported: int
    """Points the script reported in all (most are not kept: the history is bounded)."""


class RunMetrics(TypedDict):
    """The metric history of one run."""

    run_id: str
    """Run id."""
    metrics: dict[str, Series]
    """Each metric asked for (by default the loss and a few others) that the run reported."""
    joins: list[float]
    """Steps where the attempts after the first begin on the curve (a resume)."""
    missing: list[str]
    """Metrics asked for that this run never reported."""
    available: NotRequired[list[str]]
    """Every metric the run reported; present only when some asked for are missing."""
    note: NotRequired[str]
    """Present when the history could not be used as is: no history (a run from before it was
    kept, or one that has not written it yet) so only last values are shown, or a damaged file."""


class MetricsAnswer(TypedDict):
    """Metric histories of one or more runs."""

    runs: list[RunMetrics]
    """One entry per run asked for, in order."""


class ImportReport(TypedDict):
    """Result of importing the seed's experiments.json."""

    source: str
    """File read."""
    imported: list[str]
    """Run ids imported."""
    skipped: list[str]
    """Entries skipped, with the reason."""


class Plot(TypedDict):
    """Metric curves of one or more runs drawn as one PNG (`backprop plot`, plot_metrics)."""

    png: bytes
    """The picture: one panel per metric, one line per run."""
    width: int
    """Its size in pixels."""
    height: int
    runs: list[str]
    """The runs drawn, in the order of the legend."""
    metrics: list[str]
    """The metrics drawn, one panel each."""
    joins: dict[str, list[float]]
    """Per run drawn that was resumed: the steps where its later attempts join (dashed lines)."""
    notes: list[str]
    """What was left out and why: runs without a history, metrics a run did not report, a cap."""


class RunShow(TypedDict):
    """Everything about one run (`backprop show`): its record, and what each attempt ran."""

    run: RunRecord
    """The record, attempts included."""
    code: list[Provenance]
    """The provenance of each attempt that kept one, oldest first (see `Provenance.attempt`)."""
    notebook: Notebook
    """Its tags and every note, oldest first (`backprop note`, MCP `annotate_run`)."""


class RunDiff(TypedDict):
    """What differs between two attempts of runs (`backprop diff`)."""

    a: str
    """The first, as RUN:ATTEMPT."""
    b: str
    """The second."""
    same: bool
    """True when their scripts, snapshot files, arguments and options are all the same."""
    code_a: CodeRef | None
    """The first's code in short (None when it kept none)."""
    code_b: CodeRef | None
    """The second's."""
    changed_files: list[str]
    """The script and snapshot files that differ: "changed PATH", "only in a: PATH", ..."""
    diff: str
    """A unified diff of the stored copies of the files that differ (text files both copied), then
    of the arguments, one per line."""
    options: dict[str, list[Any]]
    """Options that differ: name -> [a's value, b's value]."""
    notes: list[str]
    """What could not be compared and why (a file hashed but not copied, no snapshot kept)."""


# Set after the class bodies, as pydantic's own `with_config` does: written inside a TypedDict
# body, a type checker takes `__pydantic_config__` for a required key of the shape.
_DOCUMENTED: tuple[Any, ...] = (
    RunPage,
    SystemStatus,
    LogTail,
    StopResult,
    StopReport,
    DryRun,
    ComparedRun,
    Comparison,
    Series,
    RunMetrics,
    MetricsAnswer,
    ImportReport,
    Plot,
    RunShow,
    RunDiff,
)
for _shape in _DOCUMENTED:
    _shape.__pydantic_config__ = _DOC_CONFIG
