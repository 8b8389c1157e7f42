"""The sweep tools of the MCP server (issue 12): run_sweep, get_sweep (waiting, with progress),
stop_sweep and list_experiments(sweep=...), in memory with the MCP client against real runner and
trial processes; their refusals (a bad space, a bad option, a path outside the roots: nothing
created); the bound on an answer's size; and, over real stdio, what an agent pays to run a 6-trial
sweep, learn the best and resume it for longer (`pytest tests/test_mcp_sweeps.py -s` prints it)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from backprop_mcp.mcp_server.app import BackpropServer
from backprop_mcp.mcp_server.arguments import PATH_ARGUMENTS
from backprop_mcp.mcp_server.roots import Roots
from backprop_mcp.mcp_server.summary import size
from backprop_mcp.mcp_server.sweep_tools import ANSWER_BYTES, VALUE_CHARS, shaped
from backprop_mcp.runs.service import Service
from tests.helpers import FIXTURES, isolated_env
from tests.test_agent_budget import KB, Ledger, tools_list_bytes
from tests.test_mcp_stdio import server_command
from tests.test_mcp_tools import GENEROUS, LIMITS, call, connect, fails, make_server, text_of, write_script

# Bounds every in-memory session: a few short trials on a loaded 2-core machine.
SESSION_SECONDS = 180
# get_sweep's wait for a sweep of two held trials once they go on: a few steps each.
HELD_WAIT_SECONDS = 60
# Bounds the stdio session: 6 trials and a resume, each a real run.
STDIO_SESSION_SECONDS = 600
# The budget for a sweep, learning its best and resuming it for longer.
SWEEP_CALLS = 5
SWEEP_OUTPUT_BYTES = 12 * KB


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    write_script(folder)
    return folder


@pytest.fixture
def service(tmp_path: Path, project: Path) -> Service:
    # The runner looks at its trials often, so that a sweep ends soon after its last trial.
    env = isolated_env(tmp_path / "home", BACKPROP_SWEEP_POLL_SECONDS="0.05")
    return Service(Path(env["BACKPROP_HOME"]), env=env, cwd=project)


@pytest.fixture
def server(service: Service, project: Path) -> BackpropServer:
    return make_server(service, Roots((project,), "option"), project)


def held_sweep(gate: Path, **more: Any) -> dict[str, Any]:
    """run_sweep's arguments for two trials of train.py (steps 2 and 3) that wait for `gate` before
    each step: the script takes positional arguments, so the params fill a template."""
    return {
        "script": "train.py",
        "params": {"steps": [2, 3]},
        "metric": "loss",
        "args": ["{steps}", "0", str(gate)],
        "options": {**LIMITS, **more},
    }


@pytest.mark.anyio
async def test_get_sweep_waits_for_the_end_with_progress_and_names_the_best_with_its_args(
    server: BackpropServer, project: Path
) -> None:
    gate = project / "gate"
    notes: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        notes.append((progress, total, message))
        gate.touch()  # the trials go on once the wait has reported them held

    async with connect(server, "legacy") as client:
        # A run of no sweep, which list_experiments(sweep=...) leaves out.
        other = await call(client, "run_training", script="train.py", args=["1"], **GENEROUS)
        started = await call(client, "run_sweep", **held_sweep(gate))
        assert started["status"] == "running" and started["method"] == "grid"
        assert "get_sweep" in started["next_step"]
        result = await client.call_tool(
            "get_sweep",
            {"sweep_id": started["sweep_id"], "wait_seconds": HELD_WAIT_SECONDS},
            progress_callback=on_progress,
        )
        assert not result.is_error, text_of(result)
        done = result.structured_content
        assert done is not None
        page = await call(client, "list_experiments", sweep=started["sweep_id"])
    assert done["status"] == "completed", done
    assert done["counts"] == {"completed": 2}
    best = done["best"]
    # train.py's loss is 1/step: the trial of 3 steps ends lower.
    assert best["params"] == {"steps": 3} and best["objective"] == pytest.approx(1 / 3, rel=1e-4)
    assert best["args"] == ["3", "0", str(gate)]
    assert best["run_id"] in done["next_step"] and "resume_run" in done["next_step"]
    assert [t["number"] for t in done["trials"]] == [1, 2]
    assert notes and notes[0][1] == 2 and "0 of 2 trials ended" in (notes[0][2] or ""), notes
    assert sorted(row["run_id"] for row in page["runs"]) == sorted(t["run_id"] for t in done["trials"])
    assert other["run_id"] not in [row["run_id"] for row in page["runs"]] and "sweep" not in other
    assert {row.get("sweep") for row in page["runs"]} == {started["sweep_id"]}
    assert size(done) <= ANSWER_BYTES


@pytest.mark.anyio
async def test_stop_sweep_stops_it_as_a_whole_and_a_second_stop_says_it_has_ended(
    server: BackpropServer, project: Path
) -> None:
    gate = project / "never"  # the trials wait for it forever: only the stop ends them
    async with connect(server, "legacy") as client:
        started = await call(client, "run_sweep", **held_sweep(gate, parallel=1))
        sweep_id = started["sweep_id"]
        while not (await call(client, "get_sweep", sweep_id=sweep_id))["counts"].get("running"):
            await anyio.sleep(0.05)
        stopping = await call(client, "stop_sweep", sweep_id=sweep_id)
        ended = await call(client, "get_sweep", sweep_id=sweep_id, wait_seconds=HELD_WAIT_SECONDS)
        again = await fails(client, "stop_sweep", sweep_id=sweep_id)
        unknown = await fails(client, "get_sweep", sweep_id="no-such-sweep")
    assert stopping["sweep_id"] == sweep_id
    assert ended["status"] == "stopped", ended
    assert [t["status"] for t in ended["trials"]] == ["stopped"]  # the second trial never started
    assert ended["budget"]["started"] == 1
    assert "already ended" in again
    assert "no sweep with id 'no-such-sweep'" in unknown and "run_sweep returned its sweep_id" in unknown


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        ({"params": {"lr": "gaussian(0,1)"}}, "is not a distribution; use a list of values"),
        ({"params": {"lr": "loguniform(0,1)"}}, "loguniform"),
        ({"params": {"--lr": [1]}}, "parameter name '--lr' is not allowed"),
        ({"params": {}}, "params"),
        ({"mode": "minimize"}, "mode"),
        ({"method": "grid", "params": {"lr": "uniform(0,1)"}}, "grid"),
        ({"max_trials": 0}, "max_trials"),
        ({"options": {"paralel": 2}}, "did you mean parallel?"),
        ({"options": {"objective": "median"}}, "objective"),
        ({"options": {"budget_minutes": -1}}, "budget_minutes"),
        ({"script": "missing.py"}, "script not found"),
    ],
)
async def test_a_bad_sweep_is_refused_with_what_is_allowed_and_creates_nothing(
    server: BackpropServer, service: Service, arguments: dict[str, Any], says: str
) -> None:
    given = {"script": "train.py", "params": {"lr": [0.1, 0.01]}, "metric": "loss", **arguments}
    async with connect(server, "legacy") as client:
        text = await fails(client, "run_sweep", **given)
    assert says in text, text
    assert "Traceback" not in text
    sweeps = service.store.home / "sweeps"
    assert not sweeps.exists() or not any(sweeps.iterdir())
    assert service.list_runs()["runs"] == []


@pytest.mark.anyio
@pytest.mark.parametrize("argument", sorted(PATH_ARGUMENTS["run_sweep"]))
async def test_each_path_argument_of_run_sweep_outside_the_roots_is_refused_and_nothing_runs(
    server: BackpropServer, service: Service, tmp_path: Path, argument: str
) -> None:
    outside = tmp_path / "outside"
    marker = outside / "ran"
    script = write_script(outside, "evil.py")
    interpreter = outside / "python"
    interpreter.write_text(f"#!/bin/sh\ntouch {marker}\n", encoding="utf-8")
    interpreter.chmod(0o755)
    value = {"script": str(script), "cwd": str(outside), "python": str(interpreter)}[argument]
    given = {"script": "train.py", "params": {"lr": [0.1]}, "metric": "loss", argument: value, **GENEROUS}
    async with connect(server, "legacy") as client:
        text = await fails(client, "run_sweep", **given)
    assert "PathNotAllowed" in text and "What to do" in text, text
    assert not marker.exists()
    sweeps = service.store.home / "sweeps"
    assert not sweeps.exists() or not any(sweeps.iterdir())


def test_a_sweep_answer_stays_within_its_bytes_keeping_the_best_and_the_live_trials() -> None:
    # Twelve trials (as many as a sweep's answer lists) of six parameters with long string values.
    long = "x" * 150
    trials = [
        {
            "number": n,
            "run_id": f"sweep-20260101-000000-abcd-t{n}",
            "params": {f"p{i}": f"{n}{long}" for i in range(6)},
            "status": "running" if n == 12 else "completed",
            "objective": 1.0 / n if n < 12 else None,
        }
        for n in range(1, 13)
    ]
    best = {**trials[10], "objective": 1 / 11}
    answer: dict[str, Any] = {
        "sweep_id": "sweep-20260101-000000-abcd",
        "status": "running",
        "metric": "loss",
        "mode": "min",
        "method": "grid",
        "counts": {"completed": 11, "running": 1},
        "trials": trials,
        "trials_left_out": 0,
        "best": best,
        "param_summary": {
            f"p{i}": {"best": long, "by_value": {f"{n}{long}": 1.0 / n for n in range(1, 11)}}
            for i in range(6)
        },
        "budget": {"max_trials": 12, "started": 12},
    }
    cut = shaped(answer, ["--p0", long] * 100)
    assert size(cut) <= ANSWER_BYTES
    numbers = [t["number"] for t in cut["trials"]]
    assert 11 in numbers and 12 in numbers  # the best and the live one stay
    assert cut["trials_left_out"] == 12 - len(numbers)
    assert cut["best"]["number"] == 11 and len(cut["best"]["params"]["p0"]) == VALUE_CHARS
    trials[11].update(status="completed", objective=1 / 12)
    ended = shaped({**answer, "status": "completed", "best": {**trials[11], "objective": 1 / 12}}, None)
    assert size(ended) <= ANSWER_BYTES and "list_experiments(sweep=" in ended["next_step"]
    assert "sort='loss'" in ended["next_step"]
    # The list sorts ascending unless told otherwise: for a metric to maximise, the best first.
    maxed = shaped(
        {**answer, "mode": "max", "status": "completed", "best": {**trials[0], "objective": 1.0}}, None
    )
    assert "sort='-loss'" in maxed["next_step"], maxed["next_step"]


def test_a_sweep_whose_trials_all_failed_points_at_a_failed_trials_logs() -> None:
    trials = [
        {"number": 1, "run_id": "s-t1", "params": {"x": 1}, "status": "failed", "reason": "start_failed"},
        {"number": 2, "run_id": "s-t2", "params": {"x": 2}, "status": "rejected", "reason": "rejected"},
        {"number": 3, "run_id": "s-t3", "params": {"x": 3}, "status": "failed", "reason": "exit_nonzero"},
    ]
    answer: dict[str, Any] = {
        "sweep_id": "s",
        "status": "failed",
        "metric": "loss",
        "mode": "min",
        "method": "grid",
        "counts": {"failed": 2, "rejected": 1},
        "trials": [{**t, "objective": None} for t in trials],
        "trials_left_out": 0,
        "best": None,
        "param_summary": {},
        "budget": {"max_trials": 3, "started": 3},
    }
    assert "get_logs('s-t3')" in shaped(answer, None)["next_step"]
    never = shaped({**answer, "trials": answer["trials"][:1]}, None)
    assert "No trial started" in never["next_step"], never["next_step"]


@pytest.mark.anyio
async def test_an_agent_runs_a_six_trial_sweep_learns_the_best_and_resumes_it_within_the_budget(
    tmp_path: Path,
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(FIXTURES / "trains_a_tiny_model_by_lr_and_width.py", project / "sweep.py")
    command, *args = server_command()
    params = StdioServerParameters(
        command=command,
        args=[*args, "--root", str(project), "--max-parallel", "3"],
        env=isolated_env(tmp_path / "home"),
        cwd=tmp_path,
    )
    progress: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    with anyio.fail_after(STDIO_SESSION_SECONDS):
        async with Client(params, mode="legacy") as client:
            listed = await client.list_tools()
            tools_bytes = tools_list_bytes(listed)
            agent = Ledger(client)
            started = await agent.call(
                "run_sweep",
                script="sweep.py",
                params={"lr": [0.1, 0.01], "width": [16, 64, 256]},
                metric="val_loss",
                args=["--steps", "20"],
            )
            while (
                done := await agent.call(
                    "get_sweep",
                    sweep_id=started["sweep_id"],
                    wait_seconds=300,
                    progress_callback=on_progress,
                )
            )["status"] == "running":
                pass
            best = done["best"]
            resumed = await agent.call(
                "resume_run", run_id=best["run_id"], args=[*best["args"][:1], "40", *best["args"][2:]]
            )
            while not (final := await agent.call("wait_for_run", run_id=resumed["run_id"], until="end"))[
                "ended"
            ]:
                pass
    assert done["status"] == "completed" and sum(done["counts"].values()) == 6, done
    assert best["params"] == {"lr": 0.01, "width": 64}, done
    assert best["args"] == ["--steps", "20", "--lr", "0.01", "--width", "64"]
    assert resumed["attempt"] == 2
    run = final["runs"][0]
    assert (run["status"], run["step"], run["total"]) == ("completed", 40, 40), run
    assert progress, "get_sweep sent no progress notification"
    largest = max(size for _, size in agent.answers)
    print(
        f"\ntools/list {tools_bytes} B for {len(listed.tools)} tools; a 6-trial sweep, its best "
        f"learnt and resumed for longer: {agent.total} B of tool output in {len(agent.answers)} calls "
        f"({', '.join(f'{tool} {size}' for tool, size in agent.answers)}); largest answer {largest} B"
    )
    assert len(agent.answers) <= SWEEP_CALLS, agent.answers
    assert agent.total <= SWEEP_OUTPUT_BYTES, agent.answers
    assert largest <= ANSWER_BYTES, agent.answers
