"""The seam between "a run was asked for" and "where its supervisor runs" (DESIGN §9).

The service never starts a supervisor itself: it asks a `Backend` to submit the run's current
attempt, to say which supervisor process serves the run and whether it lives, to stop it, and
where the attempt's log is. `backends.local` runs the supervisor as a detached process on this
machine; a cluster backend (Ray Jobs) submits the same supervisor as a job's entrypoint, so the
time box, the events and the record behave the same wherever it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from backprop_mcp.core.records import RunRecord
from backprop_mcp.core.store import Store

SupervisorId = tuple[int, float | None]
"""A supervisor process: its pid and start time (None when unknown), so a reused pid is not it."""


class Backend(Protocol):
    """Where the supervisors of one store's runs run."""

    name: str
    """Short name, as a setting would give it ("local")."""

    def submit(self, store: Store, run_id: str, env: Mapping[str, str]) -> None:
        """Start the supervisor of the run's current attempt, all or nothing: when this raises
        (`StoreError`), no supervisor of the attempt is left to act on the run."""
        ...

    def supervisor(self, store: Store, record: RunRecord) -> SupervisorId | None:
        """The supervisor serving the run's current attempt; None while it is being launched."""
        ...

    def is_alive(self, supervisor: SupervisorId) -> bool:
        """True while that exact supervisor lives (not a later process with the same pid)."""
        ...

    def stop(self, supervisor: SupervisorId, *, force: bool) -> None:
        """Ask the supervisor to stop its run: gracefully (the script gets its stop signal and
        grace), or at once with `force`. A supervisor already gone is not an error."""
        ...

    def log_path(self, store: Store, run_id: str, attempt: int) -> Path:
        """Where the attempt's combined stdout and stderr can be read."""
        ...
