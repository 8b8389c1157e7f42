"""Talking to a Ray cluster's Jobs API for the ray backend: a client whose every request is bounded
in time, its failures turned into `ClusterError`s that say what failed, and the cluster's free
resources (the dashboard's `/api/cluster_status`, one request) against what a run needs.

Ray is imported here only, and only when a ray run is started or read: local runs never import it.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Any, NamedTuple

from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.errors import ClusterError
from backprop_mcp.core.records import RunRecord
from backprop_mcp.core.settings import Settings
from backprop_mcp.runs import joblog

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ENTRYPOINT = "python -m backprop_mcp.runs.supervisor.job"
# The share of a node's custom `node:IP` resource a stop job asks for, so that it runs on the node
# of the supervisor it signals.
NODE_SHARE = 0.001
# Every request to the Jobs API gives up after this: a head on the local network answers in
# milliseconds, and uploading a working_dir of some MB takes a few seconds; past this the cluster is
# treated as not answering, so no read of a run ever hangs on it.
REQUEST_TIMEOUT_SECONDS = 20.0
# The CPUs a run's job reserves on its node: the supervisor and the script's main process. A script
# that needs more asks Ray for them itself (its tasks and actors), as any Ray driver does.
JOB_CPUS = 1.0
GIB = 1024**3
TERMINAL_JOB_STATES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class Needs(NamedTuple):
    """What one run's job reserves on its node."""

    cpus: float
    gpus: float
    memory: int  # bytes

    def words(self) -> str:
        gpus = f", {self.gpus:g} GPU" if self.gpus else ""
        return f"{self.cpus:g} CPU{gpus} and {self.memory / GIB:.1f} GB memory"


class NotFound(ClusterError):
    """The cluster answered that it does not know the job."""


class Unreachable(ClusterError):
    """The cluster did not answer (refused, timed out): it may answer again later."""


_clients: dict[str, Any] = {}


def client(address: str) -> Any:
    """A Jobs API client of the cluster (one per address and process), every request bounded."""
    found = _clients.get(address)
    if found is not None:
        return found
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise ClusterError(
            "the ray backend needs Ray's Jobs API: install the ray extra "
            "(pip install 'backprop-mcp[ray]', i.e. ray[default])"
        ) from None
    # The SDK reports each upload at INFO on stderr; what matters reaches the record instead.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)

    class BoundedClient(JobSubmissionClient):  # type: ignore[misc]
        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", REQUEST_TIMEOUT_SECONDS)
            return super()._do_request(method, endpoint, **kwargs)

    made = call(address, "connect to", lambda: BoundedClient(address))
    _clients[address] = made
    return made


def call(address: str, what: str, action: Any) -> Any:
    """`action()`, its failure as a ClusterError that names the cluster and what was being done."""
    try:
        return action()
    except ClusterError:
        raise
    except Exception as exc:  # the SDK raises RuntimeError, ConnectionError and requests' errors
        text = " ".join(str(exc).split())[:500] or type(exc).__name__
        if "status code 404" in text or "does not exist" in text:
            raise NotFound(f"the Ray cluster at {address} could not {what}: {text}") from None
        names = {type(exc).__name__, *(c.__name__ for c in type(exc).__mro__)}
        if names & {"ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout", "OSError"}:
            raise Unreachable(f"the Ray cluster at {address} does not answer ({what}): {text}") from None
        raise ClusterError(f"the Ray cluster at {address} could not {what}: {text}") from None


def needs_of(settings: Settings, cluster_has_gpus: bool) -> Needs:
    """A run's reservation: one CPU, a GPU when it may use one and the cluster has any, and its
    minimum free RAM as memory."""
    gpus = 1.0 if settings.use_gpu and cluster_has_gpus else 0.0
    return Needs(JOB_CPUS, gpus, int(settings.min_free_ram_gb * GIB))


def free_by_node(address: str) -> list[dict[str, float]]:
    """Each node's free resources (CPU, GPU, memory; and GPU_total) as the cluster last reported them."""
    conn = client(address)
    response = call(address, "report its resources", lambda: conn._do_request("GET", "/api/cluster_status"))
    try:
        report = response.json()["data"]["clusterStatus"]["loadMetricsReport"]["usageByNode"]
        nodes = []
        for usage in report.values():
            node = {
                name: float(usage[name][1]) - float(usage[name][0])
                for name in ("CPU", "GPU", "memory")
                if name in usage
            }
            node["GPU_total"] = float(usage["GPU"][1]) if "GPU" in usage else 0.0
            nodes.append({"CPU": 0.0, "GPU": 0.0, "memory": 0.0, **node})
        return nodes
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return []


def fit(address: str, settings: Settings) -> tuple[list[str], Needs]:
    """Why the cluster cannot take the run now (nothing when it can), and what the run reserves."""
    nodes = free_by_node(address)
    needs = needs_of(settings, any(node["GPU_total"] > 0 for node in nodes))
    if not nodes:
        return [f"the Ray cluster at {address} has not reported its resources yet"], needs
    for node in nodes:
        if node["CPU"] >= needs.cpus and node["GPU"] >= needs.gpus and node["memory"] >= needs.memory:
            return [], needs
    best = max(nodes, key=lambda n: (n["CPU"], n["GPU"], n["memory"]))
    most = f"{best['CPU']:g} CPU, {best['GPU']:g} GPU, {best['memory'] / GIB:.1f} GB memory"
    return [f"no Ray node has {needs.words()} free (the freest has {most})"], needs


def submit_stop_job(
    address: str,
    home: Path,
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
        joblog.STORE_KEY_ENV: joblog.store_key(home),
        joblog.STORAGE_ENV: record["options"].get("ray_storage") or "",
    }
    conn = client(address)
    call(
        address,
        "take the stop job",
        lambda: conn.submit_job(
            entrypoint=f"{ENTRYPOINT} stop",
            submission_id=f"backprop-stop-{record['run_id']}-{record['attempt']}-{secrets.token_hex(4)}",
            runtime_env={"py_modules": [package()], "env_vars": env_vars},
            entrypoint_resources={f"node:{node}": NODE_SHARE},
            metadata={"backprop_run_id": record["run_id"], "backprop_stop": "1"},
        ),
    )


def package() -> str:
    """backprop_mcp's own folder: it travels with each job, so the cluster runs this very version."""
    import backprop_mcp

    return str(Path(backprop_mcp.__file__).parent)
