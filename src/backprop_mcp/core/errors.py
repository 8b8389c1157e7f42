"""The one error tree of backprop-mcp; every error a user can cause is a `BackpropError`.

    BackpropError                 a clear, user-facing message; never shown with a traceback
    ├── UsageError                a bad option, argument or tool input            (CLI exit 2)
    │   └── ConfigError           a bad config file, key or value                 (CLI exit 2)
    ├── RunNotFound               no run with that id                             (CLI exit 2)
    ├── RunStateError             the run cannot do that in its state (e.g. stop a finished run)
    ├── NoCheckpoint              resume found no usable checkpoint
    ├── PathNotAllowed            a script outside the allowed roots              (CLI exit 2)
    ├── Rejected                  the governor refused and the caller asked not to queue (exit 3)
    └── StoreError                the experiment store cannot be read or written
        └── StoreCorrupt          a file in the store is not valid; it was moved aside

Adapters (CLI, MCP server) catch `BackpropError` and render its message; anything else is a bug.
"""

from __future__ import annotations


class BackpropError(Exception):
    """Base class: the message says what was wrong and what is allowed."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n{self.hint}" if self.hint else self.message


class UsageError(BackpropError):
    """A bad option, argument or tool input."""

    exit_code = 2


class ConfigError(UsageError):
    """A bad config file, key, environment variable or value."""


class RunNotFound(BackpropError):
    """No run has that id."""

    exit_code = 2


class RunStateError(BackpropError):
    """The run is in a state that does not allow the request."""

    exit_code = 2


class NoCheckpoint(BackpropError):
    """Resume found no checkpoint that still exists."""

    exit_code = 2


class PathNotAllowed(UsageError):
    """A script path resolves outside the allowed roots."""


class Rejected(BackpropError):
    """The governor refused the run and the caller asked not to queue."""

    exit_code = 3


class StoreError(BackpropError):
    """The store cannot be read or written (permissions, full disk, read-only)."""


class StoreCorrupt(StoreError):
    """A store file was not valid JSON of a known schema; it has been moved aside."""


class ClusterError(BackpropError):
    """The cluster a run is sent to (the ray backend) cannot be reached, or refused a request."""
