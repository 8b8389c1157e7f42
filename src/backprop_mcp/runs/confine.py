"""The allowed-roots rule: which paths a request may make the server execute, read, or test for
existence. Every path-valued field of a run request, every stored path a resume reuses, and every
checkpoint a resume reads back goes through `confined` before anything else touches it.

The walk resolves a path one component at a time, as the kernel would, but looks (lstat, readlink)
only at components that lie inside a root; the first step that would lead outside the roots ends
it. So a path outside the roots is refused without the server ever looking at it, and the refusal
reads the same whether that path exists or not.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from backprop_mcp.core.errors import PathNotAllowed

PathKind = Literal["file", "folder", "interpreter"]

# The path-valued fields of a `service.RunRequest`, in the order they are checked, and how: the
# script first (the working directory is its folder unless given), the interpreter last (the
# configuration, read from the working directory, may name it). A new path-valued field must be
# added here; tests/test_security.py fails on one it does not know.
REQUEST_PATHS: dict[str, PathKind] = {
    "script": "file",
    "cwd": "folder",
    "resume_from": "file",
    "python": "interpreter",
}

# What each field is called in a refusal (the MCP argument's name in brackets).
_LABELS = {
    "cwd": "working directory (cwd)",
    "script": "script",
    "resume_from": "checkpoint (resume_from)",
    "python": "interpreter (python)",
}

# Interpreters chosen by the user's own configuration, never by an MCP argument: a stored run
# whose interpreter came from one of these may be resumed whatever folder it lies in.
CONFIGURED_SOURCES = frozenset({"config", "virtualenv", "current", "imported", "cluster"})

# Symlinks followed in one walk before the path is refused (Linux's own limit is 40).
_MAX_LINKS = 40


def real_roots(roots: Sequence[Path]) -> tuple[Path, ...]:
    """The roots with symlinks resolved: the roots themselves are the user's, so looking at them
    reveals nothing."""
    return tuple(Path(os.path.realpath(r)) for r in roots)


def confined(path: Path, roots: Sequence[Path], *, follow_last: bool = True) -> Path | None:
    """Where an absolute `path` leads, when every step of the way stays inside `roots`, else None.

    With `follow_last=False` a final symlink is not followed: a virtualenv's `bin/python` lies in
    the root even though it links to the system's interpreter. `..` after a symlink goes to the
    parent of the link's target, as it does for the kernel.
    """
    real = real_roots(roots)
    if not real or not path.is_absolute():
        return None
    path = _rebase(path, roots, real)
    pending = list(reversed(path.parts[1:]))
    current = Path(path.anchor)
    links = 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        candidate = current / name
        if not _within(candidate, real):
            if any(r.is_relative_to(candidate) for r in real):
                current = candidate  # an ancestor of a root: a real folder, on the way in
                continue
            return None
        if not pending and not follow_last:
            current = candidate
            break
        try:
            mode = os.lstat(candidate).st_mode
        except (OSError, ValueError):
            current = candidate  # missing inside a root: the rest is plain names
            continue
        if not stat.S_ISLNK(mode):
            current = candidate
            continue
        links += 1
        if links > _MAX_LINKS:
            return None
        try:
            target = Path(os.readlink(candidate))
        except (OSError, ValueError):
            return None
        if target.is_absolute():
            current = Path(target.anchor)
            pending.extend(reversed(_rebase(target, roots, real).parts[1:]))
        else:
            pending.extend(reversed(target.parts))
    return current if _within(current, real) else None


def check_path(field: str, given: str, path: Path, roots: Sequence[Path]) -> Path:
    """`path` (the absolute form of the `given` value of a request field) where it leads; refused
    when it lies outside the roots. The refusal names the value as given and the roots, nothing
    the server learnt by looking, so it is the same whether the path exists or not."""
    kind = REQUEST_PATHS[field]
    resolved = confined(path, roots, follow_last=kind != "interpreter")
    if resolved is None:
        raise not_allowed(field, given, roots)
    return resolved


def not_allowed(field: str, given: str, roots: Sequence[Path]) -> PathNotAllowed:
    shown = ", ".join(str(r) for r in real_roots(roots)) or "(none configured)"
    label = _LABELS.get(field, field)
    extra = (
        "; an interpreter must lie inside them (a virtualenv's bin/python there is fine) or be the "
        "one the user configured (omit python to use it)"
        if REQUEST_PATHS.get(field) == "interpreter"
        else ""
    )
    return PathNotAllowed(
        f"{label} {given!r} is outside the allowed roots (after following symlinks and '..'): {shown}{extra}",
        hint="add its folder to the allowed roots: the client's roots, `backprop-mcp --root DIR`, "
        'BACKPROP_ALLOWED_ROOTS or "allowedRoots" in backprop.config.json',
    )


def check_request(
    values: Mapping[str, object],
    cwd: Path,
    roots: Sequence[Path],
    configured: Callable[[], Collection[str]],
) -> None:
    """Refuse a request (the fields of `REQUEST_PATHS` in `values`) that names a path outside the
    roots. `cwd` is the absolute working directory, checked first; the other paths are taken
    relative to it. An interpreter may also be one of `configured()` (called only after the
    working directory passed, since reading the configuration looks at it)."""
    for field, kind in REQUEST_PATHS.items():
        given = values.get(field)
        if field == "cwd":
            check_path(field, given if isinstance(given, str) and given else str(cwd), cwd, roots)
            continue
        if not isinstance(given, str) or not given:
            continue
        if kind == "interpreter":
            if given in configured():
                continue
            if os.sep not in given and not (os.altsep and os.altsep in given):
                raise not_allowed(field, given, roots)  # a bare name is looked up on PATH, outside
        check_path(field, given, cwd / os.path.expanduser(given), roots)


def stored_python(record: Mapping[str, Any]) -> str | None:
    """The interpreter of a stored run that must be checked again before it is resumed through MCP:
    None when the user's configuration chose it, never an argument."""
    return None if record.get("python_source") in CONFIGURED_SOURCES else str(record.get("python") or "")


def configured_interpreters(configured: str | None, env: Mapping[str, str]) -> set[str]:
    """The interpreters the user chose outside MCP: the configured one ("python" in a config file,
    BACKPROP_PYTHON), the active virtualenv's, and backprop's own."""
    chosen = {sys.executable}
    if configured:
        chosen.add(configured)
    venv = env.get("VIRTUAL_ENV")
    if venv:
        chosen.add(str(Path(venv) / ("Scripts/python.exe" if os.name == "nt" else "bin/python")))
    return chosen


def check_allowed(script: Path, roots: Sequence[Path]) -> None:
    """A script must resolve (after symlinks and '..') inside one of the allowed roots."""
    path = script if script.is_absolute() else Path(os.path.abspath(script))
    check_path("script", str(script), path, roots)


def _within(path: Path, real: Sequence[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in real)


def _rebase(path: Path, roots: Sequence[Path], real: Sequence[Path]) -> Path:
    """`path` with a root's prefix as given (say /home/me/proj, where /home is a link) replaced by
    the root's real path, so that a path spelt through the root's own name stays inside it."""
    for given, resolved in zip(roots, real, strict=True):
        spelt = Path(os.path.normpath(given)) if given.is_absolute() else None
        if spelt is not None and spelt != resolved and path.is_relative_to(spelt):
            return resolved / path.relative_to(spelt)
    return path
