"""The installed `backprop-mcp` over real stdio, in both protocol eras: a real run started, waited
for, resumed and listed; the client leaving while a run is live; and nothing but protocol on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from backprop_mcp.core.records import TERMINAL_STATES
from backprop_mcp.runs.service import Service
from tests.helpers import isolated_env
from tests.test_mcp_tools import ERAS, GENEROUS, call, wait_end, write_script

# Bounds every wait: starting Python processes on a loaded CI machine is slow.
WAIT = 90
# A server whose client closed stdin must be gone within this (the SDK's client kills it at 2 s).
EXIT_SECONDS = 10


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def server_command() -> list[str]:
    """The installed console script, else the module (same code, same entry point)."""
    script = Path(sys.executable).with_name("backprop-mcp")
    return [str(script)] if script.exists() else [sys.executable, "-m", "backprop_mcp.mcp_server"]


def server_env(tmp_path: Path) -> dict[str, str]:
    return isolated_env(tmp_path / "home")


async def final_state(service: Service, run_id: str) -> dict[str, Any]:
    """The run's record once it has ended, read from the store (the server is gone by then)."""
    while True:
        record = await anyio.to_thread.run_sync(service.get, run_id)
        if record["status"] in TERMINAL_STATES:
            return dict(record)
        await anyio.sleep(0.05)  # between two looks at the store, not a wait standing in for one


@pytest.mark.anyio
@pytest.mark.parametrize("era", list(ERAS))
async def test_a_run_over_stdio_is_started_waited_for_resumed_listed_and_outlives_the_client(
    tmp_path: Path, era: str
) -> None:
    project = tmp_path / "project"
    write_script(project)
    env = server_env(tmp_path)
    command, *args = server_command()
    params = StdioServerParameters(
        command=command, args=[*args, "--root", str(project)], env=env, cwd=tmp_path
    )
    gate = project / "gate"
    with anyio.fail_after(WAIT * 3):
        async with Client(params, mode=era) as client:
            assert client.protocol_version == ERAS[era]
            first = await call(
                client,
                "run_training",
                script="train.py",
                args=["100000", "0.02"],
                max_run_minutes=0.02,
                **GENEROUS,
            )
            ended = await wait_end(client, first["run_id"])
            assert (ended["status"], ended["termination_reason"]) == ("timed_out", "deadline")
            assert ended["latest_checkpoint"] == str(project / "ck.json")
            saved = json.loads((project / "ck.json").read_text(encoding="utf-8"))["step"]
            resumed = await call(client, "resume_run", run_id=first["run_id"], args=[str(saved + 2)])
            assert resumed["attempt"] == 2
            assert (await wait_end(client, first["run_id"]))["status"] == "completed"
            page = await call(client, "list_experiments")
            assert [row["run_id"] for row in page["runs"]] == [first["run_id"]]

            live = await call(
                client,
                "run_training",
                script="train.py",
                args=["3", "0", str(gate)],
                max_run_minutes=1,
                **GENEROUS,
            )
            waited = await call(
                client, "wait_for_run", run_id=live["run_id"], since="queued", timeout_seconds=60
            )
            assert waited["runs"][0]["status"] == "running"
        # The client has closed the server's stdin and the server has exited; the run goes on.
        gate.touch()
        service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=project)
        record = await final_state(service, live["run_id"])
    assert (record["status"], record["step"]) == ("completed", 3)


class Lines:
    """Reads a child's stdout line by line, keeping every line."""

    def __init__(self, process: Process) -> None:
        assert process.stdout is not None
        self.stream = process.stdout
        self.buffer = b""
        self.seen: list[bytes] = []

    async def next(self) -> bytes | None:
        while b"\n" not in self.buffer:
            try:
                self.buffer += await self.stream.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return None
        line, self.buffer = self.buffer.split(b"\n", 1)
        self.seen.append(line)
        return line

    async def rest(self) -> list[bytes]:
        while await self.next() is not None:
            pass
        if self.buffer:
            self.seen.append(self.buffer)
        return self.seen


async def request(process: Process, lines: Lines, ident: int, method: str, params: dict[str, Any]) -> Any:
    assert process.stdin is not None
    message = {"jsonrpc": "2.0", "id": ident, "method": method, "params": params}
    await process.stdin.send((json.dumps(message) + "\n").encode())
    while True:
        line = await lines.next()
        assert line is not None, "the server closed stdout"
        reply = json.loads(line)
        if reply.get("id") == ident:
            assert "error" not in reply, reply
            return reply["result"]


NOISY = """\
import os, sys
print("plain stdout from the script", flush=True)
print("stderr from the script", file=sys.stderr, flush=True)
os.write(1, b"raw write to fd 1\\n")
os.system("echo from a shell child")
print('{"step": 1, "total": 1, "loss": 0.5}', flush=True)
"""


@pytest.mark.anyio
async def test_only_protocol_reaches_stdout_and_the_server_exits_promptly_when_stdin_closes(
    tmp_path: Path,
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "noisy.py").write_text(NOISY, encoding="utf-8")
    gate = project / "gate"
    write_script(project)
    env = server_env(tmp_path)
    stderr_path = tmp_path / "server.stderr"
    with anyio.fail_after(WAIT * 2), stderr_path.open("wb") as stderr:
        process = await anyio.open_process(
            [*server_command(), "--root", str(project), "--log-level", "INFO"],
            env=env,
            cwd=tmp_path,
            stderr=stderr,
        )
        lines = Lines(process)
        init = await request(
            process,
            lines,
            1,
            "initialize",
            {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "test", "version": "1"},
            },
        )
        assert init["protocolVersion"] == "2025-11-25"
        assert process.stdin is not None
        await process.stdin.send(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n')
        tool = "tools/call"
        noisy = await request(
            process, lines, 2, tool, {"name": "run_training", "arguments": {"script": "noisy.py", **GENEROUS}}
        )
        run_id = noisy["structuredContent"]["run_id"]
        waited = await request(
            process,
            lines,
            3,
            tool,
            {"name": "wait_for_run", "arguments": {"run_id": run_id, "until": "end", "timeout_seconds": 60}},
        )
        assert waited["structuredContent"]["runs"][0]["status"] == "completed"
        logs = await request(process, lines, 4, tool, {"name": "get_logs", "arguments": {"run_id": run_id}})
        live = await request(
            process,
            lines,
            5,
            tool,
            {
                "name": "run_training",
                "arguments": {
                    "script": "train.py",
                    "args": ["2", "0", str(gate)],
                    "max_run_minutes": 1,
                    **GENEROUS,
                },
            },
        )
        live_id = live["structuredContent"]["run_id"]

        await process.stdin.aclose()
        with anyio.fail_after(EXIT_SECONDS):
            seen = await lines.rest()
            assert await process.wait() == 0
        gate.touch()
        service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=project)
        record = await final_state(service, live_id)
    messages = [json.loads(line) for line in seen]  # every stdout line is a JSON-RPC message...
    assert all(message["jsonrpc"] == "2.0" for message in messages)
    output = logs["structuredContent"]["lines"]
    for text in (
        "plain stdout from the script",
        "stderr from the script",
        "raw write to fd 1",
        "from a shell child",
    ):
        assert text in output  # ...the script's output reached its log...
        # ...and only the reply that shows the log (get_logs; wait_for_run shows a failed run's) carries it
        others = [m for m in messages if m.get("id") not in (3, 4)]
        assert not any(text in json.dumps(m) for m in others), text
        assert text.encode() not in stderr_path.read_bytes()
    assert record["status"] == "completed"


def test_the_command_reports_its_version_without_loading_the_sdk(tmp_path: Path) -> None:
    probe = (
        "import sys\n"
        "from backprop_mcp import mcp_server\n"
        "loaded = sorted(sys.modules)\n"
        "assert 'mcp' not in sys.modules and 'backprop_mcp.runs.service' not in sys.modules, loaded\n"
        "mcp_server.main(['--version'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False, timeout=WAIT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("backprop-mcp ")
    module = subprocess.run(
        [sys.executable, "-m", "backprop_mcp.mcp_server", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=WAIT,
        env={**os.environ, "BACKPROP_HOME": str(tmp_path)},
    )
    assert module.returncode == 0 and "--root DIR" in module.stdout


def test_a_bad_allowed_roots_setting_stops_the_server_with_a_message(tmp_path: Path) -> None:
    config = tmp_path / "backprop.config.json"
    config.write_text('{"allowedRoots": 5}', encoding="utf-8")
    done = subprocess.run(
        [*server_command()],
        capture_output=True,
        text=True,
        check=False,
        timeout=WAIT,
        cwd=tmp_path,
        env=server_env(tmp_path),
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    assert "allowedRoots" in done.stderr and done.stdout == ""
