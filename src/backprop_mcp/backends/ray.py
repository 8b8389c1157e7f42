"""The ray backend (docs/cluster.md): each attempt of a run is a Ray job whose entrypoint is the
run's supervisor (`runs.supervisor.job`), so the time box, the stop sequence, the events and the
checkpoints behave on the cluster as they do here. No process of this machine follows the job: each
read of the run (`follow`) asks the Jobs API for the job's state and log, folds what the supervisor
printed into this store (`ray_fold`), and ends the run truthfully when its job is gone. A run the
cluster cannot take yet waits in the store's ray queue, held by a small local process
(`ray_waiter`) that submits it once the cluster can. What this side keeps: `ray_state`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import secrets
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from backprop_mcp.backends import ray_cluster
from backprop_mcp.backends.local import abandon, release
from backprop_mcp.backends.ray_cluster import TERMINAL_JOB_STATES, NotFound
from backprop_mcp.backends.ray_fold import SUPERVISOR_LOG, fold, merge
from backprop_mcp.backends.ray_state import (
    RUNS_FOLDER,
    end_attempt,
    live_runs,
    ray_queue,
    read_state,
    settings_of,
    show_place,
    silent_seconds,
    write_state,
)
from backprop_mcp.core.answers import ClusterView
from backprop_mcp.core.clock import age_seconds, now_iso
from backprop_mcp.core.errors import BackpropError, ClusterError, RunStateError, StoreError, UsageError
from backprop_mcp.core.files import replace_json
from backprop_mcp.core.machine import Decision
from backprop_mcp.core.records import ACTIVE_STATES, RunRecord
from backprop_mcp.core.settings import Settings
from backprop_mcp.core.store import Store
from backprop_mcp.governor import proctree
from backprop_mcp.governor.admission import Admission
from backprop_mcp.runs import detached, joblog
from backprop_mcp.runs.launch import AWAIT_GO_FLAG

log = logging.getLogger(__name__)
WAITER_MODULE = "backprop_mcp.backends.ray_waiter"
# A waiter told to abandon its start exits as soon as its interpreter is up.
WAITER_ABANDON_SECONDS = 30.0
# A run whose submission has not been recorded yet is being submitted (by the starter, which may be
# uploading its working_dir), not lost, for this long.
SUBMIT_GRACE_SECONDS = 120.0
# Never sent with the working directory, on top of what its .gitignore and .rayignore exclude: a
# repository's history is often the largest part of a project and no script trains on it.
WORKING_DIR_EXCLUDES = (".git",)
# A graceful stop whose job still runs this long after its grace is stopped through Ray at once:
# the stop job normally reaches the supervisor within seconds.
STOP_BACKSTOP_SECONDS = 60.0


class RayBackend:
    """Runs as Ray jobs on the cluster whose Jobs API (dashboard) is at `address`."""

    name = "ray"

    def __init__(self, address: str | None) -> None:
        self.address = address or ray_cluster.DEFAULT_ADDRESS

    # -- admission and submission ----------------------------------------------------------------

    def settle(self, store: Store, settings: Settings) -> None:
        """Fold the runs of this store whose jobs ended on the cluster since anyone last read them,
        when they fill maxParallel: nobody may be reading them (a run started detached, an agent
        that stopped polling), and a queued run must not wait for their records to catch up."""
        live = live_runs(store)
        if len(live) < settings.max_parallel:
            return
        for run_id in live:
            with store.run_lock(run_id, blocking=False) as held:
                if not held:
                    continue  # it is being read, and so folded, right now
                with contextlib.suppress(BackpropError):
                    record = store.read(run_id)
                    if record["status"] not in ACTIVE_STATES or "job_id" not in record:
                        continue
                    backend = RayBackend(record["options"].get("ray_address"))
                    ask = functools.partial(
                        ray_cluster.client(backend.address).get_job_info, record["job_id"]
                    )
                    info = ray_cluster.call(backend.address, "tell the job's state", ask)
                    if str(getattr(info.status, "value", info.status)) in TERMINAL_JOB_STATES:
                        backend.follow(store, record)

    def decide(self, store: Store, settings: Settings) -> Decision:
        self.settle(store, settings)
        decision = self._decide(store, settings)[0]
        waiting = len(ray_queue(store).queued())
        if waiting:  # FIFO: a new run would wait behind them, whatever the cluster has free now
            decision["allowed"] = False
            decision["reasons"].append(f"{waiting} ray run(s) of this store wait in the ray queue")
        return decision

    def overview(
        self, store: Store, settings: Settings
    ) -> tuple[ClusterView, list[str], list[str], Decision]:
        cluster = ray_cluster.view(self.address)
        try:
            verdict = self.decide(store, settings)
        except ClusterError as exc:
            verdict = Decision(allowed=False, reasons=[exc.message], gpu=None, checks=[])
        return cluster, live_runs(store), ray_queue(store).queued(), verdict

    def _decide(self, store: Store, settings: Settings) -> tuple[Decision, ray_cluster.Needs]:
        live = len(live_runs(store))
        reasons, needs = ray_cluster.fit(self.address, settings)
        if live >= settings.max_parallel:
            reasons.append(f"{live} ray runs of this store live; maxParallel is {settings.max_parallel}")
        checks = [f"the run reserves {needs.words()} on a node of the Ray cluster at {self.address}"]
        return Decision(allowed=not reasons, reasons=reasons, gpu=None, checks=checks), needs

    def submit(self, store: Store, run_id: str, env: Mapping[str, str]) -> None:
        record = store.read(run_id)
        script = Path(record["script"])
        relative = os.path.relpath(script, record["cwd"])
        if relative.startswith(os.pardir):
            raise UsageError(
                f"the script {script} lies outside the run's working directory {record['cwd']}; with the "
                "ray backend only the working directory travels to the cluster",
                hint="run it from a folder that holds it (--cwd), see docs/cluster.md",
            )
        if record["python_source"] == "option":
            raise UsageError(
                "--python (python) chooses an interpreter of this machine; a ray run's script runs "
                "with the python of the Ray cluster that runs its job (docs/cluster.md)"
            )
        _capture(store, record, env)
        state = {
            "attempt": record["attempt"],
            "state": "queued",
            "queued_at": time.time(),
            "relative": relative,
        }
        # The run takes its place in the store's ray queue now (FIFO, as local runs do in theirs):
        # for this process while it tries, then for the waiter that holds it while it waits.
        self.settle(store, settings_of(record))
        queue = ray_queue(store)
        me = (os.getpid(), proctree.start_time(os.getpid()) or 0.0)
        queue.join(run_id, *me)
        try:
            submitted, reasons, position = self.try_submit(store, record, state, me, queue)
            if submitted:
                return
            if not settings_of(record).queue:
                with contextlib.suppress(OSError, StoreError):
                    queue.release(run_id, me)  # before the final record (see `end_attempt`)
                end_attempt(store, record, "rejected", "rejected", "; ".join(reasons))
                return
            self._spawn_waiter(store, record, state, queue, env)
            show_place(store, record, position, reasons)
        finally:
            with contextlib.suppress(OSError, StoreError):
                queue.release(run_id, me)  # this process's ticket or slot; the waiter's stays

    def try_submit(
        self,
        store: Store,
        record: RunRecord,
        state: dict[str, Any],
        owner: tuple[int, float],
        queue: Admission,
    ) -> tuple[bool, list[str], int | None]:
        """Submit the attempt if it heads the store's ray queue and the cluster and maxParallel
        allow it now, all under the queue's lock (two processes never both take the last place);
        else (False, why it waits, its place in the queue). Raises what the submission raised."""
        settings = settings_of(record)
        found: list[Decision] = []

        def decide(_active: object) -> Decision:
            decision, needs = self._decide(store, settings)
            found.append(decision)
            if decision["allowed"]:
                self._submit_job(store, record, state, needs)
            return decision

        admitted, _, position = queue.try_admit(record["run_id"], decide, vram_promise_mb=0.0, owner=owner)
        if admitted:
            # The slot only marked the moment of submission: the job itself holds the place now.
            queue.release(record["run_id"], owner)
            return True, [], None
        if found:
            return False, found[0]["reasons"], position
        if position is None:
            return False, ["its place in the ray queue was lost; it joins again"], None
        return False, [f"{position - 1} earlier ray run(s) of this store wait ahead of it"], position

    def _spawn_waiter(
        self, store: Store, record: RunRecord, state: dict[str, Any], queue: Admission, env: Mapping[str, str]
    ) -> None:
        """Start the run's waiter (`backends.ray_waiter`), a detached process that holds its place in
        the queue and submits it once the cluster can take it, all or nothing."""
        run_id = record["run_id"]
        args = [str(store.home), run_id, str(record["attempt"]), AWAIT_GO_FLAG]
        try:
            proc = detached.spawn(WAITER_MODULE, args, store.run_dir(run_id) / SUPERVISOR_LOG, env)
        except OSError as exc:
            raise StoreError(f"could not start the queue waiter of run {run_id}: {exc}") from None
        try:
            started = proctree.start_time(proc.pid)
            if started is None:
                raise StoreError(f"the queue waiter of run {run_id} ended as it started")
            state["waiter"] = [proc.pid, started]
            write_state(store, run_id, state)  # what names the waiter, should this process die now
            queue.join(run_id, proc.pid, started)  # the place this process took becomes the waiter's
            release(proc)
        except BaseException:
            abandon(proc, WAITER_ABANDON_SECONDS)
            raise

    def _submit_job(
        self, store: Store, record: RunRecord, state: dict[str, Any], needs: ray_cluster.Needs
    ) -> None:
        run_id, attempt = record["run_id"], record["attempt"]
        token = secrets.token_hex(8)
        sent = {**record, "script": state["relative"]}
        env_vars = {
            joblog.MARK_ENV: token,
            joblog.RECORD_ENV: json.dumps(sent, separators=(",", ":")),
            joblog.STORE_KEY_ENV: joblog.store_key(store.home),
            joblog.STORAGE_ENV: settings_of(record).ray_storage or "",
        }
        conn = ray_cluster.client(self.address)
        job_id = ray_cluster.call(
            self.address,
            "take the run's job",
            lambda: conn.submit_job(
                entrypoint=f"{ray_cluster.ENTRYPOINT} run",
                submission_id=f"backprop-{run_id}-{attempt}-{token[:8]}",
                runtime_env={
                    "working_dir": record["cwd"],
                    "excludes": list(WORKING_DIR_EXCLUDES),
                    "py_modules": [ray_cluster.package()],
                    "env_vars": env_vars,
                },
                entrypoint_num_cpus=needs.cpus,
                entrypoint_num_gpus=needs.gpus or None,
                entrypoint_memory=needs.memory or None,
                metadata={"backprop_run_id": run_id, "backprop_attempt": str(attempt)},
            ),
        )
        state.update(state="submitted", job_id=job_id, token=token, consumed=0, submitted_at=time.time())
        write_state(store, run_id, state)
        (store.governor_dir / RUNS_FOLDER).mkdir(mode=0o700, parents=True, exist_ok=True)
        replace_json(store.governor_dir / RUNS_FOLDER / f"{run_id}.json", {"job_id": job_id})
        record["job_id"] = job_id
        record["status_detail"] = f"submitted as Ray job {job_id}; waiting for the cluster to start it"
        store.write(record, index=False)

    # -- following -------------------------------------------------------------------------------

    def follow(self, store: Store, record: RunRecord) -> RunRecord:
        run_id = record["run_id"]
        if record["status"] not in ACTIVE_STATES:
            return record
        state = read_state(store, run_id)
        if state is None or state.get("attempt") != record["attempt"]:
            if age_seconds(record["updated_at"]) < SUBMIT_GRACE_SECONDS:
                return record
            return end_attempt(
                store, record, "lost", "supervisor_lost", "its submission to the Ray cluster never completed"
            )
        if state["state"] == "queued":
            waiter = state.get("waiter")
            if isinstance(waiter, list) and proctree.is_alive(waiter[0], waiter[1]):
                return record  # its waiter submits it (or ends it) on its own
            return end_attempt(
                store,
                record,
                "lost",
                "supervisor_lost",
                "its queue waiter died while the run waited for the Ray cluster; nothing was submitted",
            )
        conn_error: ClusterError | None = None
        try:
            conn = ray_cluster.client(self.address)
            info = ray_cluster.call(
                self.address, "tell the job's state", lambda: conn.get_job_info(state["job_id"])
            )
            text = ray_cluster.call(
                self.address, "give the job's log", lambda: conn.get_job_logs(state["job_id"])
            )
        except NotFound as exc:
            why = (
                f"the Ray cluster no longer knows its job {state['job_id']} (was its head restarted?): "
                + exc.message
            )
            return end_attempt(store, record, "lost", "supervisor_lost", why)
        except ClusterError as exc:
            conn_error = exc
        if conn_error is not None:
            return self._silent(store, record, state, conn_error)
        status = str(getattr(info.status, "value", info.status))
        final = status in TERMINAL_JOB_STATES
        folded = fold(store, record, text, int(state.get("consumed", 0)), state["token"], final=final)
        state.update(consumed=folded.consumed, silent_since=None)
        if folded.supervisor is not None:
            state["supervisor"] = list(folded.supervisor)
        if info.driver_agent_http_address:
            state["node_ip"] = urlsplit(info.driver_agent_http_address).hostname
        was = record["status"]
        if folded.record is not None:
            record = merge(record, folded.record)
        if status == "PENDING" and record["status"] == "queued":
            record["status_detail"] = (
                f"submitted as Ray job {state['job_id']}; the cluster has not placed it yet"
            )
        if final and record["status"] in ACTIVE_STATES:
            self._write(store, record, state, was)
            return self._job_ended(store, record, state, status, info.message or "")
        self._backstop(state, status, record)
        self._write(store, record, state, was)
        return record

    def _write(self, store: Store, record: RunRecord, state: dict[str, Any], was: str) -> None:
        write_state(store, record["run_id"], state)
        if record["status"] not in ACTIVE_STATES:  # before the final record (see `end_attempt`)
            (store.governor_dir / RUNS_FOLDER / f"{record['run_id']}.json").unlink(missing_ok=True)
        store.write(record, index=record["status"] != was)

    def _job_ended(
        self, store: Store, record: RunRecord, state: dict[str, Any], status: str, message: str
    ) -> RunRecord:
        """The job ended before its supervisor recorded the run's end (killed on the cluster)."""
        job_id, stop = state["job_id"], state.get("stop") or {}
        words = " ".join(message.split())[:300]
        if status == "STOPPED" and stop:
            reason = "pruned" if stop.get("pruned") else "stop_requested"
            how = "a forced stop" if stop.get("force") else "a stop"
            why = f"its Ray job {job_id} was stopped by {how} before the supervisor recorded the end"
            return end_attempt(store, record, "stopped", reason, why)
        if status == "STOPPED":
            why = (
                f"its Ray job {job_id} was stopped on the cluster (`ray job stop`) before the supervisor "
                "recorded the end"
            )
            return end_attempt(store, record, "stopped", "stop_requested", why)
        why = f"its Ray job {job_id} ended {status} before the supervisor recorded the end" + (
            f": {words}" if words else ""
        )
        return end_attempt(store, record, "lost", "supervisor_lost", why)

    def _silent(self, store: Store, record: RunRecord, state: dict[str, Any], exc: ClusterError) -> RunRecord:
        """The cluster did not answer: say so, and after `silent_seconds` end the run as lost."""
        now = time.time()
        since = state.get("silent_since") or now
        if now - since >= silent_seconds():
            why = (
                f"the Ray cluster has not answered for {now - since:.0f} s, so its job {state['job_id']} "
                f"is presumed gone: {exc.message}"
            )
            return end_attempt(store, record, "lost", "supervisor_lost", why)
        if state.get("silent_since") is None:
            state["silent_since"] = since
            write_state(store, record["run_id"], state)
            record["status_detail"] = (
                f"{exc.message} (since {now_iso(since)}); the run is ended as lost after "
                f"{silent_seconds():g} s of this"
            )
            store.write(record, index=False)
        return record

    def _backstop(self, state: dict[str, Any], status: str, record: RunRecord) -> None:
        stop = state.get("stop")
        if not stop or stop.get("escalated") or status != "RUNNING":
            return
        if time.time() - float(stop["at"]) >= settings_of(record).grace_seconds + STOP_BACKSTOP_SECONDS:
            stop["escalated"] = True
            conn = ray_cluster.client(self.address)
            with contextlib.suppress(ClusterError):
                ray_cluster.call(self.address, "stop the job", lambda: conn.stop_job(state["job_id"]))

    # -- stopping --------------------------------------------------------------------------------

    def stop(self, store: Store, record: RunRecord, *, force: bool, pruned: str | None) -> None:
        run_id = record["run_id"]
        with store.run_lock(run_id):
            record = store.read(run_id)
            state = read_state(store, run_id)
            if record["status"] not in ACTIVE_STATES:
                return
            if state is None or state.get("attempt") != record["attempt"]:
                # Its starter is submitting it right now (outside the run's lock): ending it here
                # would leave the job it is about to submit running for a stopped run.
                raise RunStateError(f"run {run_id} is still being submitted; try again in a moment")
            if state.get("state") != "submitted":
                reason = "pruned" if pruned else "stop_requested"
                waiter = state.get("waiter")
                if isinstance(waiter, list) and len(waiter) == 2:
                    # Its waiter's place goes before the final record (see `end_attempt`).
                    with contextlib.suppress(OSError, StoreError, ValueError):
                        ray_queue(store).release(run_id, (waiter[0], waiter[1]))
                end_attempt(
                    store,
                    record,
                    "stopped",
                    reason,
                    "stopped while queued: it was never sent to the Ray cluster",
                )
                if isinstance(waiter, list) and proctree.is_alive(waiter[0], waiter[1]):
                    # It would see the end at its next look; told now, it gives its place up at once.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(waiter[0], signal.SIGTERM)
                return
            conn = ray_cluster.client(self.address)
            info = ray_cluster.call(
                self.address, "tell the job's state", lambda: conn.get_job_info(state["job_id"])
            )
            status = str(getattr(info.status, "value", info.status))
            supervisor = state.get("supervisor")
            node = state.get("node_ip") or (urlsplit(info.driver_agent_http_address or "").hostname)
            if force or status != "RUNNING" or not supervisor or not node:
                ray_cluster.call(self.address, "stop the job", lambda: conn.stop_job(state["job_id"]))
            else:
                ray_cluster.submit_stop_job(
                    self.address, store.home, record, state, node, force=force, pruned=pruned
                )
            state["stop"] = {"force": force, "at": time.time(), "pruned": pruned}
            write_state(store, run_id, state)


def _capture(store: Store, record: RunRecord, env: Mapping[str, str]) -> None:
    """The attempt's code, captured here where the project's .git is (its job does not): a
    failure is logged, never the submission's end."""
    from backprop_mcp.runs import provenance

    try:
        provenance.keep(record, provenance.capture(store, record, env, ask_python=False))
        store.write(record, index=False)
    except (OSError, StoreError) as exc:
        log.warning("run %s: its code snapshot could not be kept: %s", record["run_id"], exc)
