"""The ray backend (docs/cluster.md): each attempt of a run is a Ray job whose entrypoint is the
run's supervisor (`runs.supervisor.job`), so the time box, the stop sequence, the events and the
checkpoints behave on the cluster as they do here. No process of this machine follows the job: each
read of the run (`follow`) asks the Jobs API for the job's state and log, folds what the supervisor
printed into this store (`ray_fold`), submits a queued run once the cluster can take it, and ends
the run truthfully when its job is gone.

What this side keeps in the run's folder (`ray-job.json`): the attempt's job id and log token, how
far the job log was folded, the supervisor's process on its node, a stop that was asked for. What it
keeps in the governor's folder (`ray-runs/`): the runs of this store that hold a job, counted against
`maxParallel` under the run queue's lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from backprop_mcp.backends import ray_cluster
from backprop_mcp.backends.ray_cluster import TERMINAL_JOB_STATES, NotFound, Unreachable
from backprop_mcp.backends.ray_fold import fold, merge
from backprop_mcp.core.clock import age_seconds, now_iso
from backprop_mcp.core.errors import ClusterError, StoreError, UsageError
from backprop_mcp.core.files import replace_json
from backprop_mcp.core.machine import Decision
from backprop_mcp.core.records import ACTIVE_STATES, RunRecord
from backprop_mcp.core.settings import Settings
from backprop_mcp.core.store import Store
from backprop_mcp.governor.admission import Admission
from backprop_mcp.runs import joblog

STATE_FILE = "ray-job.json"
RUNS_FOLDER = "ray-runs"
ENTRYPOINT = "python -m backprop_mcp.runs.supervisor.job"
# A run whose submission has not been recorded yet is being submitted (by the starter, which may be
# uploading its working_dir), not lost, for this long.
SUBMIT_GRACE_SECONDS = 120.0
# A cluster that does not answer for this long (BACKPROP_RAY_SILENT_SECONDS overrides it) has lost
# the run as far as anyone can tell: a head that restarts answers again within a minute, and a head
# that is gone took its jobs with it (Ray ends every job of a cluster whose head dies).
SILENT_SECONDS = 120.0
# A graceful stop whose job still runs this long after its grace is stopped through Ray at once:
# the stop job normally reaches the supervisor within seconds.
STOP_BACKSTOP_SECONDS = 60.0
# The share of a node's custom `node:IP` resource a stop job asks for, so that it runs on the node
# of the supervisor it signals.
NODE_SHARE = 0.001


def settings_of(record: RunRecord) -> Settings:
    return Settings(**{k: v for k, v in record["options"].items() if k in Settings._fields})


def silent_seconds() -> float:
    try:
        value = float(os.environ.get("BACKPROP_RAY_SILENT_SECONDS", ""))
    except ValueError:
        return SILENT_SECONDS
    return value if 0 < value <= 86400 else SILENT_SECONDS


class RayBackend:
    """Runs as Ray jobs on the cluster whose Jobs API (dashboard) is at `address`."""

    name = "ray"

    def __init__(self, address: str | None) -> None:
        self.address = address or ray_cluster.DEFAULT_ADDRESS

    # -- admission and submission ----------------------------------------------------------------

    def decide(self, store: Store, settings: Settings) -> Decision:
        return self._decide(store, settings)[0]

    def _decide(self, store: Store, settings: Settings) -> tuple[Decision, ray_cluster.Needs]:
        live = _live_runs(store, None)
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
        state = {
            "attempt": record["attempt"],
            "state": "queued",
            "queued_at": time.time(),
            "relative": relative,
        }
        self._admit(store, record, state, first=True)

    def _admit(self, store: Store, record: RunRecord, state: dict[str, Any], *, first: bool) -> RunRecord:
        """Submit the attempt if the cluster and maxParallel allow it now, else leave it queued
        (or rejected, when the run may not queue). Under the run queue's lock, so two starters never
        both take the last place."""
        settings = settings_of(record)
        with Admission(store.governor_dir).exclusive():
            current = _read_state(store, record["run_id"])
            if not first and (current is None or current.get("state") != "queued"):
                return record  # another reader submitted it meanwhile
            try:
                decision, needs = self._decide(store, settings)
            except Unreachable as exc:
                if first:
                    raise
                decision = Decision(allowed=False, reasons=[exc.message], gpu=None, checks=[])
            if decision["allowed"]:
                self._submit_job(store, record, state, needs)
                return record
        if not settings.queue:
            _end(store, record, "rejected", "rejected", "; ".join(decision["reasons"]))
            return record
        _write_state(store, record["run_id"], state)
        detail = f"in the queue: {'; '.join(decision['reasons'])}"
        if record["status_detail"] != detail:
            record["status_detail"] = detail
            store.write(record, index=False)
        return record

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
                entrypoint=f"{ENTRYPOINT} run",
                submission_id=f"backprop-{run_id}-{attempt}-{token[:8]}",
                runtime_env={"working_dir": record["cwd"], "py_modules": [_package()], "env_vars": env_vars},
                entrypoint_num_cpus=needs.cpus,
                entrypoint_num_gpus=needs.gpus or None,
                entrypoint_memory=needs.memory or None,
                metadata={"backprop_run_id": run_id, "backprop_attempt": str(attempt)},
            ),
        )
        state.update(state="submitted", job_id=job_id, token=token, consumed=0, submitted_at=time.time())
        _write_state(store, run_id, state)
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
        state = _read_state(store, run_id)
        if state is None or state.get("attempt") != record["attempt"]:
            if age_seconds(record["updated_at"]) < SUBMIT_GRACE_SECONDS:
                return record
            return _end(
                store, record, "lost", "supervisor_lost", "its submission to the Ray cluster never completed"
            )
        if state["state"] == "queued":
            settings = settings_of(record)
            if time.time() - float(state["queued_at"]) >= settings.queue_timeout_minutes * 60:
                waited = f"waited {settings.queue_timeout_minutes:g} min in the queue"
                return _end(
                    store, record, "rejected", "queue_timeout", f"{waited}: {record['status_detail']}"
                )
            try:
                return self._admit(store, record, state, first=False)
            except ClusterError as exc:  # refused for good (a working_dir too large, a bad runtime env)
                return _end(store, record, "failed", "start_failed", exc.message)
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
            return _end(store, record, "lost", "supervisor_lost", why)
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
        _write_state(store, record["run_id"], state)
        store.write(record, index=record["status"] != was)
        if record["status"] not in ACTIVE_STATES:
            (store.governor_dir / RUNS_FOLDER / f"{record['run_id']}.json").unlink(missing_ok=True)

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
            return _end(store, record, "stopped", reason, why)
        if status == "STOPPED":
            why = (
                f"its Ray job {job_id} was stopped on the cluster (`ray job stop`) before the supervisor "
                "recorded the end"
            )
            return _end(store, record, "stopped", "stop_requested", why)
        why = f"its Ray job {job_id} ended {status} before the supervisor recorded the end" + (
            f": {words}" if words else ""
        )
        return _end(store, record, "lost", "supervisor_lost", why)

    def _silent(self, store: Store, record: RunRecord, state: dict[str, Any], exc: ClusterError) -> RunRecord:
        """The cluster did not answer: say so, and after `silent_seconds` end the run as lost."""
        now = time.time()
        since = state.get("silent_since") or now
        if now - since >= silent_seconds():
            why = (
                f"the Ray cluster has not answered for {now - since:.0f} s, so its job {state['job_id']} "
                f"is presumed gone: {exc.message}"
            )
            return _end(store, record, "lost", "supervisor_lost", why)
        if state.get("silent_since") is None:
            state["silent_since"] = since
            _write_state(store, record["run_id"], state)
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
            state = _read_state(store, run_id)
            if record["status"] not in ACTIVE_STATES:
                return
            if (
                state is None
                or state.get("state") != "submitted"
                or state.get("attempt") != record["attempt"]
            ):
                reason = "pruned" if pruned else "stop_requested"
                _end(
                    store,
                    record,
                    "stopped",
                    reason,
                    "stopped while queued: it was never sent to the Ray cluster",
                )
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
                self._stop_job(store, record, state, node, force=force, pruned=pruned)
            state["stop"] = {"force": force, "at": time.time(), "pruned": pruned}
            _write_state(store, run_id, state)

    def _stop_job(
        self,
        store: Store,
        record: RunRecord,
        state: dict[str, Any],
        node: str,
        *,
        force: bool,
        pruned: str | None,
    ) -> None:
        """A small job on the supervisor's node that leaves the stop request and signals it."""
        pid, started = state["supervisor"]
        request = {
            "run_id": record["run_id"],
            "attempt": record["attempt"],
            "pid": pid,
            "started": started,
            "force": force,
            "pruned": pruned,
            "at": now_iso(),
        }
        env_vars = {
            joblog.STOP_ENV: json.dumps(request),
            joblog.STORE_KEY_ENV: joblog.store_key(store.home),
            joblog.STORAGE_ENV: settings_of(record).ray_storage or "",
        }
        conn = ray_cluster.client(self.address)
        ray_cluster.call(
            self.address,
            "take the stop job",
            lambda: conn.submit_job(
                entrypoint=f"{ENTRYPOINT} stop",
                submission_id=f"backprop-stop-{record['run_id']}-{record['attempt']}-{secrets.token_hex(4)}",
                runtime_env={"py_modules": [_package()], "env_vars": env_vars},
                entrypoint_resources={f"node:{node}": NODE_SHARE},
                metadata={"backprop_run_id": record["run_id"], "backprop_stop": "1"},
            ),
        )


def _package() -> str:
    """backprop_mcp's own folder: it travels with each job, so the cluster runs this very version."""
    import backprop_mcp

    return str(Path(backprop_mcp.__file__).parent)


def _read_state(store: Store, run_id: str) -> dict[str, Any] | None:
    try:
        data = json.loads((store.run_dir(run_id) / STATE_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_state(store: Store, run_id: str, state: dict[str, Any]) -> None:
    replace_json(store.run_dir(run_id) / STATE_FILE, state)


def _live_runs(store: Store, other_than: str | None) -> int:
    """Ray runs of this store that hold a job and are not known to have ended."""
    folder = store.governor_dir / RUNS_FOLDER
    live = 0
    for path in folder.glob("*.json") if folder.is_dir() else ():
        run_id = path.stem
        try:
            status = store.read(run_id)["status"]
        except Exception:  # a run removed or unreadable holds no place
            status = None
        if status in ACTIVE_STATES:
            live += run_id != other_than
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return live


def _end(store: Store, record: RunRecord, status: str, reason: str, why: str) -> RunRecord:
    """End the run's current attempt here, with its reason (the cluster could not say it)."""
    record["status"], record["termination_reason"], record["status_detail"] = status, reason, why
    record["ended_at"] = now_iso()
    record["queue_position"] = None
    record["attempts"][-1].update(
        {
            "status": status,
            "termination_reason": reason,
            "ended_at": record["ended_at"],
            "step": record["step"],
            "loss": record["loss"],
        }
    )
    store.write(record)
    with contextlib.suppress(StoreError):
        store.append_event(record["run_id"], {"type": "state", "status": status, "detail": why})
    (store.governor_dir / RUNS_FOLDER / f"{record['run_id']}.json").unlink(missing_ok=True)
    return record
