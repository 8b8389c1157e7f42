"""The allowed roots of the MCP server: which folders its training scripts may come from, where
that list came from (the client, `--root`, the environment, the config, the working directory),
and how a relative script is located in them."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from backprop_mcp.core.config import load_settings
from backprop_mcp.core.settings import FIELDS_BY_NAME

RootsSource = Literal["client", "option", "environment", "config", "default", "none"]

_CONFIGURE = (
    'pass `--root DIR` to backprop-mcp (repeatable; in claude_desktop_config.json: "args": '
    '["--root", "/path/to/project"]), or set BACKPROP_ALLOWED_ROOTS (folders separated by '
    f'"{os.pathsep}"), or "allowedRoots" in backprop.config.json; then restart the MCP server'
)


@dataclass(frozen=True)
class Roots:
    """The folders scripts may lie in for one call, and where that list came from."""

    paths: tuple[Path, ...]
    source: RootsSource
    started_in: Path | None = None

    def hint(self) -> str:
        """What the user can do when a script lies outside these roots."""
        if self.source == "client":
            return (
                "these roots are the workspace folders your MCP client announced: add the script's "
                "folder to the client's workspace (in Claude Code: `/add-dir DIR`), or put the "
                "script inside one of them"
            )
        if self.source == "none":
            return (
                f"no folder is allowed yet: the server started in {self.started_in}, and the "
                f"filesystem root or your home folder is never allowed by default; {_CONFIGURE}"
            )
        return f"to allow another folder, {_CONFIGURE}"


def configured_roots(
    options: Sequence[str],
    env: Mapping[str, str],
    cwd: Path,
    home: Path | None = None,
    config_file: Path | None = None,
) -> Roots:
    """The server's own roots: `--root` options, else BACKPROP_ALLOWED_ROOTS, else "allowedRoots"
    in the user's config file or the server's (`--config`, else the working directory's), else the
    working directory itself unless it is `/` or the home folder (Claude Desktop starts servers in
    `/`), in which case none.

    They are fixed at start-up on purpose: a config file found next to a script is never consulted,
    so a script's folder cannot widen its own permission.
    """
    if options:
        return Roots(_absolute(options, cwd), "option")
    raw = env.get("BACKPROP_ALLOWED_ROOTS")
    if raw:
        parsed = FIELDS_BY_NAME["allowed_roots"].parse(raw, "environment variable BACKPROP_ALLOWED_ROOTS")
        return Roots(_absolute(parsed or [], cwd), "environment")
    from_files = load_settings(
        cwd, {k: v for k, v in env.items() if k != "BACKPROP_ALLOWED_ROOTS"}, config_file=config_file
    )
    if from_files.allowed_roots:
        return Roots(_absolute(from_files.allowed_roots, cwd), "config")
    real = Path(os.path.realpath(cwd))
    home = Path(os.path.realpath(home or Path(env.get("HOME") or Path.home())))
    if real == Path(real.anchor) or real == home:
        return Roots((), "none", started_in=real)
    return Roots((real,), "default")


def client_roots(uris: Iterable[str]) -> tuple[Path, ...]:
    """The local folders among the roots a client announced (`file://` URIs; others are ignored)."""
    paths = []
    for uri in uris:
        parts = urlsplit(uri)
        if parts.scheme == "file" and parts.netloc in ("", "localhost") and parts.path:
            paths.append(Path(unquote(parts.path)))
    return tuple(paths)


def locate_script(script: str, cwd: str | None, roots: Roots, server_cwd: Path) -> tuple[str, str]:
    """(script, working directory) for a run: a relative script is taken from `cwd` when given,
    else from the first allowed root; the working directory defaults to the script's folder."""
    # os.path.expanduser, not Path's: an unknown "~user" stays as given instead of raising. Only
    # names are joined here; nothing is looked at before the service checks the roots.
    path = Path(os.path.expanduser(script))
    if not path.is_absolute():
        base = Path(os.path.expanduser(cwd)) if cwd else (roots.paths[0] if roots.paths else server_cwd)
        path = (base if base.is_absolute() else server_cwd / base) / path
    return str(path), cwd if cwd else str(path.parent)


def _absolute(paths: Iterable[str], cwd: Path) -> tuple[Path, ...]:
    return tuple(Path(os.path.realpath(cwd / Path(p).expanduser())) for p in paths)
