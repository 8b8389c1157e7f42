"""Where the store is, as documented (issue 15, point 4): the server's `--home DIR` over real stdio,
and, with BACKPROP_HOME unset, the platform's user data folder (`platformdirs`) for the CLI and the
server alike."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from tests.helpers import FIXTURES, cli, isolated_env, unique_id
from tests.test_mcp_stdio import WAIT, server_command
from tests.test_mcp_tools import call, wait_end

SCRIPT = FIXTURES / "prints_each_argument_as_a_line.py"
# The platform's user data folder is ~/.local/share (or $XDG_DATA_HOME) on Linux only.
LINUX_ONLY = pytest.mark.skipif(sys.platform != "linux", reason="platformdirs' Linux data folder")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def runs_in(home: Path) -> list[str]:
    folder = home / "runs"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


async def run_over_stdio(params: StdioServerParameters, run_id: str) -> None:
    """Start a run through the server and wait for its end; it must complete."""
    with anyio.fail_after(WAIT):
        async with Client(params) as client:
            await call(client, "run_training", script=str(SCRIPT), args=["over-stdio"], run_id=run_id)
            ended = await wait_end(client, run_id)
            assert ended["status"] == "completed"
            listed = await call(client, "list_experiments")
            assert [row["run_id"] for row in listed["runs"]] == [run_id]


@pytest.mark.anyio
async def test_the_server_keeps_its_runs_in_the_store_its_home_option_names(tmp_path: Path) -> None:
    home, elsewhere = tmp_path / "chosen", tmp_path / "elsewhere"
    env = isolated_env(elsewhere)  # BACKPROP_HOME points elsewhere: --home wins
    run_id = unique_id("home")
    command, *args = server_command()
    params = StdioServerParameters(
        command=command, args=[*args, "--root", str(FIXTURES), "--home", str(home)], env=env, cwd=tmp_path
    )
    await run_over_stdio(params, run_id)
    assert runs_in(home) == [run_id]
    assert (home / "runs" / run_id / "logs" / "attempt-1.log").read_text(encoding="utf-8") == "over-stdio\n"
    assert runs_in(elsewhere) == []


def without_home(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test's environment with BACKPROP_HOME unset and HOME in tmp_path."""
    env = isolated_env(tmp_path / "unused", HOME=str(tmp_path / "user"))
    del env["BACKPROP_HOME"]
    env.pop("XDG_DATA_HOME", None)
    return {**env, **extra}


@LINUX_ONLY
def test_without_backprop_home_the_cli_keeps_runs_in_the_users_data_folder(tmp_path: Path) -> None:
    env = without_home(tmp_path)
    run_id = unique_id("default")
    done = cli(env, "run", str(SCRIPT), "--run-id", run_id, "--", "hello", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    default = tmp_path / "user" / ".local" / "share" / "backprop-mcp"
    assert runs_in(default) == [run_id]
    listed = cli(env, "list")
    assert listed.returncode == 0 and run_id in listed.stdout
    assert not (tmp_path / "unused").exists()

    # XDG_DATA_HOME moves the user data folder, as platformdirs reads it on Linux.
    xdg = without_home(tmp_path, XDG_DATA_HOME=str(tmp_path / "xdg"))
    moved = cli(xdg, "run", str(SCRIPT), "--run-id", f"{run_id}-xdg", "--", "hello", cwd=tmp_path)
    assert moved.returncode == 0, moved.stderr
    assert runs_in(tmp_path / "xdg" / "backprop-mcp") == [f"{run_id}-xdg"]
    assert runs_in(default) == [run_id]


@LINUX_ONLY
@pytest.mark.anyio
async def test_without_backprop_home_or_home_option_the_server_uses_the_users_data_folder(
    tmp_path: Path,
) -> None:
    env = without_home(tmp_path)
    run_id = unique_id("server-default")
    command, *args = server_command()
    params = StdioServerParameters(
        command=command, args=[*args, "--root", str(FIXTURES)], env=env, cwd=tmp_path
    )
    await run_over_stdio(params, run_id)
    assert runs_in(tmp_path / "user" / ".local" / "share" / "backprop-mcp") == [run_id]
