"""The `backprop-mcp` stdio MCP server, an adapter: `server` is the command, `roots` the allowed
roots, `app` the server object and what the tools share, `tools` the tools (each one service call
plus rendering) with their typed `arguments`, and `shapes` its own output shapes. It may import
everything below it (`runs`, `backends`, `governor`, `core`), never the CLI. This `__init__` imports
nothing, so that `backprop-mcp --version` stays instant; the SDK is loaded only to serve.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The `backprop-mcp` console script (`backprop_mcp.mcp_server:main`)."""
    from backprop_mcp.mcp_server.server import main as serve

    return serve(argv)
