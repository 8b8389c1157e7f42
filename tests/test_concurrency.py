"""Concurrency (issue 5, item 3): many real CLI processes starting, stopping, resuming and listing
at once for a bounded time. maxParallel is never exceeded, no record or attempt is lost, no store
file is corrupt, nothing deadlocks, and a lock whose holder was killed never blocks anyone."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backprop_mcp.core.records import TERMINAL_STATES
from backprop_mcp.runs.service import Service
from tests.fault_helpers import (
    assert_nothing_survives,
    assert_store_files_valid,
    strict_json,
    wait_for_supervisor_exit,
)
from tests.helpers import FIXTURES, cli, cli_json, unique_id, wait_for_end

MAX_PARALLEL = 2
# The default run is short so the whole suite stays within a few minutes on 2 cores; the soak
# hammers the store for two minutes with more workers.
SHORT = (4, 10.0, 8)  # workers, seconds of traffic, most runs created
SOAK = (8, 120.0, 40)
# Exit codes a well-behaved CLI may give under this traffic: success, or a clear refusal such as
# "resume a run that is still running" or "stop a run that has ended" (exit 2).
ACCEPTED_EXITS = {0, 2}


@dataclass
class Traffic:
    """What the workers did, for the checks afterwards."""

    runs: list[str] = field(default_factory=list)
    resumes: Counter[str] = field(default_factory=Counter)
    ops: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _max_overlap(spans: Path) -> tuple[int, int]:
    """(most scripts alive at once, spans counted), from the start and end files they wrote."""
    points: list[tuple[float, int]] = []
    starts = sorted(spans.glob("*.start"))
    for start in starts:
        end = start.with_suffix(".end")
        assert end.exists(), f"{start.stem} never recorded its end"
        points.append((float(start.read_text(encoding="utf-8")), 1))
        points.append((float(end.read_text(encoding="utf-8")), -1))
    alive = most = 0
    for _, step in sorted(points):  # at equal times an end (-1) sorts before a start
        alive += step
        most = max(most, alive)
    return most, len(starts)


def _worker(
    env: dict[str, str], cwd: Path, spans: Path, seed: int, until: float, cap: int, traffic: Traffic
) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        with traffic.lock:
            known = list(traffic.runs)
            can_start = len(traffic.runs) < cap
        op = rng.choice(
            ["run", "run", "stop", "resume", "list", "status"]
            if can_start
            else ["stop", "resume", "list", "list", "status"]
        )
        if op not in {"run", "list"} and not known:
            op = "list"
        if op == "run":
            seconds = f"{rng.uniform(0.1, 0.8):.2f}"
            args = [
                "run",
                str(FIXTURES / "writes_its_span.py"),
                "--detach",
                "-m",
                "0.05",
                "--json",
                "--",
                str(spans),
                seconds,
            ]
        elif op == "stop":
            args = ["stop", rng.choice(known)]
        elif op == "resume":
            args = ["resume", rng.choice(known), "--detach", "-m", "0.05", "--json"]
        elif op == "status":
            args = ["status", rng.choice(known), "--json"]
        else:
            args = ["list", "--limit", "1000", "--json"]
        if op == "stop":
            args.append("--json")
        done = cli(env, *args, cwd=cwd)
        with traffic.lock:
            traffic.ops[f"{op}:{done.returncode}"] += 1
            if done.returncode not in ACCEPTED_EXITS or "Traceback" in done.stderr:
                traffic.failures.append(f"{args} -> {done.returncode}: {done.stderr[-500:]}")
                continue
            if done.returncode == 0 and op == "run":
                traffic.runs.append(json.loads(done.stdout)["run_id"])
            elif done.returncode == 0 and op == "resume":
                traffic.resumes[args[1]] += 1
            elif done.returncode == 0:
                json.loads(done.stdout)  # every answer is whole JSON


def _hammer(env: dict[str, str], tmp_path: Path, workers: int, seconds: float, cap: int) -> None:
    env = {**env, "BACKPROP_MAX_PARALLEL": str(MAX_PARALLEL), "BACKPROP_GRACE_SECONDS": "3"}
    spans = tmp_path / "spans"
    spans.mkdir()
    traffic = Traffic()
    until = time.monotonic() + seconds
    threads = [
        threading.Thread(target=_worker, args=(env, tmp_path, spans, n, until, cap, traffic))
        for n in range(workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 120)
        assert not thread.is_alive(), "a CLI command deadlocked"
    assert not traffic.failures, "\n".join(traffic.failures)
    assert traffic.runs, traffic.ops
    service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=tmp_path)
    records = {
        run_id: wait_for_end(service, run_id, timeout=60 + 10 * len(traffic.runs)) for run_id in traffic.runs
    }
    wait_for_supervisor_exit(service, *traffic.runs)  # the store walks below need it at rest
    most, counted = _max_overlap(spans)
    assert most <= MAX_PARALLEL, f"{most} scripts ran at once with maxParallel {MAX_PARALLEL}"
    listed = {row["run_id"]: row for row in cli_json(env, "list", "--limit", "1000")["runs"]}
    assert set(listed) == set(traffic.runs)  # no record lost
    for run_id, record in records.items():
        assert record["status"] in TERMINAL_STATES
        assert record["attempt"] == 1 + traffic.resumes[run_id]  # no attempt lost
        assert [a["attempt"] for a in record["attempts"]] == list(range(1, record["attempt"] + 1))
        assert listed[run_id]["status"] == record["status"]
        strict_json(service.store.record_path(run_id).read_bytes())
    assert assert_store_files_valid(Path(env["BACKPROP_HOME"])) >= len(traffic.runs)
    assert counted >= 1
    assert_nothing_survives(*traffic.runs)


def test_many_clis_starting_stopping_resuming_and_listing_at_once_keep_every_promise(
    env: dict[str, str], tmp_path: Path
) -> None:
    _hammer(env, tmp_path, *SHORT)


@pytest.mark.soak
def test_two_minutes_of_concurrent_traffic_keep_every_promise(env: dict[str, str], tmp_path: Path) -> None:
    _hammer(env, tmp_path, *SOAK)


_HOLDER = """
import sys, time
from pathlib import Path
from backprop_mcp.governor.admission import Admission
from backprop_mcp.core.store import Store, file_lock
store = Store(Path(sys.argv[1])).ensure()
with file_lock(store.index_lock), store.run_lock(sys.argv[2]), Admission(store.governor_dir)._locked():
    print("held", flush=True)
    time.sleep(600)
"""


def test_locks_held_by_a_killed_process_never_block_the_next_command(
    env: dict[str, str], service: Service, tmp_path: Path
) -> None:
    first_id, second_id = unique_id("first"), unique_id("second")
    first = cli_json(env, "run", str(FIXTURES / "counts_and_exits.py"), "--run-id", first_id, cwd=tmp_path)
    assert first["status"] == "completed"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, env["BACKPROP_HOME"], first_id], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "held"  # every lock of the store is taken
    holder.kill()
    holder.wait()
    holder.stdout.close()
    resumed = cli(env, "resume", first_id, "--detach", "--json", "--", "6")  # it completed its steps
    assert resumed.returncode == 0, resumed.stderr
    again = json.loads(resumed.stdout)
    assert again["attempt"] == 2
    second = cli_json(env, "run", str(FIXTURES / "counts_and_exits.py"), "--run-id", second_id, cwd=tmp_path)
    assert second["status"] == "completed"
    assert wait_for_end(service, first_id)["status"] == "completed"
    assert {r["run_id"] for r in cli_json(env, "list")["runs"]} == {first_id, second_id}
    assert_nothing_survives(first_id, second_id)
