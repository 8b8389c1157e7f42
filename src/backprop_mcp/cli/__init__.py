"""The `backprop` command line, an adapter: `parser` builds the argument parser, `commands` turns
each command into one service call plus rendering (`render`), and `follow` is the foreground view
of a run. It may import everything below it (`runs`, `backends`, `governor`, `core`), never the MCP
server. This `__init__` imports nothing, so that `backprop status` pays only for what it uses.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The `backprop` console script (`backprop_mcp.cli:main`)."""
    from backprop_mcp.cli.commands import main as run

    return run(argv)
