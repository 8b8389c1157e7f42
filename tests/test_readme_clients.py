"""The README's client commands, run against the real clients: Claude Code's `claude mcp add` lines
must register a server that `claude mcp list` reports Connected, and the MCP Inspector's command
line must list the tools. The clients are Node.js packages that `.ci/run` installs into
`.ci-clients/` (or the folder BACKPROP_CLIENTS_DIR names); without them the tests are skipped and
say why."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# `claude mcp list` starts every registered server and waits for its initialize answer; a cold
# start of the Python server on a busy 2-core machine takes a few seconds, the client's own
# health-check timeout is 30 s.
CLIENT_TIMEOUT_SECONDS = 120


def _clients_dir() -> Path:
    return Path(os.environ.get("BACKPROP_CLIENTS_DIR") or ROOT / ".ci-clients")


def _client_bin(name: str) -> Path:
    path = _clients_dir() / "node_modules" / ".bin" / name
    if not path.exists():
        pytest.skip(
            f"{name} is not installed in {_clients_dir()} (`.ci/run` installs it with npm; "
            "or set BACKPROP_CLIENTS_DIR to an npm prefix that has it)"
        )
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed")
    return path


def readme_lines(prefix: str) -> list[str]:
    """Command lines of the README's shell blocks that start with `prefix`, comments cut."""
    blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith(prefix)]


def _client_env(home: Path) -> dict[str, str]:
    bin_dirs = [str(Path(sys.executable).parent), str(_clients_dir() / "node_modules" / ".bin")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKPROP_")}
    env.update(HOME=str(home), PATH=os.pathsep.join([*bin_dirs, env.get("PATH", "")]))
    env.pop("VIRTUAL_ENV", None)
    return env


def test_the_readme_shows_claude_code_lines_for_a_project_and_for_every_project() -> None:
    lines = readme_lines("claude mcp add")
    assert len(lines) == 2, lines
    assert any("--scope user" in line for line in lines)


def test_every_claude_mcp_add_line_of_the_readme_registers_a_server_claude_code_reports_connected(
    tmp_path: Path,
) -> None:
    _client_bin("claude")
    lines = readme_lines("claude mcp add")
    # The lines are alternatives (one project, or every project): each gets a user of its own.
    for number, line in enumerate(lines):
        home, project = tmp_path / f"home{number}", tmp_path / f"project{number}"
        home.mkdir()
        project.mkdir()
        env = _client_env(home)
        # The README's lines use "$PWD" and "$HOME": a shell expands them, as in the user's terminal.
        added = subprocess.run(
            ["bash", "-c", line],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT_SECONDS,
            check=False,
        )
        assert added.returncode == 0, f"{line!r} failed: {added.stdout}{added.stderr}"
        listed = subprocess.run(
            ["claude", "mcp", "list"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT_SECONDS,
            check=False,
        )
        servers = [entry for entry in listed.stdout.splitlines() if entry.startswith("backprop:")]
        assert len(servers) == 1, f"{line!r}: {listed.stdout}{listed.stderr}"
        assert "Connected" in servers[0], f"{line!r}: {listed.stdout}{listed.stderr}"


def test_the_readme_inspector_line_lists_the_tools(tmp_path: Path) -> None:
    _client_bin("mcp-inspector")
    (line,) = readme_lines("npx @modelcontextprotocol/inspector")
    project = tmp_path / "project"
    project.mkdir()
    env = _client_env(tmp_path)
    # npx finds the package installed under the clients folder when it runs there; "$PWD" in the
    # README's line is the project, so it is given explicitly.
    command = line.replace('"$PWD"', str(project))
    listed = subprocess.run(
        ["bash", "-c", command],
        cwd=_clients_dir(),
        env=env,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_SECONDS,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    names = {tool["name"] for tool in json.loads(listed.stdout)["tools"]}
    assert {"run_training", "resume_run", "get_status", "list_experiments"} <= names
