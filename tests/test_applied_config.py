"""Every answer that starts a run says which config files applied (issue 9, item 23): a
backprop.config.json beside a script silently changed an example's time box from 10 to 30
minutes. The list is kept on the run record (`config_files`), so the CLI's output, its --json,
and the MCP tools' results all carry it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from backprop_mcp.mcp_server.roots import Roots
from backprop_mcp.mcp_server.tools import build_server
from backprop_mcp.runs.service import Service
from tests.helpers import FIXTURES, cli, cli_json, isolated_env, unique_id, wait_for_end

# Bounds the MCP session: runs start slowly on a loaded 2-core machine.
SESSION_SECONDS = 120


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _project(tmp_path: Path, minutes: int | None) -> tuple[Path, Path | None]:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(FIXTURES / "counts_and_exits.py", project / "train.py")
    if minutes is None:
        return project, None
    config = project / "backprop.config.json"
    config.write_text(json.dumps({"maxRunMinutes": minutes}), encoding="utf-8")
    return project, config


@pytest.mark.anyio
async def test_run_training_and_resume_run_say_which_config_files_applied(tmp_path: Path) -> None:
    project, config = _project(tmp_path, 3)
    env = isolated_env(tmp_path / "home")
    service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=project)
    server = build_server(service=service, roots=Roots((project,), "option"), cwd=project, poll_seconds=0.05)
    with anyio.fail_after(SESSION_SECONDS):
        async with Client(server, mode="legacy") as client:
            started = await _call(client, "run_training", script="train.py", options={"use_gpu": False})
            wait_for_end(service, started["run_id"])
            # New arguments: the run completed its steps, and resuming it as it is would be refused.
            resumed = await _call(client, "resume_run", run_id=started["run_id"], args=["6"])
            dry = await _call(client, "run_training", script="train.py", dry_run=True)
    assert (started["config_files"], started["max_run_minutes"]) == ([str(config)], 3.0)
    assert (resumed["config_files"], resumed["max_run_minutes"]) == ([str(config)], 3.0)
    assert dry["config_files"] == [str(config)]
    assert service.store.read(started["run_id"])["config_files"] == [str(config)]
    wait_for_end(service, started["run_id"])


async def _call(client: Client, tool: str, **arguments: Any) -> Any:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    return result.structured_content


def test_the_cli_says_which_config_files_applied_to_a_run_it_starts(
    env: dict[str, str], tmp_path: Path
) -> None:
    detached_id = unique_id("d")
    foreground_id = unique_id("f")
    json_id = unique_id("j")
    project, config = _project(tmp_path, 4)
    detached = cli(env, "run", "train.py", "--run-id", detached_id, "--detach", cwd=project)
    assert detached.returncode == 0, detached.stderr
    assert detached.stdout == f"{detached_id}\n"  # the run id alone: scripts read it
    assert f"config: {config}" in detached.stderr
    foreground = cli(env, "run", "train.py", "--run-id", foreground_id, cwd=project)
    assert foreground.returncode == 0, foreground.stderr
    assert f"config: {config}" in foreground.stdout
    as_json = cli_json(env, "run", "train.py", "--run-id", json_id, cwd=project)
    assert (as_json["config_files"], as_json["max_run_minutes"]) == ([str(config)], 4.0)
    resumed_cli = cli(env, "resume", json_id, "--json", "--", "6", cwd=project)  # more steps: see above
    assert resumed_cli.returncode == 0, resumed_cli.stderr
    resumed = json.loads(resumed_cli.stdout)
    assert resumed["config_files"] == [str(config)]
    status = cli(env, "status", json_id, cwd=project)
    assert f"config     {config}" in status.stdout


def test_a_run_with_no_config_file_says_so(env: dict[str, str], tmp_path: Path) -> None:
    run_id = unique_id("n")
    project, _ = _project(tmp_path, None)
    done = cli(env, "run", "train.py", "--run-id", run_id, cwd=project)
    assert done.returncode == 0, done.stderr
    assert "config: (defaults, no config file)" in done.stdout
    assert cli_json(env, "status", run_id)["config_files"] == []
