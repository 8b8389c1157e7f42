"""Shared test helpers: an isolated environment per test, the real CLI, and bounded waits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import psutil

from backprop_mcp.core.records import TERMINAL_STATES, RunRecord
from backprop_mcp.runs.service import Service

FIXTURES = Path(__file__).parent / "fixtures"
# Every wait in the tests is bounded by this; it is generous because CI machines are slow.
WAIT_SECONDS = 60.0
# Between two looks at a condition (a wait for an event, not a sleep standing in for one).
POLL_SECONDS = 0.02
# This session's temporary folder (set by tests/conftest.py): every store of the session lies in
# it, so the leftover-process checks can tell this session's runs from a suite running beside it.
SESSION_ROOT: Path | None = None

T = TypeVar("T")


def unique_id(stem: str) -> str:
    """A run id of this test alone, `stem-<8 hex>`: two suites running at once on one machine never
    share a run id, so nothing that looks at a run's processes can match another suite's."""
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def isolated_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment whose store, config and limits belong to the test alone.

    The limits admit runs on a small, busy CI machine; governor tests set their own.
    """
    # RAY_ADDRESS is a setting too (the ray backend's cluster): a developer's own must not apply.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKPROP_") and k != "RAY_ADDRESS"}
    env.update(
        BACKPROP_HOME=str(home),
        BACKPROP_CONFIG=str(home / "no-user-config.json"),
        BACKPROP_MIN_FREE_RAM_GB="0",
        BACKPROP_MAX_CPU_PERCENT="100",
        BACKPROP_GPU_PROBE="none",
        BACKPROP_MAX_PARALLEL="64",
        BACKPROP_GRACE_SECONDS="5",
    )
    env.pop("VIRTUAL_ENV", None)
    env.update(extra)
    return env


def wait_until(check: Callable[[], T | None], *, timeout: float = WAIT_SECONDS, what: str = "condition") -> T:
    """Return check()'s first truthy value; fail if none comes within the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_SECONDS)


def wait_for_end(service: Service, run_id: str, timeout: float = WAIT_SECONDS) -> RunRecord:
    def ended() -> RunRecord | None:
        record = service.get(run_id)
        return record if record["status"] in TERMINAL_STATES else None

    return wait_until(ended, timeout=timeout, what=f"run {run_id} to end")


def wait_for_log(service: Service, run_id: str, text: str, attempt: int = 1) -> None:
    path = service.store.log_path(run_id, attempt)

    def seen() -> bool:
        return path.exists() and text.encode() in path.read_bytes()

    wait_until(seen, what=f"{text!r} in the log of {run_id}")


def cli(
    env: Mapping[str, str], *args: str, cwd: Path | None = None, timeout: float = WAIT_SECONDS
) -> subprocess.CompletedProcess[str]:
    """Run the real `backprop` CLI, by default in the folder that holds the test's store (else in
    the test's own folder, see conftest.py): a run started there writes its files there, never
    into the repository the suite runs from."""
    if cwd is None and "BACKPROP_HOME" in env:
        cwd = Path(env["BACKPROP_HOME"]).parent
        cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "backprop_mcp", *args],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cli_json(env: Mapping[str, str], *args: str, cwd: Path | None = None) -> Any:
    done = cli(env, *args, "--json", cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def start_at_once(env: Mapping[str, str], cwd: Path, script: Path, run_ids: list[str], *args: str) -> None:
    """Start one detached `backprop run` per run id, all at once from separate processes."""
    starters = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backprop_mcp",
                "run",
                str(script),
                "--run-id",
                run_id,
                "--detach",
                "--",
                *args,
            ],
            env=dict(env),
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for run_id in run_ids
    ]
    for proc in starters:
        _, err = proc.communicate(timeout=WAIT_SECONDS)
        assert proc.returncode == 0, err


def processes_with_run_id(run_id: str) -> list[psutil.Process]:
    """Living processes that carry the run's id in their environment (nothing may survive a run),
    leaving out those of another session's store (see `SESSION_ROOT`)."""
    found = []
    for proc in psutil.process_iter():
        try:
            environ = proc.environ()
            if (
                proc.status() != psutil.STATUS_ZOMBIE
                and environ.get("BACKPROP_RUN_ID") == run_id
                and _of_this_session(environ)
            ):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _of_this_session(environ: Mapping[str, str]) -> bool:
    """False for a process whose store (BACKPROP_HOME, which a run's script inherits from its
    supervisor) lies outside this session's temporary folder: another suite's, whatever its run
    id. A process without one (a cluster job's) is kept: run ids are unique per test anyway."""
    home = environ.get("BACKPROP_HOME")
    if SESSION_ROOT is None or not home:
        return True
    return Path(os.path.realpath(home)).is_relative_to(os.path.realpath(SESSION_ROOT))


def no_survivors(run_id: str) -> bool:
    return not processes_with_run_id(run_id)
