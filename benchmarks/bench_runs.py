"""Figures of a run's life: launch latency, event ingestion and the bytes it writes, deadline
precision, pause reaction, the supervisor's overhead, and queue turnaround."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

import psutil
from bench_harness import (
    BIN,
    POLL_SECONDS,
    PYTHON,
    BenchError,
    Plan,
    Row,
    Sampler,
    Workspace,
    check,
    first_line,
    mb,
    median,
    ms,
    pids_of_run,
    plus,
    proc_state,
    read_words,
    script_pid,
    supervisor_pid,
    wait_for_end,
    wait_until,
    wall,
)

from backprop_mcp.core.records import RunRecord
from backprop_mcp.core.store import Store
from backprop_mcp.governor import decisions
from backprop_mcp.runs.service import Service
from backprop_mcp.runs.supervisor import run as supervisor

LAUNCH_TARGET_S = 0.150
INGEST_RATIO_TARGET = 1.5
INGEST_RSS_TARGET = 80 * 2**20
# "Flat in store size": the same flood with 5,000 past runs in the store may take this much longer
# (our reading of "flat": within the run-to-run noise of a busy 2-core machine).
FLAT_RATIO_TARGET = 1.25
# Record writes per second during a flood: one per RECORD_INTERVAL_SECONDS, with room for the
# state changes (running, completed) that land in the same second.
FLAT_STORE_RUNS = 5_000
WRITES_PER_SECOND_TARGET = 1.5 / supervisor.RECORD_INTERVAL_SECONDS
DEADLINE_LATE_TARGET_S = 0.250
TREE_SLACK_S = 1.0
PAUSE_SLACK_S = 0.100
OVERHEAD_CPU_TARGET = 1.0  # percent of one core
OVERHEAD_RSS_TARGET = 60 * 2**20
QUEUE_SLACK_S = 0.100
# The time box of the deadline figures: long enough for the script (and its child) to start.
DEADLINE_BOX_MINUTES = 0.01
TREE_GRACE_SECONDS = 1.0
HOT_C, COOL_C = 95.0, 40.0


def epoch(iso: str | None) -> float:
    if not iso:
        raise BenchError("the record has no end time")
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@dataclass
class Launch:
    """Launch figures, kept for the queue row and as the template of fake past runs."""

    floor: float
    service: float
    cli: float
    template: RunRecord
    rows: list[Row]


def _launch_from_cli(ws: Workspace, env: dict[str, str], store: Store) -> tuple[float, str]:
    began = time.time()
    done = subprocess.run(
        [str(BIN / "backprop"), "run", "--detach", ws.script("prints_its_start_time.py")],
        env=env,
        cwd=ws.work,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"backprop run --detach exited {done.returncode}: {done.stderr[-500:]}")
    run_id = done.stdout.strip()
    return float(first_line(store.log_path(run_id, 1))) - began, run_id


def measure_launch(ws: Workspace, plan: Plan) -> Launch:
    service = ws.service("launch")
    env = ws.env("launch-cli")
    cli_service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=ws.work)
    floors, in_process, calls, from_cli = [], [], [], []
    template: RunRecord | None = None
    for _ in range(plan.runs):  # each repetition measures the floor too, under the same load
        floors.append(wall([PYTHON, "-c", "pass"], ws.base_env(), ws.work))
        began = time.time()
        record = ws.start(service, "prints_its_start_time.py")
        calls.append(time.time() - began)
        in_process.append(float(first_line(service.store.log_path(record["run_id"], 1))) - began)
        template = wait_for_end(service, record["run_id"])
        latency, run_id = _launch_from_cli(ws, env, cli_service.store)
        from_cli.append(latency)
        wait_for_end(cli_service, run_id)
    assert template is not None
    floor = median(floors)
    launch = Launch(floor, median(in_process), median(from_cli), template, [])
    target = f"<= floor + {ms(LAUNCH_TARGET_S)}"
    for label, value, extra in (
        (
            "launch latency: Service.start (in-process, as MCP) to first line",
            launch.service,
            f"the call itself returns in {ms(median(calls))}",
        ),
        ("launch latency: `backprop run --detach` to first line", launch.cli, ""),
    ):
        launch.rows.append(
            Row(
                label,
                f"`python -c pass` {ms(floor)}",
                ms(value),
                target,
                f"floor {plus(value - floor)}",
                check(value - floor <= LAUNCH_TARGET_S),
                extra,
            )
        )
    return launch


@dataclass
class Flood:
    """One flood of progress lines under a supervisor."""

    script_seconds: float
    end_to_end: float
    peak_rss: int
    store_bytes: int
    written: int
    cpu_seconds: float
    lines: int
    writes_per_second: float


def flood(ws: Workspace, home: str, lines: int, tag: str) -> Flood:
    service = ws.service(home)
    out = ws.root / f"flood-{tag}.txt"
    began = time.time()
    record = ws.start(service, "floods_progress_lines.py", str(lines), str(out))
    run_id = record["run_id"]
    with Sampler(supervisor_pid(service, run_id), record_path=service.store.record_path(run_id)) as sampler:
        final = wait_for_end(service, run_id)
    if final["status"] != "completed" or final["step"] != lines:
        raise BenchError(f"the flood run ended {final['status']} at step {final['step']}, not {lines}")
    start, end, printed = read_words(out)
    seconds = float(end) - float(start)
    writes = [t for t in sampler.replaced_at if float(start) <= t <= float(end)]
    return Flood(
        script_seconds=seconds,
        end_to_end=epoch(final["ended_at"]) - began,
        peak_rss=sampler.peak_rss,
        store_bytes=sampler.io.get("wchar", 0) - int(printed),
        written=sampler.io.get("wchar", 0),
        cpu_seconds=sampler.cpu_seconds,
        lines=lines,
        writes_per_second=len(writes) / seconds if seconds >= 1 else float(len(writes)),
    )


def flood_floor(ws: Workspace, lines: int) -> float:
    out = ws.root / "flood-floor.txt"
    env = dict(ws.base_env(), PYTHONUNBUFFERED="1")  # as under the supervisor: only the sink differs
    subprocess.run(
        [PYTHON, ws.script("floods_progress_lines.py"), str(lines), str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        check=True,
        cwd=ws.work,
    )
    start, end, _ = read_words(out)
    out.unlink()
    return float(end) - float(start)


def measure_ingestion(ws: Workspace, plan: Plan) -> tuple[list[Row], Flood]:
    lines = plan.flood_lines
    past = ws.past_runs(FLAT_STORE_RUNS)
    floors, empty, full = [], [], []
    for i in range(2 if plan.quick else 3):  # interleaved: the floor sees the same load as the figures
        floors.append(flood_floor(ws, lines))
        empty.append(flood(ws, "flood-empty", lines, f"empty-{i}"))
        full.append(flood(ws, past, lines, f"{FLAT_STORE_RUNS}-{i}"))
    floor = median(floors)
    seconds = median([f.script_seconds for f in empty])
    seconds_full = median([f.script_seconds for f in full])
    rss = max(f.peak_rss for f in empty + full)
    ratio, flat = seconds / floor, seconds_full / seconds
    writes = max(f.writes_per_second for f in empty + full)
    per_line = max(f.store_bytes for f in empty + full) / lines
    cpu_per_line = median([f.cpu_seconds for f in empty]) / lines * 1e6
    label = f"{lines:,}"
    rows = [
        Row(
            f"event ingestion: {label} progress lines, wall",
            f"same script to /dev/null {ms(floor)}",
            ms(seconds),
            f"ratio <= {INGEST_RATIO_TARGET}",
            f"{ratio:.2f}x",
            check(ratio <= INGEST_RATIO_TARGET),
            f"{lines / seconds:,.0f} lines/s; supervisor CPU {cpu_per_line:.1f} us/line; "
            f"start call to final record {ms(median([f.end_to_end for f in empty]))}",
        ),
        Row(
            "event ingestion: supervisor peak RSS",
            "-",
            mb(rss),
            f"<= {mb(INGEST_RSS_TARGET)}",
            f"{rss / INGEST_RSS_TARGET:.2f} of target",
            check(rss <= INGEST_RSS_TARGET),
        ),
        Row(
            f"event ingestion: flat in store size ({FLAT_STORE_RUNS:,} past runs)",
            f"empty store {ms(seconds)}",
            ms(seconds_full),
            f"ratio <= {FLAT_RATIO_TARGET}",
            f"{flat:.2f}x",
            check(flat <= FLAT_RATIO_TARGET),
        ),
        Row(
            "bytes written to the store per progress line",
            "0",
            f"{per_line:.3f} B/line; {writes:.1f} record writes/s",
            f"<= {WRITES_PER_SECOND_TARGET:g} record writes/s",
            f"{writes / WRITES_PER_SECOND_TARGET:.2f} of target",
            check(writes <= WRITES_PER_SECOND_TARGET),
            f"wchar of the supervisor minus the raw log; lines arrived at {lines / seconds:,.0f}/s",
        ),
    ]
    return rows, full[0]


def seed_flood(ws: Workspace) -> Flood:
    """The seed's worst case: 2,000 progress lines against a 5,000-run store."""
    return flood(ws, ws.past_runs(FLAT_STORE_RUNS), 2_000, "seed")


def _all_gone(run_id: str) -> bool:
    return not pids_of_run(run_id)


def _queued(service: Service, run_id: str) -> int | None:
    return service.get(run_id)["queue_position"]


def measure_deadline(ws: Workspace, plan: Plan) -> list[Row]:
    service = ws.service("deadline")
    late = []
    for i in range(plan.runs):
        out = ws.root / f"stopped-{i}.txt"
        record = ws.start(service, "records_when_stopped.py", str(out), max_run_minutes=DEADLINE_BOX_MINUTES)
        at, deadline = read_words(out)
        late.append(float(at) - float(deadline))
        wait_for_end(service, record["run_id"])
    gone = []
    tree = ws.service("tree")
    for _ in range(plan.tree_runs):
        record = ws.start(
            tree,
            "ignores_stop_with_a_child.py",
            max_run_minutes=DEADLINE_BOX_MINUTES,
            grace_seconds=TREE_GRACE_SECONDS,
        )
        run_id = record["run_id"]
        due = float(first_line(tree.store.log_path(run_id, 1)).split()[1])
        wait_until(partial(_all_gone, run_id), what=f"the processes of {run_id} to end", poll=0.005)
        gone.append(time.time() - due)
        wait_for_end(tree, run_id)
    tree_target = TREE_GRACE_SECONDS + TREE_SLACK_S
    return [
        Row(
            "deadline precision: stop signal received after the deadline",
            "0",
            f"max {ms(max(late))}",
            f"<= {ms(DEADLINE_LATE_TARGET_S)}",
            f"median {ms(median(late))}",
            check(max(late) <= DEADLINE_LATE_TARGET_S),
            f"{len(late)} runs; SIGINT time seen by the script",
        ),
        Row(
            "deadline: whole tree gone (ignores SIGINT/SIGTERM, child in its own session)",
            "0",
            f"max {ms(max(gone))}",
            f"<= grace + 1 s ({ms(tree_target)})",
            f"median {ms(median(gone))}",
            check(max(gone) <= tree_target),
            f"grace {TREE_GRACE_SECONDS:g} s; timed from the deadline",
        ),
    ]


def _write_probe(path: Path, temperature: float) -> None:
    snapshot = {
        "gpus": [{"index": 0, "memory_total_mb": 81920, "memory_used_mb": 0, "temperature_c": temperature}]
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(snapshot), encoding="utf-8")
    os.replace(tmp, path)


def measure_pause(ws: Workspace, plan: Plan) -> list[Row]:
    probe = ws.root / "static-probe.json"
    _write_probe(probe, COOL_C)
    service = ws.service("pause", BACKPROP_GPU_PROBE="static", BACKPROP_STATIC_PROBE=str(probe))
    record = ws.start(service, "sleeps_until_stopped.py")
    run_id = record["run_id"]
    pid = script_pid(service, run_id)
    first_line(service.store.log_path(run_id, 1))
    interval = decisions.SAMPLE_INTERVAL_SECONDS
    rng = random.Random(6)
    reactions = []
    for _ in range(plan.pause_cycles):
        time.sleep(rng.uniform(0, interval))  # any phase of the sampling clock
        _write_probe(probe, HOT_C)
        hot = time.monotonic()
        wait_until(lambda: proc_state(pid) == "T", what="the script to be stopped", poll=0.001)
        reactions.append(time.monotonic() - hot)
        _write_probe(probe, COOL_C)
        wait_until(lambda: proc_state(pid) not in ("T", None), what="the script to resume", poll=POLL_SECONDS)
    service.stop(run_id)
    final = wait_for_end(service, run_id)
    if final["status"] != "stopped":
        raise BenchError(f"the paused run ended {final['status']}, not stopped")
    target = interval + PAUSE_SLACK_S
    return [
        Row(
            "pause reaction: hot GPU seen to SIGSTOP",
            f"sampling interval {ms(interval)}",
            f"max {ms(max(reactions))}",
            f"<= interval + {ms(PAUSE_SLACK_S)}",
            f"median {ms(median(reactions))}",
            check(max(reactions) <= target),
            f"{len(reactions)} flips of a static probe at random phases; state T seen in /proc",
        )
    ]


def measure_overhead(ws: Workspace, plan: Plan) -> list[Row]:
    service = ws.service("overhead")
    settle = 1.0  # past the supervisor's own start-up and first sample
    record = ws.start(service, "computes_silently.py", str(plan.overhead_seconds + 2 * settle))
    run_id = record["run_id"]
    proc = psutil.Process(supervisor_pid(service, run_id))
    with Sampler(proc.pid, interval=0.1) as sampler:
        first_line(service.store.log_path(run_id, 1))
        time.sleep(settle)
        cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
        time.sleep(plan.overhead_seconds)
        cpu1, t1 = sum(proc.cpu_times()[:2]), time.monotonic()
        wait_for_end(service, run_id)
    share = 100 * (cpu1 - cpu0) / (t1 - t0)
    rss = sampler.peak_rss
    return [
        Row(
            "supervisor overhead while a script computes: CPU",
            "0",
            f"{share:.2f}% of a core",
            f"<= {OVERHEAD_CPU_TARGET:g}%",
            f"{share / OVERHEAD_CPU_TARGET:.2f} of target",
            check(share <= OVERHEAD_CPU_TARGET),
            f"over {plan.overhead_seconds:g} s, GPU probe none",
        ),
        Row(
            "supervisor overhead while a script computes: RSS",
            "0",
            mb(rss),
            f"<= {mb(OVERHEAD_RSS_TARGET)}",
            f"{rss / OVERHEAD_RSS_TARGET:.2f} of target",
            check(rss <= OVERHEAD_RSS_TARGET),
        ),
    ]


def measure_queue(ws: Workspace, plan: Plan, launch: float) -> list[Row]:
    service = ws.service("queue", BACKPROP_MAX_PARALLEL="1")
    turnaround = []
    for i in range(max(3, plan.runs // 2)):
        go, end = ws.root / f"go-{i}", ws.root / f"end-{i}"
        first = ws.start(service, "waits_for_a_file_then_exits.py", str(go), str(end))
        first_line(service.store.log_path(first["run_id"], 1))
        second = ws.start(service, "prints_its_start_time.py")
        wait_until(partial(_queued, service, second["run_id"]), what="the second run to queue", poll=0.02)
        go.touch()
        ended = float(read_words(end)[0])
        turnaround.append(float(first_line(service.store.log_path(second["run_id"], 1))) - ended)
        wait_for_end(service, first["run_id"])
        wait_for_end(service, second["run_id"])
    value = median(turnaround)
    return [
        Row(
            "queue turnaround: a run ends to the next queued run's first line",
            f"launch latency {ms(launch)}",
            ms(value),
            f"<= launch + {ms(QUEUE_SLACK_S)}",
            f"launch {plus(value - launch)}",
            check(value - launch <= QUEUE_SLACK_S),
            f"max_parallel 1; max {ms(max(turnaround))}",
        )
    ]
