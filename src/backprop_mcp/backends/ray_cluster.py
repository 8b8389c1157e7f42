"""Talking to a Ray cluster's Jobs API for the ray backend: a client whose every request is bounded
in time, its failures turned into `ClusterError`s that say what failed, and the cluster's free
resources (the dashboard's `/api/cluster_status`, one request) against what a run needs.

Ray is imported here only, and only when a ray run is started or read: local runs never import it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, NamedTuple

from backprop_mcp.core.answers import ClusterNode, ClusterResources, ClusterView
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
# treated as not answering, so no read of a run ever hangs on it. BACKPROP_RAY_REQUEST_SECONDS
# overrides it (a far cluster on a slow link).
REQUEST_TIMEOUT_SECONDS = 20.0
# After a request to a cluster got no answer, this process's next requests to it fail at once for
# this long, saying so: a read of many ray runs (list, status) waits for one timeout, not for one
# per run and request.
QUIET_SECONDS = 10.0
VERSION_CHECK = "say its version"
ADDRESS_HINT = (
    "the address is the Ray dashboard's (its Jobs API: http://HOST:8265 unless `ray start "
    "--dashboard-port` chose another port), not the GCS port (6379) nor the Ray Client's ray:// "
    "port (10001); see docs/cluster.md"
)
SIZE_HINT = (
    "keep data, checkpoints and environments out of the run's working directory, or list them in "
    "its .gitignore or .rayignore (neither travels); or run from a smaller folder (--cwd)"
)
# The CPUs a run's job reserves on its node: the supervisor and the script's main process. A script
# that needs more asks Ray for them itself (its tasks and actors), as any Ray driver does.
JOB_CPUS = 1.0
GIB = 1024**3
TERMINAL_JOB_STATES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# The nodes a status shows (the freest first): an agent reads the answer, so it stays small however
# large the cluster; the totals cover every node.
MAX_VIEW_NODES = 8


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
_quiet: dict[str, tuple[float, str]] = {}


def request_seconds() -> float:
    try:
        value = float(os.environ.get("BACKPROP_RAY_REQUEST_SECONDS", ""))
    except ValueError:
        return REQUEST_TIMEOUT_SECONDS
    return value if 0 < value <= 3600 else REQUEST_TIMEOUT_SECONDS


def client(address: str) -> Any:
    """A Jobs API client of the cluster (one per address and process), every request bounded."""
    found = _clients.get(address)
    if found is not None:
        return found
    try:
        from ray.dashboard.modules.job import sdk
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise ClusterError(
            "the ray backend needs Ray's Jobs API: install the ray extra "
            "(pip install 'backprop-mcp[ray]', i.e. ray[default])"
        ) from None
    # The SDK reports each upload at INFO, and a large one with advice for Ray's own API: what
    # matters reaches the record, or the error, instead.
    logging.getLogger("ray.dashboard.modules.dashboard_sdk").setLevel(logging.WARNING)
    for name in ("ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    timeout = request_seconds()
    # Ray's client takes RAY_ADDRESS (or RAY_API_SERVER_ADDRESS) from this process's environment
    # over the address it is given: a run would go to another cluster than the one its settings and
    # its record name (--ray-address, ray.address, a server's option). Ours is always http(s)://.
    found_address = sdk.get_address_for_submission_client
    if not getattr(found_address, "as_given", False):

        def as_given(given: str | None) -> str:
            if isinstance(given, str) and given.startswith(("http://", "https://")):
                return given
            return str(found_address(given))

        as_given.as_given = True  # type: ignore[attr-defined]
        sdk.get_address_for_submission_client = as_given

    class BoundedClient(JobSubmissionClient):  # type: ignore[misc]
        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", timeout)
            return super()._do_request(method, endpoint, **kwargs)

    made = call(address, VERSION_CHECK, lambda: BoundedClient(address))
    _clients[address] = made
    return made


def call(address: str, what: str, action: Any) -> Any:
    """`action()`, its failure as a ClusterError that names the cluster and what was being done."""
    quiet = _quiet.get(address)
    if quiet is not None and time.monotonic() - quiet[0] < QUIET_SECONDS:
        raise Unreachable(quiet[1], hint=ADDRESS_HINT)
    try:
        return action()
    except ClusterError:
        raise
    except Exception as exc:  # the SDK raises RuntimeError, ConnectionError and requests' errors
        text = " ".join(str(exc).split())[:500] or type(exc).__name__
        if "status code 404" in text or "does not exist" in text:
            raise NotFound(f"the Ray cluster at {address} could not {what}: {text}") from None
        names = {type(exc).__name__, *(c.__name__ for c in type(exc).__mro__)}
        # An HTTP error is an answer (requests' errors are OSErrors too): only silence is unreachable.
        answered = "HTTPError" in names or "Version check returned" in text
        if what == VERSION_CHECK and answered:
            raise ClusterError(
                f"nothing at {address} is a Ray dashboard's Jobs API: it answered its version check "
                f"with {text}",
                hint=ADDRESS_HINT,
            ) from None
        if not answered and names & {"ConnectionError", "Timeout", "OSError"}:
            message = f"the Ray cluster at {address} does not answer (asked to {what}): {text}"
            _quiet[address] = (time.monotonic(), message)
            raise Unreachable(message, hint=ADDRESS_HINT) from None
        if "status code 413" in text:
            raise ClusterError(
                f"the Ray cluster at {address} refused the run's working directory as too large: {text}",
                hint=SIZE_HINT,
            ) from None
        raise ClusterError(f"the Ray cluster at {address} could not {what}: {text}") from None


def needs_of(settings: Settings, cluster_has_gpus: bool) -> Needs:
    """A run's reservation: one CPU, a GPU when it may use one and the cluster has any, and its
    minimum free RAM as memory."""
    gpus = 1.0 if settings.use_gpu and cluster_has_gpus else 0.0
    return Needs(JOB_CPUS, gpus, int(settings.min_free_ram_gb * GIB))


def free_by_node(address: str) -> list[dict[str, Any]]:
    """Each node's free and total resources (CPU, GPU, memory; `*_total`), its address (`node`) and
    whether it is the head, as the cluster last reported them."""
    conn = client(address)
    response = call(address, "report its resources", lambda: conn._do_request("GET", "/api/cluster_status"))
    try:
        report = response.json()["data"]["clusterStatus"]["loadMetricsReport"]["usageByNode"]
        nodes = []
        for node_id, usage in report.items():
            node: dict[str, Any] = {"node": str(node_id)[:16], "head": "node:InternalHead" in usage}
            for name in ("CPU", "GPU", "memory"):
                used, total = (float(usage[name][0]), float(usage[name][1])) if name in usage else (0.0, 0.0)
                node[name], node[f"{name}_total"] = total - used, total
            ips = [key[5:] for key in usage if key.startswith("node:") and key[5:6].isdigit()]
            node["node"] = ips[0][:64] if ips else node["node"]
            nodes.append(node)
        return nodes
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return []


def view(address: str) -> ClusterView:
    """The cluster's free and total resources, and its freest nodes (at most MAX_VIEW_NODES), for
    `backprop status` and get_status. A cluster that does not answer is said so, not raised."""
    error = None
    try:
        nodes = free_by_node(address)
        if not nodes:
            error = f"the Ray cluster at {address} has not reported its resources yet"
    except ClusterError as exc:
        nodes, error = [], exc.message
    nodes.sort(key=lambda n: (-n["CPU"], -n["GPU"], -n["memory"], n["node"]))

    def resources(of: list[dict[str, Any]]) -> ClusterResources:
        def total(key: str, scale: float = 1.0) -> float:
            return round(sum(float(n[key]) for n in of) / scale, 2)

        return ClusterResources(
            cpus_free=total("CPU"),
            cpus_total=total("CPU_total"),
            gpus_free=total("GPU"),
            gpus_total=total("GPU_total"),
            memory_free_gb=total("memory", GIB),
            memory_total_gb=total("memory_total", GIB),
        )

    shown = [ClusterNode(node=n["node"], head=n["head"], **resources([n])) for n in nodes[:MAX_VIEW_NODES]]
    return ClusterView(
        address=address,
        nodes=shown,
        nodes_left_out=len(nodes) - len(shown),
        error=error,
        **resources(nodes),
    )


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
