"""The supervisor process's entry point, `python -m backprop_mcp.runs.supervisor HOME RUN_ID
--await-go`: started detached by `backends.local.spawn_supervisor`, it waits for its starter's go,
becomes the subreaper of the script's processes and runs the attempt. Stdlib plus psutil only, for
a fast start."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from backprop_mcp.core.errors import BackpropError
from backprop_mcp.core.store import SUPERVISOR_PID_FILE, Store
from backprop_mcp.governor import proctree
from backprop_mcp.runs import detached
from backprop_mcp.runs.launch import (
    AWAIT_GO_FLAG,
)
from backprop_mcp.runs.supervisor.run import Supervisor

log = logging.getLogger("backprop_mcp.runs.supervisor")

# How long a new supervisor waits for its starter's go: the starter writes a few small files in
# between, so a minute means it hung or died; the pid file then decides (see `_await_go`).
GO_WAIT_SECONDS = 60.0


def _named_by_starter(store: Store, run_id: str) -> bool:
    """True when the pid file the starter writes last names this process."""
    try:
        info = json.loads((store.run_dir(run_id) / SUPERVISOR_PID_FILE).read_text("utf-8"))
        return bool(info["pid"] == os.getpid())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    await_go = args[2:] == [AWAIT_GO_FLAG]
    if len(args) != 2 and not await_go:
        print(f"usage: python -m backprop_mcp.runs.supervisor HOME RUN_ID [{AWAIT_GO_FLAG}]", file=sys.stderr)
        return 2
    home, run_id = Path(args[0]), args[1]
    if await_go and not detached.await_go(lambda: _named_by_starter(Store(home), run_id)):
        return 0
    proctree.become_subreaper()
    try:
        return Supervisor(Store(home), run_id).run()
    except BackpropError as exc:
        log.error("run %s: %s", run_id, exc)
        return 1
