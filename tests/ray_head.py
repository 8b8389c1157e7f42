"""A real Ray head for the ray backend's tests: started on loopback on free ports with its own temp
folder, and stopped by its own processes (never `ray stop`, which stops every Ray on the machine)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import psutil

from tests.helpers import wait_until

# `ray start` takes ~5 s on an idle machine; a loaded 2-core CI runner may take several times that.
START_SECONDS = 180.0
# A head reports its nodes' resources to the dashboard every few seconds after it starts.
REPORT_SECONDS = 120.0
# A head's processes are gone this long after SIGKILL (zombies are reaped by their parents).
STOP_SECONDS = 30.0


class Head(NamedTuple):
    address: str  # the Jobs API (dashboard), http://127.0.0.1:PORT
    temp_dir: Path
    session: int  # the session of `ray start`, which every daemon of the head inherits


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def ray_command() -> Path:
    return Path(sys.executable).with_name("ray")


def start_head(cpus: int = 2) -> Head:
    """Start a head and wait until its dashboard reports the node's resources."""
    # Short: Ray's Unix socket paths under it must stay within the 107 bytes Linux allows.
    temp_dir = Path(tempfile.mkdtemp(prefix="bpray-", dir="/tmp"))
    gcs, dashboard, client, agent = _free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKPROP_", "RAY_"))}
    # The job's entrypoint runs `python`: this interpreter's, which has backprop's dependencies.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    command = [
        str(ray_command()),
        "start",
        "--head",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--num-cpus={cpus}",
        "--num-gpus=0",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    head = Head(f"http://127.0.0.1:{dashboard}", temp_dir, proc.pid)
    try:
        out, _ = proc.communicate(timeout=START_SECONDS)
        if proc.returncode != 0:
            raise RuntimeError(
                f"ray start failed ({proc.returncode}): {out.decode(errors='replace')[-3000:]}"
            )
        wait_until(
            lambda: _reports_resources(head.address), timeout=REPORT_SECONDS, what="the Ray head's resources"
        )
    except BaseException:
        stop_head(head)
        raise
    return head


def _reports_resources(address: str) -> bool:
    try:
        # The address is the http:// one this module built.
        with urllib.request.urlopen(f"{address}/api/cluster_status", timeout=5) as response:  # noqa: S310
            data = json.load(response)
        return bool(data["data"]["clusterStatus"]["loadMetricsReport"]["usageByNode"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def head_processes(head: Head) -> list[psutil.Process]:
    """The head's daemons (its session) and what its jobs run (their working folders are in its
    temp folder), with all their descendants."""
    found: dict[int, psutil.Process] = {}
    root = str(head.temp_dir)
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if proc.pid == os.getpid():
                continue
            if os.getsid(proc.pid) == head.session or proc.cwd().startswith(root):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
    return list(found.values())


def kill_head(head: Head, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to every process of the head (what a crashed head machine amounts to)."""
    for proc in head_processes(head):
        with contextlib.suppress(psutil.Error, OSError):
            proc.send_signal(sig)


def stop_head(head: Head) -> None:
    """Kill the head's processes and remove its temp folder. SIGKILL at once: nothing of a test
    head is worth a graceful shutdown, and Ray's daemons take seconds to act on SIGTERM."""
    deadline = time.monotonic() + STOP_SECONDS
    while True:
        procs = head_processes(head)
        if not procs or time.monotonic() > deadline:
            break
        for proc in procs:
            with contextlib.suppress(psutil.Error, OSError):
                proc.kill()
        psutil.wait_procs(procs, timeout=1.0)
    shutil.rmtree(head.temp_dir, ignore_errors=True)
