"""The typed, described and bounded arguments of the MCP tools: their pydantic `Field`s take the
help and the numeric bounds of the settings table, so a schema cannot allow what the config layers
refuse (or the reverse); and the map of the arguments that name a path."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from backprop_mcp.core.records import RunState
from backprop_mcp.core.settings import FIELDS_BY_NAME

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


def setting_field(name: str) -> Any:
    """The pydantic Field of a setting: its help, and for a number the bounds of config's table
    (so the schema cannot allow what the config layers refuse, or the reverse)."""
    bounds = FIELDS_BY_NAME[name].bounds
    if bounds is None:
        return Field(description=setting_help(name))
    number = int if bounds.whole else float
    low, high = number(bounds.low), number(bounds.high)
    return Field(
        description=setting_help(name),
        gt=low if bounds.low_open else None,
        ge=None if bounds.low_open else low,
        lt=high if bounds.high_open else None,
        le=None if bounds.high_open else high,
        allow_inf_nan=False,  # "Input should be a finite number", not "less than or equal to" for nan
    )


RunId = Annotated[
    str,
    Field(
        description="The run's id, as returned by run_training or list_experiments.",
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
    ),
]
Args = Annotated[
    list[Annotated[str, Field(max_length=4096)]] | None,
    Field(description="Extra command-line arguments passed to the script unchanged.", max_length=256),
]
Minutes = Annotated[float | None, setting_field("max_run_minutes")]
WallMinutes = Annotated[float | None, setting_field("max_wall_minutes")]
CheckpointEvery = Annotated[float | None, setting_field("checkpoint_every_minutes")]
Grace = Annotated[float | None, setting_field("grace_seconds")]
StopSignal = Annotated[SignalName | None, Field(description=setting_help("stop_signal"))]
Queue = Annotated[bool | None, Field(description=setting_help("queue"))]
QueueTimeout = Annotated[float | None, setting_field("queue_timeout_minutes")]
UseGpu = Annotated[bool | None, Field(description=setting_help("use_gpu"))]
Gpus = Annotated[
    list[Annotated[str, Field(max_length=64)]] | None,
    Field(
        description='GPUs the run may use: indices like "0" or UUIDs like "GPU-8f3a..." (default all).',
        max_length=64,
    ),
]
GpuMemory = Annotated[str | None, Field(description=setting_help("gpu_memory_limit"), max_length=16)]
Status = Annotated[RunState | None, Field(description="Only runs in this state.")]

# The tools' arguments that name a path, and the field of `service.RunRequest` each one becomes:
# the service checks those fields against the allowed roots (`confine.REQUEST_PATHS`) before it
# looks at any of them. tests/test_security.py fails on a string argument that is in neither this
# map nor its own list of arguments that are not paths.
PATH_ARGUMENTS: dict[str, dict[str, str]] = {
    "run_training": {"script": "script", "cwd": "cwd", "python": "python", "resume_from": "resume_from"},
}
