"""The queue waiter of a ray run (docs/cluster.md): `python -m backprop_mcp.backends.ray_waiter
HOME RUN_ID ATTEMPT --await-go`, started detached by `RayBackend.submit` when the cluster cannot
take the run yet. It holds the run's place in the store's ray queue (FIFO), asks the cluster at the
sample interval, submits the job once the run heads the queue and fits (maxParallel included), or
ends the run `rejected` at its queue timeout, and exits. So a queued ray run advances with nobody
reading it, as a local run's queued supervisor does.

It acts on the run only under the run's lock and only while the run's `ray-job.json` names it as
the waiter of a queued attempt: a read, a stop or a second waiter racing it never submits twice.
A waiter that dies leaves the run `lost` at its next read (`RayBackend.follow`), which says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from backprop_mcp.backends.ray import RayBackend
from backprop_mcp.backends.ray_cluster import Unreachable
from backprop_mcp.backends.ray_state import end_attempt, ray_queue, read_state, settings_of, show_place
from backprop_mcp.core.errors import ClusterError, StoreError
from backprop_mcp.core.records import ACTIVE_STATES
from backprop_mcp.core.store import Store
from backprop_mcp.governor import proctree
from backprop_mcp.governor.admission import Admission
from backprop_mcp.runs import detached
from backprop_mcp.runs.launch import AWAIT_GO_FLAG, HELD_SIGNALS
from backprop_mcp.runs.supervisor.base import sample_interval

log = logging.getLogger("backprop_mcp.backends.ray_waiter")

# The ray queue's lock is held through one cluster check and, for the run at the head, its job's
# submission (a working_dir upload: seconds). A waiter that cannot take it this soon tries again at
# its next look instead of holding its own run's lock (and that run's readers) any longer.
QUEUE_LOCK_SECONDS = 10.0


class Waiter:
    """One queued attempt of one ray run, waiting for the cluster."""

    def __init__(self, store: Store, run_id: str, attempt: int) -> None:
        self.store, self.run_id, self.attempt = store, run_id, attempt
        self.me = (os.getpid(), proctree.start_time(os.getpid()) or 0.0)
        self.queue: Admission = ray_queue(store, lock_timeout=QUEUE_LOCK_SECONDS)
        self.stopping = threading.Event()

    def run(self) -> int:
        for sig in HELD_SIGNALS:  # a stop (or the end of the run) makes it give its place up
            signal.signal(sig, lambda *_: self.stopping.set())
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        interval = sample_interval()
        try:
            while not self.stopping.is_set() and self.look():
                self.stopping.wait(interval)
        finally:
            self._give_up_place()
        return 0

    def _give_up_place(self) -> None:
        """Leave the ray queue; before ending the run (the final record is the last change a
        reader may see), and again on the way out (a no-op by then)."""
        with contextlib.suppress(OSError, StoreError):
            self.queue.release(self.run_id, self.me)

    def look(self) -> bool:
        """One look at the cluster for the run; False once there is nothing left to wait for."""
        with contextlib.suppress(StoreError, ValueError, KeyError):  # the look below says what is wrong
            record = self.store.read(self.run_id)
            RayBackend(record["options"].get("ray_address")).settle(self.store, settings_of(record))
        with self.store.run_lock(self.run_id):
            record = self.store.read(self.run_id)
            state = read_state(self.store, self.run_id)
            if (
                record["status"] not in ACTIVE_STATES
                or record["attempt"] != self.attempt
                or state is None
                or state.get("attempt") != self.attempt
                or state.get("state") != "queued"
                or (state.get("waiter") or [None])[0] != self.me[0]
            ):
                return False  # submitted, stopped or ended meanwhile, or another waiter's
            settings = settings_of(record)
            waited = time.time() - float(state["queued_at"])
            if waited >= settings.queue_timeout_minutes * 60:
                why = f"waited {settings.queue_timeout_minutes:g} min in the queue: {record['status_detail']}"
                self._give_up_place()
                end_attempt(self.store, record, "rejected", "queue_timeout", why)
                return False
            backend = RayBackend(settings.ray_address)
            position = record["queue_position"]
            try:
                submitted, reasons, position = backend.try_submit(
                    self.store, record, state, self.me, self.queue
                )
            except (Unreachable, StoreError) as exc:  # it may answer, or the lock be free, next time
                reasons = [exc.message]
            except ClusterError as exc:  # refused for good (a working_dir too large, a bad runtime env)
                self._give_up_place()
                end_attempt(self.store, record, "failed", "start_failed", exc.message)
                return False
            else:
                if submitted:
                    log.info(
                        "run %s: submitted to the Ray cluster as job %s", self.run_id, record.get("job_id")
                    )
                    return False
                if position is None:  # its ticket was dropped (a queue file moved aside): join again
                    with contextlib.suppress(OSError, StoreError):
                        self.queue.join(self.run_id, *self.me)
            show_place(self.store, record, position, reasons)
            return True


def _named_by_starter(store: Store, run_id: str) -> bool:
    """True when the run's ray state, which the starter writes before the go, names this process."""
    state = read_state(store, run_id)
    return bool(state and (state.get("waiter") or [None])[0] == os.getpid())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if len(args) != 4 or args[3] != AWAIT_GO_FLAG or not args[2].isdigit():
        print(
            f"usage: python -m backprop_mcp.backends.ray_waiter HOME RUN_ID ATTEMPT {AWAIT_GO_FLAG}",
            file=sys.stderr,
        )
        return 2
    store, run_id = Store(Path(args[0])), args[1]
    if not detached.await_go(lambda: _named_by_starter(store, run_id)):
        return 0
    try:
        return Waiter(store, run_id, int(args[2])).run()
    except Exception as exc:  # its record must say why it stopped waiting; the next read does (lost)
        log.error("run %s: the queue waiter failed: %s", run_id, exc)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
