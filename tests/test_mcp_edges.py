"""The edges of the agent surface (issue 11): answers that stay within 4 KB when a script's lines or
metric names are as long as they get, advice that is right for a run that never started, and curves
of numbers as large as a float holds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mcp import Client
from mcp_types import TextContent

from backprop_mcp.cli.curves import sparkline
from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.records import new_record
from backprop_mcp.mcp_server.app import BackpropServer
from backprop_mcp.mcp_server.read_tools import ANSWER_BYTES
from backprop_mcp.mcp_server.roots import Roots
from backprop_mcp.mcp_server.summary import summary
from backprop_mcp.runs.service import Service
from tests.helpers import FIXTURES
from tests.test_mcp_tools import call, connect, make_server, run_to_end, write_script


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    write_script(folder)
    for fixture in ("fails_with_long_lines.py", "reports_many_long_metric_names.py"):
        shutil.copy(FIXTURES / fixture, folder / fixture)
    return folder


@pytest.fixture
def server(service: Service, project: Path) -> BackpropServer:
    return make_server(service, Roots((project,), "option"), project)


async def _bytes(client: Client, tool: str, **arguments: object) -> tuple[bool, str]:
    """A call's error flag and its text, whether it failed or not."""
    result = await client.call_tool(tool, arguments)
    text = "".join(block.text for block in result.content if isinstance(block, TextContent))
    return bool(result.is_error), text


@pytest.mark.anyio
async def test_a_failed_runs_status_and_wait_keep_its_last_lines_within_4_kb(server: BackpropServer) -> None:
    async with connect(server, "legacy") as client:
        run = await run_to_end(client, script="fails_with_long_lines.py", name="n" * 200)
        for tool, arguments in (
            ("get_status", {"run_id": run["run_id"]}),
            ("wait_for_run", {"run_id": run["run_id"], "until": "end"}),
        ):
            error, text = await _bytes(client, tool, **arguments)
            assert not error, text
            assert len(text.encode("utf-8")) <= ANSWER_BYTES, (tool, len(text.encode("utf-8")))
            answer = await call(client, tool, **arguments)
            # The last line, the one that says why, is there (cut, not dropped).
            assert answer["log_tail"][-1].startswith("ValueError: yyy"), answer["log_tail"]


@pytest.mark.anyio
async def test_answers_naming_the_metrics_a_run_reported_stay_within_4_kb(server: BackpropServer) -> None:
    async with connect(server, "legacy") as client:
        ids = [
            (await run_to_end(client, script="reports_many_long_metric_names.py"))["run_id"] for _ in range(2)
        ]
        error, text = await _bytes(client, "get_metrics", run_ids=ids, metrics=["val_acc"])
        assert not error, text
        assert len(text.encode("utf-8")) <= ANSWER_BYTES, len(text.encode("utf-8"))
        answer = await call(client, "get_metrics", run_ids=ids, metrics=["val_acc"])
        available = answer["runs"][0]["available"]
        assert available[0] == "loss" and available[-1].startswith("...(+"), available
        error, text = await _bytes(client, "compare_runs", run_ids=ids, metric="val_acc")
        assert error and "val_acc" in text and "more" in text, text
        assert len(text.encode("utf-8")) <= ANSWER_BYTES, len(text.encode("utf-8"))


def test_a_sparkline_of_values_as_large_as_a_float_holds_draws_every_point() -> None:
    values = [1e308, -1e308, 1e308, 0.0, -1.7e308]
    line = sparkline(range(len(values)), values)
    assert len(line) == len(values) and line[0] == "█" and line[4] == "▁", line


def _record(**fields: object) -> dict[str, object]:
    return dict(new_record(run_id="a-1", script="/p/t.py", created_at=now_iso(), name="a", **fields))


def test_a_run_that_timed_out_in_the_queue_is_not_told_it_was_never_queued() -> None:
    waited = summary(
        _record(
            status="rejected",
            termination_reason="queue_timeout",
            status_detail="waited 60 min in the queue: 2 runs live = max parallel 2",
        )
    )
    assert waited["reason"].startswith("waited 60 min in the queue")
    assert "not queued" not in waited["next_step"] and '"queue": true' not in waited["next_step"]
    assert "queue_timeout_minutes" in waited["next_step"], waited["next_step"]


@pytest.mark.parametrize(
    ("why", "detail"),
    [
        ("start_failed", "could not start /p/.venv/bin/python: Permission denied"),
        ("queue_error", "waited 60 min in the queue; the run queue could not be used: disk full"),
    ],
)
def test_a_run_that_failed_before_its_script_started_says_why_and_not_to_read_its_empty_logs(
    why: str, detail: str
) -> None:
    failed = summary(_record(status="failed", termination_reason=why, status_detail=detail))
    assert failed["reason"] == f"{why}: {detail}", failed
    assert "get_logs" not in failed["next_step"] and "never started" in failed["next_step"], failed


@pytest.mark.anyio
async def test_a_call_on_several_runs_names_every_id_that_does_not_exist_at_once(
    server: BackpropServer,
) -> None:
    async with connect(server, "legacy") as client:
        run = await run_to_end(client, script="train.py", args=["2"])
        ids = [run["run_id"], "nope-1", run["run_id"], "nope-2"]
        for tool, arguments in (
            ("wait_for_run", {"run_id": ids, "until": "any", "timeout_seconds": 1}),
            ("compare_runs", {"run_ids": ids}),
            ("get_metrics", {"run_ids": ids}),
        ):
            error, text = await _bytes(client, tool, **arguments)
            assert error and text.startswith("RunNotFound:"), (tool, text)
            assert "'nope-1'" in text and "'nope-2'" in text and run["run_id"] not in text, (tool, text)


@pytest.mark.anyio
async def test_the_metrics_of_a_run_that_reported_none_say_so(server: BackpropServer, project: Path) -> None:
    (project / "prints_nothing.py").write_text("", encoding="utf-8")
    async with connect(server, "legacy") as client:
        run = await run_to_end(client, script="prints_nothing.py")
        answer = await call(client, "get_metrics", run_ids=[run["run_id"]])
        assert "reported no metrics" in answer["runs"][0]["note"], answer
        error, text = await _bytes(client, "compare_runs", run_ids=[run["run_id"]])
        assert error and "they reported: none" in text and "none yet" not in text, text
