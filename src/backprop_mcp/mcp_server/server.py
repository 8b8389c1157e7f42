"""The `backprop-mcp` command: parses its options (the allowed roots, and run defaults for every
call such as `--max-parallel 3`), fixes the allowed roots and serves the tools (`tools`) over stdio.

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
from backprop_mcp.core.config import load_settings, parse_overrides
from backprop_mcp.core.errors import ConfigError
from backprop_mcp.core.settings import FIELDS_BY_NAME
from backprop_mcp.mcp_server.roots import configured_roots

log = logging.getLogger("backprop_mcp.mcp")

# The run settings the server takes as options, under the names `backprop run` gives them: the
# defaults an agent should not have to repeat on every call. Rarer ones go in a --config file.
DEFAULT_OPTIONS = (
    "max_run_minutes",
    "max_parallel",
    "queue_timeout_minutes",
    "min_free_ram_gb",
    "max_cpu_percent",
    "gpu_memory_limit",
    "grace_seconds",
    "backend",
    "ray_address",
    "ray_storage",
)


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
        "--config",
        metavar="FILE",
        help="a backprop.config.json read instead of the one found from each script's folder",
    )
    defaults = parser.add_argument_group(
        "run defaults",
        "for every call of this server: below a call's own arguments, above config files "
        "and BACKPROP_* variables (a resumed run keeps its own)",
    )
    for name in DEFAULT_OPTIONS:
        spec = FIELDS_BY_NAME[name]
        # argparse formats help with %: "80%" of a GPU would break --help.
        defaults.add_argument(spec.option, dest=name, metavar="VALUE", help=spec.help.replace("%", "%%"))
    defaults.add_argument(
        "--no-queue",
        dest="queue",
        action="store_false",
        default=None,
        help="refuse runs when the machine is busy",
    )
    defaults.add_argument(
        "--no-gpu", dest="use_gpu", action="store_false", default=None, help="run on CPU only, skip GPU rules"
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
        defaults, config_file = run_defaults(args, env, cwd)
        roots = configured_roots(args.root, env, cwd, config_file=config_file)
    except ConfigError as exc:
        print(f"backprop-mcp: {exc}", file=sys.stderr)
        return 2
    if roots.source == "none":
        log.warning("no allowed root: runs are refused unless the client announces roots (%s)", roots.hint())
    log.info("allowed roots (%s): %s", roots.source, ", ".join(map(str, roots.paths)) or "none")

    from backprop_mcp.mcp_server.tools import build_server

    server = build_server(
        home=home,
        env=env,
        cwd=cwd,
        roots=roots,
        log_level=args.log_level,
        defaults=defaults,
        config_file=config_file,
    )
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C in a terminal: a quiet exit
        server.run("stdio")
    return 0


def run_defaults(
    args: argparse.Namespace, env: dict[str, str], cwd: Path
) -> tuple[dict[str, object], Path | None]:
    """The server's run defaults, validated by the settings table (a bad one names the option and
    what it allows), and its --config file, read once now so that a bad one stops the server."""
    given = {name: getattr(args, name) for name in (*DEFAULT_OPTIONS, "queue", "use_gpu")}
    defaults = parse_overrides({k: v for k, v in given.items() if v is not None}, "option")
    config_file = None
    if args.config:
        config_file = Path(args.config).expanduser().resolve()
        if not config_file.is_file():
            raise ConfigError(f"--config {args.config}: no such file")
        load_settings(cwd, env, config_file=config_file)
    return defaults, config_file


if __name__ == "__main__":
    raise SystemExit(main())
