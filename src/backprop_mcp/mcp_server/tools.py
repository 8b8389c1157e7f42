"""The MCP tools of backprop-mcp and the server that serves them. The tools live in modules by
concern (`run_tools`: start, resume, stop; `read_tools`: status, wait, list, compare, metrics,
logs; `plot_tools`: curves as an image; `sweep_tools`: sweeps); each module's `build(app)` returns
its tools, and TOOL_SETS lists the modules, so a new family of tools is one module and one line
here."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from mcp.server.mcpserver.tools import Tool

from backprop_mcp import __version__
from backprop_mcp.mcp_server import plot_tools, read_tools, run_tools, sweep_tools
from backprop_mcp.mcp_server.app import WAIT_POLL_SECONDS, App, BackpropServer, add_resources
from backprop_mcp.mcp_server.roots import Roots
from backprop_mcp.mcp_server.shapes import INSTRUCTIONS

if TYPE_CHECKING:
    from backprop_mcp.runs.service import Service

# Every module of tools, in the order tools/list shows them.
TOOL_SETS: tuple[Callable[[App], list[Tool]], ...] = (
    run_tools.build,
    read_tools.build,
    plot_tools.build,
    sweep_tools.build,
)


def build_tools(app: App) -> list[Tool]:
    """The tools of every module, bound to the app."""
    return [tool for build in TOOL_SETS for tool in build(app)]


def instructions(defaults: Mapping[str, object]) -> str:
    """The server's instructions, with its own run defaults when it has any (they are short)."""
    if not defaults:
        return INSTRUCTIONS
    shown = ", ".join(f"{name}={value}" for name, value in defaults.items())
    return INSTRUCTIONS + f"This server's defaults for new runs: {shown}.\n"


def build_server(
    *,
    service: Service | None = None,
    home: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    roots: Roots,
    poll_seconds: float = WAIT_POLL_SECONDS,
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "WARNING",
    defaults: Mapping[str, object] | None = None,
    config_file: Path | None = None,
) -> BackpropServer:
    """The server: a given service (tests), or one over `home` created on the first tool call.
    `defaults` are run options for every call (below the call's own), `config_file` replaces the
    project's config file (`backprop-mcp --config FILE`)."""
    workdir = cwd or Path.cwd()

    def make_service() -> Service:
        if service is not None:
            return service
        from backprop_mcp.runs.service import Service

        return Service(home, env=env, cwd=workdir, config_file=config_file)

    app = App(make_service, roots, workdir, poll_seconds, defaults)
    server = BackpropServer(
        functools.partial(build_tools, app),
        name="backprop-mcp",
        title="backprop",
        version=__version__,
        instructions=instructions(app.defaults),
        log_level=log_level,
    )
    add_resources(server, app)
    return server
