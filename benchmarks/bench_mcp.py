"""Figures of the MCP server: tool latency in-process on a 20,000-run store, and spawn to
`initialize` answered, each against a bare one-tool `MCPServer`."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import selectors
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
from bench_harness import BIN, PYTHON, WAIT_SECONDS, BenchError, Plan, Row, Workspace, check, median, ms, plus

from backprop_mcp.runs.service import Service

TOOL_SLACK_S = 0.005
SPAWN_RATIO_TARGET = 1.1
# Claude Desktop's handshake: the server answers it once its tools are registered.
INITIALIZE = (
    json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "backprop-bench", "version": "0"},
            },
        }
    )
    + "\n"
)
NOT_YET = "not measured yet"


def _tools_module() -> Any | None:
    if importlib.util.find_spec("backprop_mcp.mcp_server.tools") is None:
        return None
    return importlib.import_module("backprop_mcp.mcp_server.tools")


def _missing_rows(why: str, store_runs: int) -> list[Row]:
    return [
        Row(
            f"MCP get_status in-process, {store_runs:,} runs, p50",
            "constant tool",
            "-",
            f"<= floor + {ms(TOOL_SLACK_S)}",
            "-",
            NOT_YET,
            why,
        ),
        Row(
            f"MCP list_experiments in-process, {store_runs:,} runs, p50",
            "constant tool",
            "-",
            f"<= floor + {ms(TOOL_SLACK_S)}",
            "-",
            NOT_YET,
            why,
        ),
        Row(
            "MCP server: spawn to `initialize` answered",
            "bare one-tool MCPServer",
            "-",
            f"ratio <= {SPAWN_RATIO_TARGET}",
            "-",
            NOT_YET,
            why,
        ),
    ]


async def _call(target: Any, tool: str, arguments: dict[str, Any]) -> float:
    """Seconds of `target.call_tool` (a Client: the round trip; a server: its own share)."""
    began = time.perf_counter()
    result = await target.call_tool(tool, arguments)
    took = time.perf_counter() - began
    if result.is_error:
        raise BenchError(f"{tool}({arguments}) failed: {result.content}")
    return took


def _in_process(ws: Workspace, tools: Any, home: str, run_id: str, calls: int) -> dict[str, float]:
    """p50 seconds of each call, through an in-process mcp.Client and on the server alone; calls
    are interleaved round-robin with the floor's, so both see the same machine."""
    from mcp import Client
    from mcp.server.mcpserver import MCPServer

    from backprop_mcp.mcp_server.roots import Roots

    env = ws.env(home)
    service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=ws.work)
    server = tools.build_server(service=service, roots=Roots((ws.work,), "option"), cwd=ws.work)
    bare = MCPServer("bare")

    @bare.tool()
    def constant() -> int:
        """Returns 1."""
        return 1

    plan: dict[str, tuple[Any, str, dict[str, Any]]] = {
        "constant": (bare, "constant", {}),
        "get_status": (server, "get_status", {}),
        "get_status run": (server, "get_status", {"run_id": run_id}),
        "list_experiments": (server, "list_experiments", {}),
    }
    times: dict[str, list[float]] = {}

    async def main() -> None:
        async with Client(bare) as bare_client, Client(server) as our_client:
            clients = {id(bare): bare_client, id(server): our_client}
            for i in range(calls + 3):
                for key, (target, tool, arguments) in plan.items():
                    via_client = await _call(clients[id(target)], tool, arguments)
                    # The server's own share, without the client's JSON-schema check of the result.
                    alone = await _call(target, tool, arguments)
                    if i >= 3:  # the first calls warm caches and the SDK's validators
                        times.setdefault(key, []).append(via_client)
                        times.setdefault(f"server {key}", []).append(alone)

    anyio.run(main)
    return {key: median(values) for key, values in times.items()}


def spawn_to_initialize(argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> float:
    """Seconds from spawning a stdio MCP server to reading its answer to `initialize`."""
    began = time.perf_counter()
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=dict(env),
        cwd=cwd,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        proc.stdin.write(INITIALIZE.encode())
        proc.stdin.flush()
        buffer = b""
        deadline = time.monotonic() + WAIT_SECONDS
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while True:
                if not selector.select(max(deadline - time.monotonic(), 0)):
                    raise BenchError(f"{argv[0]} did not answer initialize in {WAIT_SECONDS:g} s")
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    raise BenchError(f"{argv[0]} exited (code {proc.wait()}) without answering initialize")
                buffer += chunk
                for line in buffer.split(b"\n")[:-1]:
                    if line.strip() and json.loads(line).get("id") == 1:
                        return time.perf_counter() - began
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure_mcp(ws: Workspace, plan: Plan, home: str, store_runs: int, run_id: str) -> list[Row]:
    tools = _tools_module()
    if tools is None:
        return _missing_rows(
            "backprop_mcp.mcp_server.tools does not exist yet; the harness is ready", store_runs
        )
    tool = _in_process(ws, tools, home, run_id, plan.mcp_calls)
    target = f"<= floor + {ms(TOOL_SLACK_S)}"
    rows = []
    for name, label in (
        ("get_status", "MCP get_status (the machine) in-process"),
        ("get_status run", "MCP get_status(run_id) in-process"),
        ("list_experiments", "MCP list_experiments in-process"),
    ):
        alone, floor = tool[f"server {name}"], tool["server constant"]
        client, client_floor = tool[name], tool["constant"]
        rows.append(
            Row(
                f"{label}, {store_runs:,} runs, p50",
                f"constant tool {floor * 1000:.1f} ms (via client {client_floor * 1000:.1f} ms)",
                f"{alone * 1000:.1f} ms (via client {client * 1000:.1f} ms)",
                target,
                f"floor {plus(alone - floor, precise=True)} "
                f"(via client {plus(client - client_floor, precise=True)})",
                check(alone - floor <= TOOL_SLACK_S),
                f"{plan.mcp_calls} calls; judged on the server's share: mcp.Client adds its own "
                "JSON-schema check of each result",
            )
        )
    env = ws.env(home)
    ours_argv = [str(BIN / "backprop-mcp"), "--root", str(ws.work)]
    bare_argv = [PYTHON, ws.script("bare_mcp_server.py")]
    ours, bare = [], []
    for _ in range(plan.mcp_spawns):  # interleaved, so both see the same machine
        bare.append(spawn_to_initialize(bare_argv, env, ws.work))
        ours.append(spawn_to_initialize(ours_argv, env, ws.work))
    ratio = median(ours) / median(bare)
    rows.append(
        Row(
            "MCP server: spawn to `initialize` answered",
            f"bare one-tool MCPServer {ms(median(bare))}",
            ms(median(ours)),
            f"ratio <= {SPAWN_RATIO_TARGET}",
            f"{ratio:.2f}x",
            check(ratio <= SPAWN_RATIO_TARGET),
            f"{len(ours)} spawns each",
        )
    )
    return rows
