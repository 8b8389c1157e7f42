"""The MCP tools and resources in memory, in both protocol eras: every tool, every error a model can
cause, the resources, and schemas that any client can read."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client import ClientRequestContext
from mcp_types import CallToolResult, ErrorData, ListRootsResult, Root, TextContent
from pydantic import FileUrl

from backprop_mcp.mcp_server.app import BackpropServer
from backprop_mcp.mcp_server.roots import Roots, client_roots, configured_roots, locate_script
from backprop_mcp.mcp_server.tools import build_server
from backprop_mcp.runs.service import Service
from tests.helpers import FIXTURES, isolated_env

# Every wait in these tests is bounded by this (slow CI machines start processes slowly).
WAIT = 60

# Handshake era (Claude Desktop's initialize, 2025-11-25) and the per-request era (2026-07-28):
# mode="legacy" forces the initialize handshake; mode="auto" probes server/discover first.
ERAS = {"legacy": "2025-11-25", "auto": "2026-07-28"}

# Prints progress lines, checkpoints every third step (to ck.json beside itself, its working
# directory), resumes from BACKPROP_RESUME_FROM, and exits 130 on SIGINT. argv: total steps,
# seconds per step, and an optional gate file it waits for before each step.
TRAIN = """\
import json, os, sys, time
total = int(sys.argv[1]) if len(sys.argv) > 1 else 5
delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
gate = sys.argv[3] if len(sys.argv) > 3 else None
step = 0
resume = os.environ.get("BACKPROP_RESUME_FROM")
if resume:
    with open(resume, encoding="utf-8") as handle:
        step = json.load(handle)["step"]
    print(f"resumed from step {step}", flush=True)
print("training output that is not an event", flush=True)
try:
    while step < total:
        if gate and not os.path.exists(gate):
            time.sleep(0.01)
            continue
        step += 1
        print(json.dumps({"step": step, "total": total, "loss": 1.0 / step}), flush=True)
        if step % 3 == 0:
            with open("ck.json.tmp", "w", encoding="utf-8") as handle:
                json.dump({"step": step}, handle)
            os.replace("ck.json.tmp", "ck.json")  # atomic: a stop signal never leaves half a file
            print(json.dumps({"event": "checkpoint_saved", "path": "ck.json", "step": step}), flush=True)
        time.sleep(delay)
except KeyboardInterrupt:
    print(f"interrupted at step {step}", flush=True)
    sys.exit(130)
print("training done", flush=True)
"""

# Limits that admit runs on a small, busy test machine, as the run options of a tool call.
LIMITS = {"min_free_ram_gb": 0, "max_cpu_percent": 100, "use_gpu": False, "grace_seconds": 5}
GENEROUS = {"options": LIMITS}


def write_script(folder: Path, name: str = "train.py") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text(TRAIN, encoding="utf-8")
    return script


def text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


async def call(client: Client, tool: str, **arguments: Any) -> Any:
    """A tool call that must succeed; returns its structured content."""
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    return result.structured_content


async def fails(client: Client, tool: str, **arguments: Any) -> str:
    """A tool call that must fail as a tool result (not a protocol error); returns its text."""
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result
    text = text_of(result)
    assert not text.startswith("Error executing tool"), text
    return text


async def run_to_end(client: Client, **arguments: Any) -> dict[str, Any]:
    """Start a run and wait (by wait_for_run) until it ends; returns the final record."""
    record = await call(client, "run_training", **GENEROUS, **arguments)
    return await wait_end(client, record["run_id"])


async def wait_end(client: Client, run_id: str) -> dict[str, Any]:
    """Wait (by wait_for_run) until the run ends; returns its full record (get_status detail=true)."""
    while True:
        waited = await call(client, "wait_for_run", run_id=run_id, until="end", timeout_seconds=60)
        if waited["ended"]:
            assert waited["runs"][0]["run_id"] == run_id
            return dict((await call(client, "get_status", run_id=run_id, detail=True))["record"])


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=list(ERAS))
def era(request: pytest.FixtureRequest) -> str:
    mode: str = request.param
    return mode


@pytest.fixture
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    write_script(folder)
    return folder


@pytest.fixture
def service(tmp_path: Path, project: Path) -> Service:
    env = isolated_env(tmp_path / "home")
    return Service(Path(env["BACKPROP_HOME"]), env=env, cwd=project)


def make_server(service: Service, roots: Roots, cwd: Path) -> BackpropServer:
    # A short poll keeps the tests quick; the product polls every half second.
    return build_server(service=service, roots=roots, cwd=cwd, poll_seconds=0.05)


@pytest.fixture
def server(service: Service, project: Path) -> BackpropServer:
    return make_server(service, Roots((project,), "option"), project)


@asynccontextmanager
async def connect(server: BackpropServer, era: str, **options: Any) -> AsyncIterator[Client]:
    with anyio.fail_after(WAIT * 3):
        async with Client(server, mode=era, **options) as client:
            assert client.protocol_version == ERAS[era]
            yield client


def announcing(*folders: Path) -> Any:
    async def list_roots(context: ClientRequestContext) -> ListRootsResult | ErrorData:
        return ListRootsResult(
            roots=[Root(uri=FileUrl(folder.as_uri()), name=folder.name) for folder in folders]
        )

    return list_roots


# -- tools ------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_run_training_returns_the_record_at_once_and_wait_for_run_reports_progress_until_it_ends(
    server: BackpropServer, era: str, project: Path
) -> None:
    notes: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        notes.append((progress, total, message))

    async with connect(server, era) as client:
        started = await call(
            client, "run_training", script="train.py", args=["30", "0.02"], name="first", **GENEROUS
        )
        assert started["status"] in ("queued", "running")
        assert started["run_id"].startswith("first-") and started["name"] == "first"
        assert started["args"] == ["30", "0.02"] and "wait_for_run" in started["next_step"]
        record = (await call(client, "get_status", run_id=started["run_id"], detail=True))["record"]
        assert record["script"] == str(project / "train.py")
        assert record["cwd"] == str(project)
        while True:
            result = await client.call_tool(
                "wait_for_run", {"run_id": record["run_id"], "until": "end"}, progress_callback=on_progress
            )
            waited = result.structured_content
            assert waited is not None
            if waited["ended"]:
                break
    [run] = waited["runs"]
    assert (run["status"], run["reason"], run["step"], run["total"]) == ("completed", "exit_zero", 30, 30)
    assert run["checkpoint"] == str(project / "ck.json")
    assert run["checkpoints"] == 1  # ck.json, saved ten times over: one checkpoint
    assert waited["changed"] is True
    assert "log_tail" not in waited  # the log is shown for a failed run; get_logs has it
    assert "compare_runs" in waited["next_step"] and "resume_run" not in waited["next_step"]
    assert notes, "wait_for_run sent no progress notification"
    assert all(total == 60 for _, total, _ in notes)
    assert [value for value, _, _ in notes] == sorted(value for value, _, _ in notes)
    assert any(record["run_id"] in (message or "") for _, _, message in notes)


@pytest.mark.anyio
async def test_wait_for_run_returns_at_once_for_a_run_that_has_ended(
    server: BackpropServer, era: str
) -> None:
    notes: list[str | None] = []
    async with connect(server, era) as client:
        run = await run_to_end(client, script="train.py", args=["2"])
        async with anyio.create_task_group() as group:

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                # A wait that polls at all reports at its first poll: seen here, from the client.
                notes.append(message)
                group.cancel_scope.cancel()

            result = await client.call_tool(
                "wait_for_run",
                {"run_id": run["run_id"], "timeout_seconds": 300},
                progress_callback=on_progress,
            )
    assert notes == [], "wait_for_run polled a run that had already ended"
    waited = result.structured_content
    assert waited is not None and (waited["ended"], waited["changed"]) == (True, False)


@pytest.mark.anyio
async def test_wait_for_run_returns_once_the_run_has_left_the_state_the_caller_last_saw(
    server: BackpropServer, era: str, project: Path
) -> None:
    gate = project / "gate"
    async with connect(server, era) as client:
        record = await call(
            client,
            "run_training",
            script="train.py",
            args=["3", "0", str(gate)],
            max_run_minutes=1,
            **GENEROUS,
        )
        run_id = record["run_id"]
        waited = await call(client, "wait_for_run", run_id=run_id, since="queued", timeout_seconds=60)
        assert (waited["runs"][0]["status"], waited["changed"], waited["ended"]) == ("running", True, False)
        assert 0 < waited["runs"][0]["left_s"] <= 60
        again = await call(client, "wait_for_run", run_id=run_id, since="running", timeout_seconds=1)
        assert (again["runs"][0]["status"], again["changed"], again["ended"]) == ("running", False, False)
        gate.touch()
        assert (await wait_end(client, run_id))["status"] == "completed"


@pytest.mark.anyio
async def test_a_dry_run_shows_the_command_and_the_governors_verdict_and_starts_nothing(
    server: BackpropServer, era: str, project: Path
) -> None:
    async with connect(server, era) as client:
        dry = await call(
            client,
            "run_training",
            script=str(project / "train.py"),
            args=["7"],
            dry_run=True,
            max_run_minutes=2,
            **GENEROUS,
        )
        page = await call(client, "list_experiments")
    assert dry["command"][1:] == [str(project / "train.py"), "7"]
    assert dry["cwd"] == str(project)
    assert dry["decision"]["allowed"] is True
    assert dry["options"]["max_run_minutes"] == 2
    assert dry["environment"]["BACKPROP_CHECKPOINT_EVERY_SECONDS"] == "120"
    assert page["runs"] == []


@pytest.mark.anyio
async def test_a_timed_out_run_resumes_from_its_checkpoint_under_the_same_id(
    server: BackpropServer, era: str, project: Path
) -> None:
    async with connect(server, era) as client:
        first = await run_to_end(client, script="train.py", args=["100000", "0.02"], max_run_minutes=0.02)
        assert (first["status"], first["termination_reason"]) == ("timed_out", "deadline")
        assert first["latest_checkpoint"] == str(project / "ck.json")
        saved = json.loads((project / "ck.json").read_text(encoding="utf-8"))["step"]
        resumed = await call(
            client, "resume_run", run_id=first["run_id"], args=[str(saved + 4)], max_run_minutes=1
        )
        assert (resumed["attempt"], resumed["args"]) == (2, [str(saved + 4)])
        second = await wait_end(client, first["run_id"])
        logs = await call(client, "get_logs", run_id=first["run_id"])
    assert (second["status"], second["step"], second["attempt"]) == ("completed", saved + 4, 2)
    assert (second["resume_from"], second["max_run_minutes"]) == (str(project / "ck.json"), 1)
    assert [a["status"] for a in second["attempts"]] == ["timed_out", "completed"]
    assert f"resumed from step {saved}" in logs["lines"]


@pytest.mark.anyio
async def test_a_completed_run_can_be_run_again_from_scratch(server: BackpropServer, era: str) -> None:
    async with connect(server, era) as client:
        first = await run_to_end(client, script="train.py", args=["2"])
        resumed = await call(client, "resume_run", run_id=first["run_id"], from_scratch=True)
        assert resumed["attempt"] == 2
        second = await wait_end(client, first["run_id"])
    assert (second["status"], second["attempt"], second.get("resume_from")) == ("completed", 2, None)


@pytest.mark.anyio
async def test_get_status_of_a_run_gives_its_summary_the_next_step_and_a_failed_runs_log_tail(
    server: BackpropServer, era: str, project: Path
) -> None:
    shutil.copy(FIXTURES / "exits_nonzero.py", project / "fails.py")
    async with connect(server, era) as client:
        run = await run_to_end(client, script="train.py", args=["4"], max_run_minutes=5)
        status = await call(client, "get_status", run_id=run["run_id"])
        failed = await run_to_end(client, script="fails.py")
        failing = await call(client, "get_status", run_id=failed["run_id"])
    assert status["run_id"] == run["run_id"]
    assert status["loss"] == 0.25
    assert "log_tail" not in status and "left_s" not in status and "record" not in status
    assert "compare_runs" in status["next_step"]
    assert failing["status"] == "failed" and failing["reason"] == "exit_nonzero (exit 3)"
    assert failing["log_tail"] == ["something went wrong"]
    assert "get_logs" in failing["next_step"]


@pytest.mark.anyio
async def test_get_status_without_a_run_id_describes_the_machine_and_the_verdict(
    server: BackpropServer, era: str
) -> None:
    async with connect(server, era) as client:
        status = await call(client, "get_status")
    assert status["snapshot"]["cpu_count"] >= 1
    assert status["live_runs"] == [] and status["queued_runs"] == []
    # The test's limits admit runs (no RAM floor, any CPU load, 64 in parallel, no GPU).
    assert status["verdict"]["allowed"] is True, status["verdict"]
    assert "0 runs live < max parallel 64" in status["verdict"]["checks"], status["verdict"]


@pytest.mark.anyio
async def test_list_experiments_pages_newest_first_and_filters_by_state_and_name(
    server: BackpropServer, era: str
) -> None:
    async with connect(server, era) as client:
        ids = [
            (await run_to_end(client, script="train.py", args=["1"], name=f"lr-{i}"))["run_id"]
            for i in range(3)
        ]
        first = await call(client, "list_experiments", limit=2)
        second = await call(client, "list_experiments", limit=2, cursor=first["next_cursor"])
        named = await call(client, "list_experiments", name="lr-1")
        failed = await call(client, "list_experiments", status="failed")
    assert [row["run_id"] for row in first["runs"] + second["runs"]] == ids[::-1]
    assert first["next_cursor"] and "next_cursor" not in second
    assert [row["run_id"] for row in named["runs"]] == [ids[1]]
    assert failed["runs"] == []


@pytest.mark.anyio
async def test_stop_run_stops_a_live_run_gracefully_and_a_second_stop_says_it_has_ended(
    server: BackpropServer, era: str, project: Path
) -> None:
    async with connect(server, era) as client:
        record = await call(
            client,
            "run_training",
            script="train.py",
            args=["5", "0", str(project / "never")],
            max_run_minutes=1,
            **GENEROUS,
        )
        await call(client, "wait_for_run", run_id=record["run_id"], since="queued")
        await call(client, "stop_run", run_id=record["run_id"])
        stopped = await wait_end(client, record["run_id"])
        again = await fails(client, "stop_run", run_id=record["run_id"])
    assert (stopped["status"], stopped["termination_reason"]) == ("stopped", "stop_requested")
    assert "already ended" in again


@pytest.mark.anyio
async def test_get_logs_returns_a_bounded_tail_of_the_runs_output(server: BackpropServer, era: str) -> None:
    async with connect(server, era) as client:
        run = await run_to_end(client, script="train.py", args=["20"])
        logs = await call(client, "get_logs", run_id=run["run_id"], tail=3)
        too_many = await fails(client, "get_logs", run_id=run["run_id"], tail=501)
    assert logs["lines"] == [
        '{"step": 19, "total": 20, "loss": 0.05263157894736842}',
        '{"step": 20, "total": 20, "loss": 0.05}',
        "training done",
    ]
    assert logs["truncated"] is True
    assert "tail" in too_many and "500" in too_many


@pytest.mark.anyio
async def test_compare_runs_ranks_by_the_last_or_the_best_value_and_flags_runs_that_ended_early(
    server: BackpropServer, era: str, project: Path
) -> None:
    """Issue 9, item 24 and issue 11, point 3: `dipped` fell to 0.1 and ended at 0.9. By its last
    value it ranks behind `short` (0.5), its true best shown beside; by its best, first. A run that
    timed out is flagged."""
    shutil.copy(FIXTURES / "loss_dips_then_rises.py", project / "dips.py")
    async with connect(server, era) as client:
        short = await run_to_end(client, script="train.py", args=["2"])
        long = await run_to_end(client, script="train.py", args=["8"])
        dipped = await run_to_end(client, script="dips.py", args=["0.5", "0.1", "0.9"])
        cut = await run_to_end(client, script="train.py", args=["100000", "0.02"], max_run_minutes=0.02)
        ids = [short["run_id"], long["run_id"], dipped["run_id"]]
        by_last = await call(client, "compare_runs", run_ids=ids)
        by_best = await call(client, "compare_runs", run_ids=ids, metric="loss", by="best")
        with_cut = await call(client, "compare_runs", run_ids=[*ids, cut["run_id"]])
        unknown = await fails(client, "compare_runs", run_ids=ids, metric="val_acc")
    assert (by_last["by"], by_last["lower_is_better"], by_last["top_run_id"]) == (
        "last",
        True,
        long["run_id"],
    )
    assert [(run["run_id"], run["value"]) for run in by_last["runs"]] == [
        (long["run_id"], 0.125),
        (short["run_id"], 0.5),
        (dipped["run_id"], 0.9),
    ]
    assert [(run["run_id"], run["value"]) for run in by_best["runs"]] == [
        (dipped["run_id"], 0.1),
        (long["run_id"], 0.125),
        (short["run_id"], 0.5),
    ]
    assert (
        by_best["top_run_id"] == dipped["run_id"] and f'run_id="{dipped["run_id"]}"' in by_best["next_step"]
    )
    assert by_last["runs"][2]["best"] == 0.1 and "best" not in by_last["runs"][0]  # best == last: said once
    assert by_last["runs"][0]["args"] == ["8"] and "next_step" not in by_last["runs"][0]
    flagged = {run["run_id"] for run in with_cut["runs"] if run.get("ended_early")}
    assert flagged == {cut["run_id"]}
    assert "val_acc" in unknown and "loss" in unknown  # names the metrics the runs did report


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("get_status", {}),
        ("get_logs", {}),
        ("resume_run", {}),
        ("stop_run", {}),
        ("wait_for_run", {}),
        ("compare_runs", None),
    ],
)
async def test_an_unknown_run_id_is_an_error_result_that_suggests_list_experiments(
    server: BackpropServer, era: str, tool: str, arguments: dict[str, Any] | None
) -> None:
    async with connect(server, era) as client:
        if arguments is None:
            text = await fails(client, tool, run_ids=["no-such-run"])
        else:
            text = await fails(client, tool, run_id="no-such-run", **arguments)
    assert "RunNotFound" in text and "no-such-run" in text
    assert "What to do:" in text and "list_experiments" in text


@pytest.mark.anyio
async def test_a_script_outside_the_allowed_roots_is_refused_naming_the_roots_and_how_to_add_one(
    server: BackpropServer, era: str, project: Path, tmp_path: Path
) -> None:
    elsewhere = write_script(tmp_path / "elsewhere")
    async with connect(server, era) as client:
        text = await fails(client, "run_training", script=str(elsewhere), **GENEROUS)
        dry = await fails(client, "run_training", script=str(elsewhere), dry_run=True)
        sneaky = await fails(client, "run_training", script=f"../elsewhere/{elsewhere.name}")
        page = await call(client, "list_experiments")
    assert "PathNotAllowed" in text and str(project) in text and str(elsewhere) in text
    assert "--root" in text and "BACKPROP_ALLOWED_ROOTS" in text and "allowedRoots" in text
    assert "PathNotAllowed" in dry and "PathNotAllowed" in sneaky
    assert page["runs"] == []


@pytest.mark.anyio
async def test_resuming_a_run_whose_script_is_outside_the_allowed_roots_is_refused(
    server: BackpropServer, service: Service, era: str, tmp_path: Path
) -> None:
    from backprop_mcp.runs.requests import RunRequest
    from tests.helpers import wait_for_end

    elsewhere = write_script(tmp_path / "elsewhere")
    started = service.start(RunRequest(script=str(elsewhere), options=dict(LIMITS)))
    wait_for_end(service, started["run_id"])
    async with connect(server, era) as client:
        text = await fails(client, "resume_run", run_id=started["run_id"], from_scratch=True)
    assert "PathNotAllowed" in text and str(elsewhere) in text
    assert service.get(started["run_id"])["attempt"] == 1


@pytest.mark.anyio
async def test_a_symlink_inside_a_root_to_a_script_outside_it_is_refused(
    server: BackpropServer, era: str, project: Path, tmp_path: Path
) -> None:
    (project / "link.py").symlink_to(write_script(tmp_path / "elsewhere"))
    async with connect(server, era) as client:
        text = await fails(client, "run_training", script="link.py")
    assert "PathNotAllowed" in text and str(project / "link.py") in text
    # What lies outside the roots is not told, not even where the link leads.
    assert str(tmp_path / "elsewhere") not in text


@pytest.mark.anyio
async def test_with_no_root_configured_every_run_is_refused_with_how_to_configure_one(
    service: Service, era: str, project: Path
) -> None:
    server = make_server(service, Roots((), "none", started_in=Path("/")), Path("/"))
    async with connect(server, era) as client:
        text = await fails(client, "run_training", script=str(project / "train.py"))
    assert "(none configured)" in text
    assert "no folder is allowed yet" in text and "--root" in text and "restart" in text


@pytest.mark.anyio
async def test_the_roots_the_client_announces_replace_the_configured_ones(
    service: Service, era: str, project: Path, tmp_path: Path
) -> None:
    workspace = tmp_path / "workspace"
    write_script(workspace)
    server = make_server(service, Roots((project,), "option"), project)
    async with connect(server, era, list_roots_callback=announcing(workspace)) as client:
        run = await run_to_end(client, script="train.py", args=["1"])
        text = await fails(client, "run_training", script=str(project / "train.py"))
    assert run["script"] == str(workspace / "train.py")
    assert run["status"] == "completed"
    assert "PathNotAllowed" in text and str(workspace) in text
    assert "workspace folders your MCP client announced" in text


@pytest.mark.anyio
async def test_a_client_announcing_no_local_root_leaves_the_configured_roots_in_force(
    server: BackpropServer, era: str, project: Path
) -> None:
    async with connect(server, era, list_roots_callback=announcing()) as client:
        dry = await call(client, "run_training", script="train.py", dry_run=True)
    assert dry["cwd"] == str(project)


@pytest.mark.anyio
async def test_arguments_outside_their_bounds_are_named_one_per_line_with_what_was_given(
    server: BackpropServer, era: str
) -> None:
    async with connect(server, era) as client:
        text = await fails(
            client, "run_training", script="train.py", max_run_minutes=-1, options={"stop_signal": "SIGKILL"}
        )
        missing = await fails(client, "run_training")
        limit = await fails(client, "list_experiments", limit=1000)
        timeout = await fails(client, "wait_for_run", run_id="x", timeout_seconds=301)
    assert text.startswith("Invalid arguments for run_training:")
    assert "- max_run_minutes: Input should be greater than 0 (got -1)" in text
    assert "- options.stop_signal: Input should be 'SIGINT'" in text and "(got 'SIGKILL')" in text
    assert "- script: Field required" in missing
    assert "- limit: Input should be less than or equal to 100 (got 1000)" in limit
    assert "timeout_seconds" in timeout and "300" in timeout


@pytest.mark.anyio
async def test_an_unknown_argument_names_the_nearest_one_and_a_moved_option_says_to_put_it_in_options(
    server: BackpropServer, era: str
) -> None:
    async with connect(server, era) as client:
        typo = await fails(client, "run_training", script="train.py", max_run_minute=1)
        moved = await fails(client, "run_training", script="train.py", max_parallel=3, lr=0.1)
        nested = await fails(client, "run_training", script="train.py", options={"max_paralel": 3})
        resumed = await fails(client, "resume_run", run_id="x", options={"grace_second": 3})
        logs = await fails(client, "get_logs", run_id="x", lines=5)
        page = await call(client, "list_experiments")
    assert "- max_run_minute: did you mean max_run_minutes?" in typo
    assert 'Arguments for the script itself go in args, e.g. args=["--lr", "0.01"]' in typo
    assert (
        '- max_parallel: it is a run option now; put it in options, e.g. options={"max_parallel":3}' in moved
    )
    assert "- lr\n" in moved  # no near name: listed, with where script arguments go
    assert "unknown option(s):\n- max_paralel: did you mean max_parallel?" in nested
    assert "- grace_second: did you mean grace_seconds?" in resumed
    assert "- lines" in logs and "The arguments it takes are: attempt, run_id, tail." in logs
    assert "args=" not in logs  # get_logs starts no script
    assert page["runs"] == []  # nothing started


@pytest.mark.anyio
async def test_a_bad_option_value_the_schema_cannot_express_is_explained_by_the_service(
    server: BackpropServer, era: str
) -> None:
    async with connect(server, era) as client:
        text = await fails(client, "run_training", script="train.py", options={"gpu_memory_limit": "lots"})
        missing = await fails(client, "run_training", script="nope.py")
    assert "ConfigError" in text and "gpu_memory_limit" in text and '"80%"' in text
    assert "UsageError" in missing and "script not found" in missing


@pytest.mark.anyio
async def test_resuming_a_run_without_a_checkpoint_suggests_from_scratch(
    server: BackpropServer, era: str
) -> None:
    async with connect(server, era) as client:
        run = await run_to_end(client, script="train.py", args=["2"])
        text = await fails(client, "resume_run", run_id=run["run_id"])
    assert "NoCheckpoint" in text and "from_scratch=true" in text


# -- resources --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_resources_give_a_runs_record_its_log_and_the_machine(
    server: BackpropServer, era: str
) -> None:
    async with connect(server, era) as client:
        run = await run_to_end(client, script="train.py", args=["3"])
        templates = await client.list_resource_templates()
        listed = await client.list_resources()
        record = await client.read_resource(f"backprop://runs/{run['run_id']}")
        log = await client.read_resource(f"backprop://runs/{run['run_id']}/log")
        system = await client.read_resource("backprop://system")
    assert {t.uri_template for t in templates.resource_templates} == {
        "backprop://runs/{run_id}",
        "backprop://runs/{run_id}/log",
    }
    assert [str(r.uri) for r in listed.resources] == ["backprop://system"]
    assert json.loads(text_contents(record))["status"] == "completed"
    assert record.contents[0].mime_type == "application/json"
    assert text_contents(log).splitlines()[-1] == "training done"
    assert json.loads(text_contents(system))["verdict"]["checks"]


@pytest.mark.anyio
async def test_reading_the_resource_of_an_unknown_run_is_an_error_naming_it(
    server: BackpropServer, era: str
) -> None:
    from mcp.shared.exceptions import MCPError

    async with connect(server, era) as client:
        with pytest.raises(MCPError) as caught:
            await client.read_resource("backprop://runs/no-such-run")
    assert "no-such-run" in caught.value.error.message
    assert "list_experiments" in caught.value.error.message


def text_contents(result: Any) -> str:
    return "".join(getattr(content, "text", "") for content in result.contents)


# -- what a client sees -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_every_tool_has_a_title_a_description_annotations_and_portable_schemas(
    server: BackpropServer, era: str
) -> None:
    async with connect(server, era) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) == {
        "run_training",
        "resume_run",
        "get_status",
        "list_experiments",
        "stop_run",
        "annotate_run",
        "get_logs",
        "wait_for_run",
        "compare_runs",
        "get_metrics",
        "plot_metrics",
        "run_sweep",
        "get_sweep",
        "stop_sweep",
    }
    for tool in tools.values():
        assert tool.title and tool.description and len(tool.description) > 80, tool.name
        assert "$ref" not in json.dumps(tool.input_schema), tool.name
        assert "$defs" not in tool.input_schema, tool.name
        for name, prop in tool.input_schema["properties"].items():
            assert prop.get("description"), f"{tool.name}.{name} has no description"
        if tool.name == "plot_metrics":
            # It answers with an image: a tool with an output schema must answer structured content.
            assert tool.output_schema is None
        else:
            assert tool.output_schema is not None and tool.output_schema["type"] == "object", tool.name
            assert not has_ref_cycle(tool.output_schema), tool.name
        annotations = tool.annotations
        assert annotations is not None and annotations.open_world_hint is False, tool.name
    assert "client_roots" not in tools["run_training"].input_schema["properties"]
    assert "ctx" not in tools["wait_for_run"].input_schema["properties"]
    read_only = {name for name, tool in tools.items() if tool.annotations and tool.annotations.read_only_hint}
    assert read_only == {
        "get_status",
        "list_experiments",
        "get_logs",
        "wait_for_run",
        "compare_runs",
        "get_metrics",
        "plot_metrics",
        "get_sweep",
    }
    assert tools["stop_run"].annotations and tools["stop_run"].annotations.destructive_hint is True
    assert tools["run_training"].annotations and tools["run_training"].annotations.destructive_hint is False
    assert tools["run_training"].input_schema["required"] == ["script"]


def has_ref_cycle(schema: dict[str, Any]) -> bool:
    definitions = schema.get("$defs", {})

    def refs(node: object) -> set[str]:
        if isinstance(node, dict):
            found = {node["$ref"].rsplit("/", 1)[-1]} if isinstance(node.get("$ref"), str) else set()
            return found.union(*(refs(value) for value in node.values()))
        if isinstance(node, list):
            return set().union(*(refs(value) for value in node))
        return set()

    def cyclic(name: str, seen: tuple[str, ...]) -> bool:
        return name in seen or any(cyclic(ref, (*seen, name)) for ref in refs(definitions.get(name, {})))

    return any(cyclic(name, ()) for name in definitions)


@pytest.mark.anyio
async def test_the_server_introduces_itself_with_instructions_teaching_the_pattern(
    server: BackpropServer,
) -> None:
    async with connect(server, "legacy") as client:
        instructions = client.instructions or ""
        info = client.server_info
    assert info is not None and info.name == "backprop-mcp"
    for step in ("run_training", "wait_for_run", "get_status", "resume_run", "dry_run", "short"):
        assert step in instructions


@pytest.mark.anyio
async def test_structured_results_also_come_as_json_text_for_clients_without_structured_output(
    server: BackpropServer, era: str
) -> None:
    async with connect(server, era) as client:
        result: CallToolResult = await client.call_tool("list_experiments", {})
    assert isinstance(result.content[0], TextContent)
    assert json.loads(result.content[0].text) == result.structured_content


def test_the_tools_offer_exactly_the_frameworks_and_stop_signals_the_config_accepts() -> None:
    from typing import get_args

    from backprop_mcp.core.parsers import STOP_SIGNALS
    from backprop_mcp.core.settings import FRAMEWORK_CHOICES
    from backprop_mcp.mcp_server.arguments import FrameworkName, SignalName

    assert get_args(FrameworkName) == FRAMEWORK_CHOICES
    assert get_args(SignalName) == STOP_SIGNALS


# -- the allowed-roots rule -------------------------------------------------------------------------


def test_root_options_win_over_the_variable_and_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "backprop.config.json").write_text('{"allowedRoots": ["/from/config"]}', encoding="utf-8")
    env = {"BACKPROP_ALLOWED_ROOTS": "/from/env", "HOME": "/nowhere"}
    roots = configured_roots(["a", str(tmp_path / "b")], env, tmp_path)
    assert roots == Roots((tmp_path.resolve() / "a", tmp_path.resolve() / "b"), "option")


def test_the_variable_lists_roots_separated_by_the_path_separator_and_wins_over_the_config(
    tmp_path: Path,
) -> None:
    (tmp_path / "backprop.config.json").write_text('{"allowedRoots": ["/from/config"]}', encoding="utf-8")
    env = {"BACKPROP_ALLOWED_ROOTS": os.pathsep.join(["/data/one", "/data/two"]), "HOME": "/nowhere"}
    assert configured_roots([], env, tmp_path) == Roots((Path("/data/one"), Path("/data/two")), "environment")


def test_the_config_files_allowed_roots_apply_when_nothing_else_is_given(tmp_path: Path) -> None:
    (tmp_path / "backprop.config.json").write_text('{"allowedRoots": ["/from/config"]}', encoding="utf-8")
    env = {"HOME": "/nowhere", "BACKPROP_CONFIG": str(tmp_path / "no-user-config.json")}
    assert configured_roots([], env, tmp_path) == Roots((Path("/from/config"),), "config")


def test_the_working_directory_is_the_default_root_unless_it_is_the_home_folder_or_slash(
    tmp_path: Path,
) -> None:
    env = {"BACKPROP_CONFIG": str(tmp_path / "no-user-config.json")}
    project = tmp_path / "project"
    project.mkdir()
    assert configured_roots([], {**env, "HOME": str(tmp_path)}, project) == Roots(
        (project.resolve(),), "default"
    )
    home = configured_roots([], {**env, "HOME": str(tmp_path)}, tmp_path)
    assert (home.paths, home.source) == ((), "none")
    assert "the server started in" in home.hint() and "--root" in home.hint()
    slash = configured_roots([], {**env, "HOME": str(tmp_path)}, Path("/"))
    assert (slash.paths, slash.source) == ((), "none")


def test_only_local_file_uris_among_the_clients_roots_count() -> None:
    uris = [
        "file:///home/me/my%20project",
        "file://localhost/srv/data",
        "https://example.com/x",
        "file://host/x",
    ]
    assert client_roots(uris) == (Path("/home/me/my project"), Path("/srv/data"))


def test_a_relative_script_comes_from_cwd_else_the_first_root_and_runs_in_its_folder(tmp_path: Path) -> None:
    roots = Roots((tmp_path / "root",), "option")
    assert locate_script("sub/train.py", None, roots, Path("/srv")) == (
        str(tmp_path / "root" / "sub" / "train.py"),
        str(tmp_path / "root" / "sub"),
    )
    assert locate_script("train.py", "/work", roots, Path("/srv")) == ("/work/train.py", "/work")
    assert locate_script("/abs/train.py", None, Roots((), "none"), Path("/srv")) == ("/abs/train.py", "/abs")
    assert locate_script("train.py", None, Roots((), "none"), Path("/srv")) == ("/srv/train.py", "/srv")
