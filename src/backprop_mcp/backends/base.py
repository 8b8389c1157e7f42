"""The seam between "a run was asked for" and "where its supervisor runs" (DESIGN §9).

The service never starts a supervisor itself: it asks a `Backend` to submit the run's current
attempt, to say which supervisor process serves the run and whether it lives, to stop it, and
where the attempt's log is. `backends.local` runs the supervisor as a detached process on this
machine (`Backend`); a cluster backend (`RemoteBackend`: Ray Jobs, `backends.ray`) submits the same
supervisor as a job's entrypoint, so the time box, the events and the record behave the same
wherever it runs, and folds what that supervisor reports into this store whenever a run is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from backprop_mcp.core.answers import ClusterView
from backprop_mcp.core.machine import Decision
from backprop_mcp.core.records import RunRecord
from backprop_mcp.core.settings import Settings
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


class RemoteBackend(Protocol):
    """Where the supervisors of some runs run when that is not this machine: no local process
    serves such a run, so its liveness, record, events, log and metric history are what the
    cluster reports, folded into this store by `follow` on each read."""

    name: str
    """Short name, as the `backend` setting gives it ("ray")."""

    def submit(self, store: Store, run_id: str, env: Mapping[str, str]) -> None:
        """Submit the run's current attempt, or leave it `queued` (with the reason in its record)
        while the cluster cannot take it. Raises (`BackpropError`) when the attempt cannot be
        submitted at all; nothing of it is left on the cluster then."""
        ...

    def follow(self, store: Store, record: RunRecord) -> RunRecord:
        """The run's current record: what its job reported since the last read folded in (record,
        events, log, metric history), a queued run submitted once the cluster can take it, and a
        run whose job is gone ended truthfully. Bounded in time, also when the cluster is away."""
        ...

    def stop(self, store: Store, record: RunRecord, *, force: bool, pruned: str | None) -> None:
        """Ask the run's job to stop: gracefully through its supervisor's stop sequence, or at once
        with `force`; `pruned` (why, in words) makes it a sweep's early stop."""
        ...

    def decide(self, store: Store, settings: Settings) -> Decision:
        """The cluster's verdict for a new run under these settings now (as `dry_run` shows it)."""
        ...

    def overview(
        self, store: Store, settings: Settings
    ) -> tuple[ClusterView, list[str], list[str], Decision]:
        """The cluster now, for a status: its resources (a cluster that does not answer is said so
        in them, not raised), this store's live and queued runs on it (in queue order), and the
        verdict for a new run under these settings."""
        ...
