"""The supervisor's first phase: waiting in the machine-wide queue until the governor admits the
run, showing its place and the reasons it waits, and ending it unstarted when it is stopped,
refused or waits too long."""

from __future__ import annotations

import logging
import time
from typing import Any

import psutil

from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.errors import BackpropError, StoreError
from backprop_mcp.core.machine import Decision, SystemSnapshot
from backprop_mcp.governor import decisions
from backprop_mcp.runs.supervisor.base import SupervisorBase

log = logging.getLogger("backprop_mcp.runs.supervisor")

# How often a queued run retries admission: short, so a freed slot is taken within ~0.1 s.
QUEUE_POLL_SECONDS = 0.1
# After a storage error in the queue (full disk, lock timeout), retry this much later.
QUEUE_RETRY_SECONDS = 1.0
# A queued run's snapshot of the machine is reused this long: probing a GPU costs a subprocess.
QUEUE_SNAPSHOT_MAX_AGE = 1.0


class QueuedSupervisor(SupervisorBase):
    """The queue phase of a supervisor."""

    # -- queue ----------------------------------------------------------------------------------

    def queue(self) -> Decision | None:
        """Wait for admission; returns the decision, or None when the run must not start."""
        me = psutil.Process()
        timeout = self.settings.queue_timeout_minutes * 60
        began = time.monotonic()
        self._join(me)
        snapshot: SystemSnapshot | None = None
        taken = 0.0
        shown: tuple[int | None, tuple[str, ...], str | None] | None = None
        promise = self.limits["gpu_min_free_vram_mb"]
        reasons: tuple[str, ...] = ()
        while True:
            if self.stop_reason:
                self._release()
                self.finish_without_start("stopped", "stop_requested", "stopped while queued")
                return None
            if snapshot is None or time.monotonic() - taken > QUEUE_SNAPSHOT_MAX_AGE:
                snapshot, taken = self.probe.snapshot(), time.monotonic()
            current = snapshot

            def decide(active: list[Any], snap: SystemSnapshot = current) -> Decision:
                return decisions.evaluate(snap, self.limits, active, now=time.time())

            position: int | None = None
            try:
                admitted, decision, position = self.admission.try_admit(
                    self.run_id,
                    decide,
                    vram_promise_mb=promise,
                    owner=self.owner,
                    token=self.token,
                    ledger=str(self.ledger_file),
                )
            except (OSError, StoreError) as exc:
                # A full disk or a lock timeout must not kill a queued run: wait and try again.
                self._queue_failed(exc)
            else:
                self.queue_error = None
                if admitted:
                    # None: this run already held a slot (a retry after admission); decide again for the GPU.
                    return decision or decisions.evaluate(current, self.limits, [], now=time.time())
                if decision is None and position is None:
                    self._join(me)  # our ticket was lost: rejoin
                reasons = tuple(decision["reasons"]) if decision else ()
                if decision is not None and not self.settings.queue:
                    self._release()
                    self.finish_without_start("rejected", "rejected", "; ".join(reasons))
                    return None
            if (position, reasons, self.queue_error) != shown:
                shown = (position, reasons, self.queue_error)
                self.record["queue_position"] = position
                ahead = f"position {position} in the queue" if position else "in the queue"
                holds = [f"the run queue cannot be used: {self.queue_error}"] if self.queue_error else []
                holds += reasons
                self.record["status_detail"] = f"{ahead}: {'; '.join(holds)}" if holds else ahead
                self.write()
            if time.monotonic() - began >= timeout:
                self._release()
                waited = f"waited {timeout / 60:g} min in the queue"
                if self.queue_error:
                    detail = f"{waited}; the run queue could not be used: {self.queue_error}"
                    self.finish_without_start("failed", "queue_error", detail)
                else:
                    why = "; ".join(reasons) or "other runs ahead"
                    self.finish_without_start("rejected", "queue_timeout", f"{waited}: {why}")
                return None
            pause = QUEUE_RETRY_SECONDS if self.queue_error else QUEUE_POLL_SECONDS
            self._wait(min(pause, max(timeout - (time.monotonic() - began), 0.0)))

    def _queue_failed(self, exc: Exception) -> None:
        text = exc.message if isinstance(exc, BackpropError) else str(exc)
        if text != self.queue_error:  # once per distinct error, not once per retry
            log.warning("run %s: the run queue cannot be used (%s); retrying", self.run_id, text)
        self.queue_error = text

    def _release(self) -> None:
        """Give back this run's ticket or slot. A queue that cannot be used must not crash the
        supervisor here: the outcome still gets recorded, and the dead process's ticket or slot
        is dropped by the next admission that can read the queue."""
        try:
            self.admission.release(self.run_id, self.owner)
        except (OSError, StoreError) as exc:
            log.warning("run %s: could not release its place in the run queue (%s)", self.run_id, exc)

    def _join(self, me: psutil.Process) -> bool:
        try:
            self.admission.join(self.run_id, *self.owner)
        except (OSError, StoreError) as exc:
            self._queue_failed(exc)
            return False
        return True

    def finish_without_start(self, status: str, reason: str, detail: str) -> None:
        record = self.record
        record["termination_reason"] = reason
        record["ended_at"] = now_iso()
        record["queue_position"] = None
        self._close_attempt(status)
        self.set_state(status, detail, reason=reason)
