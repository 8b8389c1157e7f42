"""The run summary of the MCP answers and the advice it gives for each state (issue 11, point 2),
as units: every field from a record, compact and rounded, and a next_step that is right for the
state: no resume advice for a run that completed its steps, a warning when the ETA passes the time
left, the queue position of a queued run, the logs of a failed one."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from mcp_types import TextContent

from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.records import RunRecord, new_record
from backprop_mcp.mcp_server.app import BackpropServer
from backprop_mcp.mcp_server.read_tools import ANSWER_BYTES
from backprop_mcp.mcp_server.roots import Roots
from backprop_mcp.mcp_server.summary import (
    ARGS_CHARS,
    SUMMARY_METRICS,
    compact,
    next_step,
    size,
    summary,
)
from backprop_mcp.mcp_server.tools import build_server
from backprop_mcp.mcp_server.waiting import advice, settled
from backprop_mcp.runs.service import Service
from tests.helpers import FIXTURES, isolated_env, wait_until
from tests.test_mcp_stdio import WAIT, server_command
from tests.test_mcp_tools import GENEROUS, call, connect, make_server, run_to_end, write_script
from tests.test_stored_data import add_run


def record(**fields: Any) -> RunRecord:
    return new_record(run_id="lr-1", script="/p/train.py", created_at=now_iso(), name="lr", **fields)


def checkpoint(step: int) -> dict[str, Any]:
    return {"path": f"/p/ck{step}.pt", "step": step, "attempt": 1, "saved_at": now_iso()}


def test_a_summary_has_the_fields_an_agent_needs_rounded_and_without_nulls() -> None:
    started = time.time() - 30
    row = summary(
        record(
            status="running",
            step=40,
            total=100,
            loss=0.123456789,
            metrics={"val_loss": 0.2222222, "val_acc": 0.9},
            args=["--lr", "0.01"],
            started_at=now_iso(started),
            deadline=now_iso(started + 600),
            eta_seconds=45.123456,
            checkpoints=[checkpoint(20), checkpoint(40)],
            latest_checkpoint="/p/ck40.pt",
        )
    )
    assert row["run_id"] == "lr-1" and row["name"] == "lr" and row["status"] == "running"
    assert (row["attempt"], row["step"], row["total"]) == (1, 40, 100)
    assert row["loss"] == 0.12346 and row["metrics"] == {"val_loss": 0.22222, "val_acc": 0.9}
    assert 29 <= row["elapsed_s"] <= 60 and 540 <= row["left_s"] <= 571 and row["eta_s"] == 45.123
    assert row["args"] == ["--lr", "0.01"]
    assert (row["checkpoint"], row["checkpoints"]) == ("/p/ck40.pt", 2)
    assert "queue_position" not in row and "reason" not in row  # nothing to say: not there at all
    assert None not in row.values()


def test_a_summary_keeps_a_few_metrics_the_sorted_one_among_them_and_cuts_long_args() -> None:
    metrics = {f"m{i}": float(i) for i in range(10)}
    row = summary(record(metrics=metrics, args=["--x" * 10] * 100), keep="m9", advice=False)
    assert len(row["metrics"]) == SUMMARY_METRICS and "m9" in row["metrics"]
    assert sum(len(arg) + 1 for arg in row["args"][:-1]) <= ARGS_CHARS
    assert row["args"][-1].startswith("...(+")
    assert "next_step" not in row


def test_compaction_drops_nulls_everywhere_and_empty_collections_below_the_top() -> None:
    answer: dict[str, Any] = {
        "runs": [],
        "next_cursor": None,
        "row": {"metrics": {}, "args": [], "step": 0, "ok": False},
    }
    assert compact(answer) == {"runs": [], "row": {"step": 0, "ok": False}}
    assert size({"a": "é"}) == len('{"a":"é"}'.encode())


def test_a_queued_run_says_its_position_and_why() -> None:
    row = summary(record(status="queued", queue_position=3, status_detail="2 runs live = max parallel 2"))
    assert row["queue_position"] == 3 and row["reason"] == "2 runs live = max parallel 2"
    assert "position 3" in row["next_step"] and "wait_for_run" in row["next_step"]


def test_a_running_run_whose_eta_passes_its_time_left_warns_that_it_will_time_out_first() -> None:
    now = time.time()
    live = {"status": "running", "started_at": now_iso(now - 10), "deadline": now_iso(now + 60), "step": 10}
    late = summary(record(**live, total=1000, eta_seconds=900.0))
    assert late["next_step"].startswith("Warning:") and "time out" in late["next_step"]
    assert "resume_run" in late["next_step"]
    on_time = summary(record(**live, total=20, eta_seconds=10.0))
    assert "Warning" not in on_time["next_step"] and 'until="end"' in on_time["next_step"]


def test_a_run_that_completed_its_steps_gets_no_resume_advice() -> None:
    done = summary(
        record(
            status="completed",
            step=20,
            total=20,
            termination_reason="exit_zero",
            checkpoints=[checkpoint(20)],
        )
    )
    assert "resume_run" not in done["next_step"]
    assert "compare_runs" in done["next_step"] and "get_metrics" in done["next_step"]
    assert "new args" in done["next_step"]
    early = summary(record(status="completed", step=7, total=20, termination_reason="exit_zero"))
    assert "step 7/20" in early["next_step"] and "get_logs" in early["next_step"]


@pytest.mark.parametrize("status", ["timed_out", "stopped", "lost"])
def test_an_interrupted_run_is_told_to_resume_or_to_start_over_when_it_saved_no_checkpoint(
    status: str,
) -> None:
    saved = summary(record(status=status, step=12, total=100, checkpoints=[checkpoint(10)]))
    assert "resume_run(run_id)" in saved["next_step"] and "from_scratch" not in saved["next_step"]
    unsaved = summary(record(status=status, step=12, total=100))
    assert "from_scratch=true" in unsaved["next_step"]


def test_a_pruned_trial_says_so() -> None:
    pruned = summary(record(status="stopped", step=5, total=20, termination_reason="pruned"))
    assert pruned["reason"] == "pruned" and pruned["next_step"].startswith("Pruned by its sweep")


def test_a_failed_run_points_to_its_logs_with_its_exit_code() -> None:
    failed = summary(record(status="failed", termination_reason="exit_nonzero", exit_code=3))
    assert failed["reason"] == "exit_nonzero (exit 3)"
    assert "get_logs(run_id)" in failed["next_step"]
    killed = summary(record(status="failed", termination_reason="signal", signal="SIGSEGV"))
    assert killed["reason"] == "signal (SIGSEGV)"


def test_a_rejected_run_lists_the_rules_and_how_to_queue() -> None:
    rejected = summary(record(status="rejected", status_detail="RAM 1 GB free < 4 GB required"))
    assert rejected["reason"] == "RAM 1 GB free < 4 GB required"
    assert '"queue": true' in rejected["next_step"]


def test_an_index_row_without_a_records_fields_still_summarises() -> None:
    row = {"run_id": "a", "name": None, "status": "timed_out", "attempt": 1, "step": 3, "total": 9}
    assert summary(row)["next_step"].startswith("Its time box ended at step 3/9")
    assert next_step(row) == summary(row)["next_step"]


def test_waiting_for_several_runs_ends_when_the_condition_asked_for_holds() -> None:
    running, done = record(status="running"), record(status="completed")
    never_moved = lambda r: False  # noqa: E731 - a predicate, read as one
    assert settled([running, done], "any", never_moved) and not settled([running, done], "all", never_moved)
    assert not settled([running, done], "end", never_moved) and settled([done, done], "end", never_moved)
    assert not settled([running], "change", never_moved) and settled([running], "change", lambda r: True)
    rows = [summary(r, advice=False) for r in (running, done)]
    assert "1 of 2 ended" in advice([running, done], rows, 1)
    assert advice([done, done], [rows[1]] * 2, 2).startswith("All 2 ended (2 completed)")


# -- over the protocol (in memory): several runs per call, bounded answers, the server's defaults --------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    write_script(folder)
    return folder


@pytest.fixture
def server(service: Service, project: Path) -> BackpropServer:
    return make_server(service, Roots((project,), "option"), project)


@pytest.mark.anyio
async def test_wait_for_run_takes_several_runs_and_returns_when_any_or_all_have_ended_and_stop_run_too(
    server: BackpropServer, project: Path
) -> None:
    gate = project / "gate"
    notes: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        notes.append(message or "")

    async with connect(server, "legacy") as client:
        quick = await call(client, "run_training", script="train.py", args=["2"], name="quick", **GENEROUS)
        held = await call(client, "run_training", script="train.py", args=["3", "0", str(gate)], **GENEROUS)
        ids = [quick["run_id"], held["run_id"]]
        result = await client.call_tool(
            "wait_for_run",
            {"run_id": ids, "until": "any", "timeout_seconds": 120},
            progress_callback=on_progress,
        )
        anyone = result.structured_content
        assert anyone is not None
        await call(client, "wait_for_run", run_id=held["run_id"], since="queued", timeout_seconds=60)
        stopped = await call(client, "stop_run", run_id=[held["run_id"], quick["run_id"]])
        everyone = await call(client, "wait_for_run", run_id=ids, until="all", timeout_seconds=120)
    assert [row["run_id"] for row in anyone["runs"]] == ids
    assert anyone["runs"][0]["status"] == "completed" and anyone["ended"] is False
    assert anyone["runs"][1]["status"] in ("queued", "running")
    assert "1 of 2 ended" in anyone["next_step"] and all("next_step" not in row for row in anyone["runs"])
    assert any("ended" in note and held["run_id"] in note for note in notes), notes
    assert [row["run_id"] for row in stopped["runs"]] == [held["run_id"]]
    assert "already ended" in stopped["errors"][quick["run_id"]]
    assert everyone["ended"] is True and [row["status"] for row in everyone["runs"]] == [
        "completed",
        "stopped",
    ]
    assert everyone["next_step"].startswith("All 2 ended (1 completed, 1 stopped)")


@pytest.mark.anyio
async def test_list_experiments_answers_within_4_kb_with_fewer_rows_and_a_cursor_for_the_rest(
    server: BackpropServer, service: Service
) -> None:
    store = service.store.ensure()
    many = [f"run-{i:03d}" for i in range(60)]
    for run_id in many:
        add_run(
            store, run_id, name=f"lr-sweep-{run_id}", args=["--learning-rate", "0.001", "--width", "1024"] * 3
        )
    async with connect(server, "legacy") as client:
        pages, cursor = [], None
        while True:
            result = await client.call_tool(
                "list_experiments", {"limit": 100, **({"cursor": cursor} if cursor else {})}
            )
            assert not result.is_error and result.structured_content is not None, result.content
            pages.append(result)
            cursor = result.structured_content.get("next_cursor")
            if cursor is None:
                break
    texts = [block.text for page in pages for block in page.content if isinstance(block, TextContent)]
    assert len(texts) > 1 and all(len(text.encode()) <= ANSWER_BYTES for text in texts)
    listed = [row["run_id"] for page in pages for row in (page.structured_content or {})["runs"]]
    assert listed == many[::-1]  # every run once, newest first, none lost between pages


@pytest.mark.anyio
async def test_get_logs_without_a_tail_fits_4_kb_and_with_one_gives_what_was_asked(
    server: BackpropServer, project: Path
) -> None:
    (project / "chatty.py").write_text("for i in range(60):\n    print(str(i) * 300)\n", encoding="utf-8")
    async with connect(server, "legacy") as client:
        run = await run_to_end(client, script="chatty.py")
        bounded = await client.call_tool("get_logs", {"run_id": run["run_id"]})
        asked = await call(client, "get_logs", run_id=run["run_id"], tail=50)
    text = bounded.content[0].text if isinstance(bounded.content[0], TextContent) else ""
    lines = json.loads(text)["lines"]
    assert len(text.encode()) <= ANSWER_BYTES and json.loads(text)["truncated"] is True
    assert lines[-1] == "59" * 300 and 0 < len(lines) < 50
    assert len(asked["lines"]) == 50


@pytest.mark.anyio
async def test_the_servers_own_defaults_apply_below_a_calls_arguments_and_are_in_its_instructions(
    service: Service, project: Path
) -> None:
    server = build_server(
        service=service,
        roots=Roots((project,), "option"),
        cwd=project,
        defaults={"max_parallel": 1, "max_run_minutes": 2.0},
    )
    async with connect(server, "legacy") as client:
        instructions = client.instructions or ""
        plain = await call(client, "run_training", script="train.py", dry_run=True)
        mine = await call(
            client,
            "run_training",
            script="train.py",
            dry_run=True,
            max_run_minutes=3,
            options={"max_parallel": 4},
        )
        machine = await call(client, "get_status")
    assert "max_parallel=1, max_run_minutes=2.0" in instructions
    assert (plain["options"]["max_parallel"], plain["options"]["max_run_minutes"]) == (1, 2.0)
    assert (mine["options"]["max_parallel"], mine["options"]["max_run_minutes"]) == (4, 3.0)
    assert machine["limits"]["max_parallel"] == 1


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["--max-parallel", "0"], "option --max-parallel must be a whole number from 1 to 1024, got 0"),
        (["--max-run-minutes", "soon"], "option --max-run-minutes must be a number"),
        (["--config", "no-such.json"], "--config no-such.json: no such file"),
    ],
)
def test_a_bad_server_option_stops_the_server_with_a_message(
    tmp_path: Path, arguments: list[str], fragment: str
) -> None:
    done = subprocess.run(
        [*server_command(), *arguments],
        capture_output=True,
        text=True,
        check=False,
        timeout=WAIT,
        cwd=tmp_path,
        env=isolated_env(tmp_path / "home"),
        stdin=subprocess.DEVNULL,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert fragment in done.stderr and "Traceback" not in done.stderr


@pytest.mark.anyio
async def test_get_metrics_gives_curves_with_the_true_best_within_4_kb_unless_more_points_are_asked(
    server: BackpropServer, project: Path
) -> None:
    shutil.copy(FIXTURES / "trains_a_tiny_model_by_lr_and_width.py", project / "sweep.py")
    async with connect(server, "legacy") as client:
        runs = [
            await run_to_end(client, script="sweep.py", args=["--lr", lr, "--steps", "300"])
            for lr in ("0.1", "0.01", "0.001")
        ]
        ids = [run["run_id"] for run in runs]
        bounded = await client.call_tool("get_metrics", {"run_ids": ids})
        asked = await client.call_tool("get_metrics", {"run_ids": ids, "points": 50})
        one = await call(client, "get_metrics", run_ids=ids[:1], metrics=["loss"], points=20)
    text = bounded.content[0].text if isinstance(bounded.content[0], TextContent) else ""
    more = asked.content[0].text if isinstance(asked.content[0], TextContent) else ""
    assert len(text.encode()) <= ANSWER_BYTES < len(more.encode())
    answer = json.loads(text)
    assert [run["run_id"] for run in answer["runs"]] == ids
    assert {"loss", "val_loss", "val_acc"} <= set(answer["runs"][0]["metrics"])
    [run] = one["runs"]
    loss = run["metrics"]["loss"]
    assert (
        len(loss["steps"]) == len(loss["values"]) <= 20 and loss["steps"][0] == 1 and loss["steps"][-1] == 300
    )
    # The loss falls all the way: the best is the last point, whatever the downsampling kept.
    assert (loss["best_step"], loss["last_step"]) == (300, 300) and loss["best"] == loss["last"]


@pytest.mark.anyio
async def test_the_machines_status_gives_each_queued_run_its_place_in_the_queue(
    service: Service, project: Path
) -> None:
    shutil.copy(FIXTURES / "waits_forever.py", project / "blocker.py")
    server = build_server(
        service=service, roots=Roots((project,), "option"), cwd=project, defaults={"max_parallel": 1}
    )
    async with connect(server, "legacy") as client:
        blocker = await call(client, "run_training", script="blocker.py", **GENEROUS)
        wait_until(lambda: service.get(blocker["run_id"])["status"] == "running", what="the blocker to run")
        first = await call(client, "run_training", script="train.py", **GENEROUS)
        second = await call(client, "run_training", script="train.py", **GENEROUS)
        machine = await call(client, "get_status")
        await call(
            client, "stop_run", run_id=[blocker["run_id"], first["run_id"], second["run_id"]], force=True
        )
    queued = [(row["run_id"], row.get("queue_position")) for row in machine["queued_runs"]]
    assert queued == [(first["run_id"], 1), (second["run_id"], 2)]

    def all_stopped() -> bool:
        return all(service.get(r["run_id"])["status"] == "stopped" for r in (blocker, first, second))

    wait_until(all_stopped, what="the three runs to stop")
