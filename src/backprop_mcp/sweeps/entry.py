"""The sweep runner's entry point and its launch: `spawn` (the starter's side: a detached process
held until the sweep's record names it, like a run's supervisor) and `main` (the runner's side:
wait for the go, then run). Stdlib plus what the runner imports; no pydantic, mcp or optuna
unless the sweep uses tpe."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from backprop_mcp.core.errors import BackpropError
from backprop_mcp.runs.launch import AWAIT_GO_FLAG, GO, HELD_SIGNALS

log = logging.getLogger("backprop_mcp.sweeps.runner")

# How long a new runner waits for its starter's go: the starter writes one small file in between,
# so a minute means it hung or died; the record then decides (see `_await_go`).
GO_WAIT_SECONDS = 60.0


def spawn(home: Path, sweep_id: str, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start the sweep's runner detached (own session, output to its log), held until `release`."""
    log_path = home / "sweeps" / sweep_id / "runner.log"
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    # Blocked around the fork only, so the child starts with them held: a stop sent before its
    # handlers exist waits as a pending signal instead of killing it half started.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backprop_mcp.sweeps", str(home), sweep_id, AWAIT_GO_FLAG],
            stdin=subprocess.PIPE,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            close_fds=True,
            env=dict(env),
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        os.close(fd)
    return proc


def _await_go(home: Path, sweep_id: str) -> bool:
    """Wait for the starter's go; without it, go on only if the record names this process."""
    got = b""
    deadline = time.monotonic() + GO_WAIT_SECONDS
    while len(got) < len(GO):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([0], [], [], left)[0]:
            break
        chunk = os.read(0, len(GO) - len(got))
        if not chunk:
            break
        got += chunk
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if got == GO:
        return True
    try:
        data = json.loads((home / "sweeps" / sweep_id / "sweep.json").read_text("utf-8"))
        return bool(data["runner_pid"] == os.getpid())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    await_go = args[2:] == [AWAIT_GO_FLAG]
    if len(args) != 2 and not await_go:
        print(f"usage: python -m backprop_mcp.sweeps HOME SWEEP_ID [{AWAIT_GO_FLAG}]", file=sys.stderr)
        return 2
    home, sweep_id = Path(args[0]), args[1]
    if await_go and not _await_go(home, sweep_id):
        return 0
    from backprop_mcp.sweeps.runner import Runner

    try:
        runner = Runner(home, sweep_id)
    except BackpropError as exc:
        log.error("sweep %s: %s", sweep_id, exc)
        return 1
    return runner.run()  # it unblocks the held signals once its handlers exist
