"""The `backprop-mcp` stdio MCP server, an adapter: `server` is the command, `roots` the allowed
roots, `app` the server object and what the tools share, `tools` the list of tool modules
(`run_tools`, `read_tools`: each tool one service call plus rendering) with their typed
`arguments`, `schema` what tools/list shows of a tool, `summary` the one run summary and its
next_step, `waiting` the multi-run wait, and `shapes` its texts (instructions, errors). It may
import everything below it (`runs`, `backends`, `governor`, `core`), never the CLI. This
`__init__` imports nothing, so that `backprop-mcp --version` stays instant; the SDK is loaded only
to serve.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The `backprop-mcp` console script (`backprop_mcp.mcp_server:main`)."""
    from backprop_mcp.mcp_server.server import main as serve

    return serve(argv)
