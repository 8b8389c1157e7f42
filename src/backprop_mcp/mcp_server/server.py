"""The `backprop-mcp` command: parses its options, fixes the allowed roots and serves the tools
(`tools`) over stdio.

Nothing here imports `mcp` at module level, so `backprop-mcp --version` and `--help` stay instant;
the SDK (the slow import, about a second) is loaded only when the server is about to serve.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from backprop_mcp import __version__
from backprop_mcp.core.errors import ConfigError
from backprop_mcp.mcp_server.roots import configured_roots

log = logging.getLogger("backprop_mcp.mcp")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backprop-mcp",
        description="Serve backprop's training tools to an MCP client (Claude Desktop, Claude Code, ...) "
        "over stdio. Training output goes to log files, never to stdout.",
    )
    parser.add_argument(
        "--root",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder training scripts may lie in (repeatable); default: the roots the client "
        "announces, else BACKPROP_ALLOWED_ROOTS, else allowedRoots in the config, else the working "
        "directory unless it is / or your home folder",
    )
    parser.add_argument(
        "--home",
        metavar="DIR",
        help="the experiment store (default: BACKPROP_HOME or the platform's user data folder)",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="log level of the server's own messages, written to stderr (default WARNING)",
    )
    parser.add_argument("--version", action="version", version=f"backprop-mcp {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stdio server until the client closes stdin; runs started here carry on."""
    args = _parser().parse_args(argv)
    # Before the SDK configures logging: stderr only, since stdout carries the protocol.
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="backprop-mcp %(levelname)s %(message)s"
    )
    env = dict(os.environ)
    home = Path(args.home).expanduser().resolve() if args.home else None
    cwd = Path.cwd()
    try:
        roots = configured_roots(args.root, env, cwd)
    except ConfigError as exc:
        print(f"backprop-mcp: {exc}", file=sys.stderr)
        return 2
    if roots.source == "none":
        log.warning("no allowed root: runs are refused unless the client announces roots (%s)", roots.hint())
    log.info("allowed roots (%s): %s", roots.source, ", ".join(map(str, roots.paths)) or "none")

    from backprop_mcp.mcp_server.tools import build_server

    server = build_server(home=home, env=env, cwd=cwd, roots=roots, log_level=args.log_level)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C in a terminal: a quiet exit
        server.run("stdio")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
