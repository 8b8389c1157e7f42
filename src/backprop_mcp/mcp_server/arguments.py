"""The typed, described and bounded arguments of the MCP tools: their pydantic `Field`s take the
help and the numeric bounds of the settings table, so a schema cannot allow what the config layers
refuse (or the reverse); and the map of the arguments that name a path."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field
from typing_extensions import TypedDict

from backprop_mcp.core.notebook import MAX_NOTE_CHARS, MAX_TAGS
from backprop_mcp.core.parsers import MAX_GLOB_CHARS, MAX_GLOBS
from backprop_mcp.core.records import RunState
from backprop_mcp.core.settings import FIELDS_BY_NAME
from backprop_mcp.sweeps.shapes import MAX_BUDGET_MINUTES, MAX_PARALLEL, MAX_SEED

# Bounds of what one call may ask for: a wait within a client's usual request timeout, a log tail
# (of lines of at most 2000 characters) that fits in a model's context.
MAX_WAIT_SECONDS = 300
MAX_LOG_TAIL = 500


# The choices of `core.settings`, spelled out for the type checker (a test keeps them equal).
FrameworkName = Literal["auto", "pytorch", "tensorflow", "jax", "none"]
SignalName = Literal["SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2"]


def setting_help(name: str) -> str:
    """A setting's help from the settings table, as a sentence."""
    text = FIELDS_BY_NAME[name].help
    return text[0].upper() + text[1:] + "."


def setting_field(name: str, *, described: bool = True) -> Any:
    """The pydantic Field of a setting: its help (unless `described` is false: the name says it),
    and for a number the bounds of config's table (so the schema cannot allow what the config
    layers refuse, or the reverse)."""
    description = setting_help(name) if described else None
    bounds = FIELDS_BY_NAME[name].bounds
    if bounds is None:
        return Field(description=description)
    # 10080, not 10080.0: the same bound in fewer of the bytes every conversation pays for.
    low, high = (int(b) if float(b).is_integer() else float(b) for b in (bounds.low, bounds.high))
    return Field(
        description=description,
        gt=low if bounds.low_open else None,
        ge=None if bounds.low_open else low,
        lt=high if bounds.high_open else None,
        le=None if bounds.high_open else high,
        allow_inf_nan=False,  # "Input should be a finite number", not "less than or equal to" for nan
    )


RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
OneRun = Annotated[str, Field(min_length=1, max_length=128, pattern=RUN_ID_PATTERN)]
RunId = Annotated[
    str,
    Field(description="A run id.", min_length=1, max_length=128, pattern=RUN_ID_PATTERN),
]
# Most runs one call may name (wait, stop, compare, get_metrics): a sweep's trials, and an answer
# that stays within its byte budget.
MAX_RUN_IDS = 50
RunIds = Annotated[
    list[OneRun],
    Field(description=f"Run ids (1 to {MAX_RUN_IDS}).", min_length=1, max_length=MAX_RUN_IDS),
]
OneOrMoreRuns = Annotated[
    OneRun | list[OneRun],
    Field(description=f"A run id, or a list of up to {MAX_RUN_IDS}."),
]
Args = Annotated[
    list[Annotated[str, Field(max_length=4096)]] | None,
    Field(
        description='The script\'s arguments (hyperparameters), e.g. ["--lr", "0.01"].',
        max_length=256,
    ),
]
Minutes = Annotated[float | None, setting_field("max_run_minutes")]
Status = Annotated[RunState | None, Field(description="Only runs in this state.")]


def _option(name: str) -> Any:
    """An option's Field: the bounds of the settings table, without its help: the names say what
    they take, with their units, and docs/mcp-tools.md the rest (every byte here is paid for)."""
    return setting_field(name, described=False)


class RunOptions(TypedDict, total=False):
    """The rarely needed run options, in one object (defaults: the server's options, then config)."""

    max_wall_minutes: Annotated[float, _option("max_wall_minutes")]
    checkpoint_every_minutes: Annotated[float, _option("checkpoint_every_minutes")]
    max_parallel: Annotated[int, _option("max_parallel")]
    min_free_ram_gb: Annotated[float, _option("min_free_ram_gb")]
    max_cpu_percent: Annotated[float, _option("max_cpu_percent")]
    gpu_min_free_vram_mb: Annotated[float, _option("gpu_min_free_vram_mb")]
    gpu_max_temp_c: Annotated[float, _option("gpu_max_temp_c")]
    gpu_memory_limit: Annotated[str, Field(description='"80%" or GB', max_length=16)]
    gpus: Annotated[
        list[Annotated[str, Field(max_length=64)]], Field(description="indices or UUIDs", max_length=64)
    ]
    use_gpu: bool
    grace_seconds: Annotated[float, _option("grace_seconds")]
    stop_signal: SignalName
    queue: Annotated[bool, Field(description="false: rejected, not queued, when busy")]
    queue_timeout_minutes: Annotated[float, _option("queue_timeout_minutes")]
    framework: FrameworkName
    argv_compat: Annotated[bool, Field(description="also pass the seed's argv flags")]
    snapshot_max_mb: Annotated[float, _option("snapshot_max_mb")]
    snapshot: Annotated[
        list[Annotated[str, Field(max_length=MAX_GLOB_CHARS)]],
        Field(description="globs", max_length=MAX_GLOBS),
    ]
    # Not ray_address: where the project's folder is uploaded is the user's choice (config,
    # RAY_ADDRESS, the server's --ray-address), never an agent's (docs/cluster.md, Security).
    backend: Literal["local", "ray"]


RunOptions.__pydantic_config__ = {"extra": "forbid"}  # type: ignore[attr-defined]
OPTION_NAMES = frozenset(RunOptions.__annotations__)


class StartOptions(RunOptions, total=False):
    """run_training's (and run_sweep's) `options`: the run options, and the notebook's first entry
    (`core.notebook` checks them: a tag's characters, a note's length)."""

    tags: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=MAX_TAGS)]
    note: Annotated[str, Field(max_length=MAX_NOTE_CHARS)]


StartOptions.__pydantic_config__ = {"extra": "forbid"}  # type: ignore[attr-defined]
NOTEBOOK_OPTIONS = frozenset(StartOptions.__annotations__) - OPTION_NAMES
# Published as this text rather than as typed properties (see `schema.lean`'s `plain`): a third of
# the bytes, every conversation pays for them, and the server validates each option all the same,
# with a one-line error naming the option and what it takes. A test keeps it naming every option.
OPTIONS_TEXT = (
    "Rare run options (default: server's, then config). Numbers: max_wall_minutes, "
    "checkpoint_every_minutes, max_parallel, min_free_ram_gb, max_cpu_percent, gpu_min_free_vram_mb, "
    "gpu_max_temp_c, grace_seconds, queue_timeout_minutes, snapshot_max_mb. Booleans: use_gpu, "
    'queue (false: refuse when busy), argv_compat. gpus: ["0"] or UUIDs; gpu_memory_limit: "80%" or GB; '
    "stop_signal: SIGINT|SIGTERM|SIGHUP|SIGUSR1|SIGUSR2; framework: auto|pytorch|tensorflow|jax|none; "
    "backend: local|ray; snapshot: globs of files to keep with the script. tags, note."
)
Options = Annotated[StartOptions | None, Field(description=OPTIONS_TEXT)]
ResumeOptions = Annotated[
    RunOptions | None,
    Field(description="Options as in run_training (not framework; default: the run's)."),
]


class SweepOptions(StartOptions, total=False):
    """run_sweep's `options`: the run options of each trial, and the rarer settings of the sweep,
    bounded as `sweeps.service` bounds them."""

    parallel: Annotated[int, Field(ge=1, le=MAX_PARALLEL)]
    budget_minutes: Annotated[float, Field(gt=0, le=int(MAX_BUDGET_MINUTES), allow_inf_nan=False)]
    objective: Literal["final", "best"]
    prune: bool
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)]
    name: Annotated[str, Field(max_length=200)]


SweepOptions.__pydantic_config__ = {"extra": "forbid"}  # type: ignore[attr-defined]
SWEEP_ONLY_OPTIONS = frozenset(SweepOptions.__annotations__) - OPTION_NAMES - NOTEBOOK_OPTIONS
# The keys of each tool's `options` (resume_run's unless named here): an unknown key is refused
# with the nearest real one.
OPTIONS_OF: dict[str, frozenset[str]] = {
    "run_training": OPTION_NAMES | NOTEBOOK_OPTIONS,
    "run_sweep": OPTION_NAMES | NOTEBOOK_OPTIONS | SWEEP_ONLY_OPTIONS,
}

# The tools' arguments that name a path, and the field of `service.RunRequest` each one becomes:
# the service checks those fields against the allowed roots (`confine.REQUEST_PATHS`) before it
# looks at any of them. tests/test_security.py fails on a string argument that is in neither this
# map nor its own list of arguments that are not paths.
PATH_ARGUMENTS: dict[str, dict[str, str]] = {
    "run_training": {"script": "script", "cwd": "cwd", "python": "python", "resume_from": "resume_from"},
    # A sweep's trials are runs of these: the sweep is checked as its first trial's request.
    "run_sweep": {"script": "script", "cwd": "cwd", "python": "python"},
}
