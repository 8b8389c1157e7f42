"""The sweep runner's entry point and its launch: `spawn` (the starter's side: a detached process
held until the sweep's record names it, like a run's supervisor) and `main` (the runner's side:
wait for the go, then run). Stdlib plus what the runner imports; no pydantic, mcp or optuna
unless the sweep uses tpe."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from backprop_mcp.core.errors import BackpropError
from backprop_mcp.runs import detached
from backprop_mcp.runs.launch import AWAIT_GO_FLAG

log = logging.getLogger("backprop_mcp.sweeps.runner")

# How long a new runner waits for its starter's go: the starter writes one small file in between,
# so a minute means it hung or died; the record then decides (see `_await_go`).
GO_WAIT_SECONDS = 60.0


def spawn(home: Path, sweep_id: str, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start the sweep's runner detached (own session, output to its log), held until `release`."""
    log_path = home / "sweeps" / sweep_id / "runner.log"
    return detached.spawn("backprop_mcp.sweeps", [str(home), sweep_id, AWAIT_GO_FLAG], log_path, env)


def _named_by_starter(home: Path, sweep_id: str) -> bool:
    """True when the sweep's record, which the starter writes last, names this process."""
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
    if await_go and not detached.await_go(lambda: _named_by_starter(home, sweep_id)):
        return 0
    from backprop_mcp.sweeps.runner import Runner

    try:
        runner = Runner(home, sweep_id)
    except BackpropError as exc:
        log.error("sweep %s: %s", sweep_id, exc)
        return 1
    return runner.run()  # it unblocks the held signals once its handlers exist
