"""Detached processes that outlive their starter (a run's supervisor, a sweep's runner): the
starter's side (`spawn`: its own session, output to its log, held signals blocked, waiting for the
go) and the child's (`await_go`). Stdlib only: both children must start fast."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from backprop_mcp.runs.launch import GO, HELD_SIGNALS

# How long a new child waits for its starter's go: the starter writes a few small files in
# between, so a minute means it hung or died; `named_by_starter` then decides (see `await_go`).
GO_WAIT_SECONDS = 60.0


def spawn(
    module: str, args: Sequence[str], log_path: Path, env: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    """Start `python -m MODULE ARGS...` detached (own session, output appended to `log_path`, 0600),
    with stdin a pipe for the go. It starts with `HELD_SIGNALS` blocked: a stop sent before its
    handlers exist waits as a pending signal instead of killing it half started."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    # Only this thread's mask changes, and only for the moment of the fork: the child inherits it.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
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


def await_go(named_by_starter: Callable[[], bool]) -> bool:
    """Wait for the starter's go on stdin: True to go on.

    Without the go (the starter rolled the start back, or died), go on only if the starter had
    finished its part: `named_by_starter()` says whether what it writes last (a pid file, a record)
    names this process. Otherwise the start is being undone, and the child must leave no trace.
    """
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
    # fd 0 must not stay a pipe to the starter (a script started later gets /dev/null anyway).
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return got == GO or named_by_starter()
