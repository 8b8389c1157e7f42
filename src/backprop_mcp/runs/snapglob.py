"""Matching a `snapshot` glob under a working directory with a bounded walk: every directory entry
looked at counts against one budget per capture (a `**` in a tree of a million files must not
delay a start), and a symlinked folder that leads outside the working directory is never listed.
Pattern rules as `Path.glob`'s: `/`-separated parts, `**` for any depth (not through symlinks),
`*`, `?` and `[...]` within one name (dot files included). Stdlib only: the supervisor imports it."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterator
from pathlib import Path

# Folders deeper than this below the working directory are not walked by `**`: far past any
# project's layout, and well inside Python's recursion limit.
MAX_DEPTH = 64
_MAGIC = re.compile(r"[*?[]")


class GlobStopped(Exception):
    """The walk looked at as many directory entries as its budget allows."""


class Walk:
    """One capture's walk budget (`entries` directory entries in all) and what it left out."""

    def __init__(self, real_cwd: Path, entries: int) -> None:
        self.real_cwd, self.left = real_cwd, entries
        self.outside: list[str] = []

    def matches(self, cwd: Path, pattern: str) -> Iterator[Path]:
        """The paths under `cwd` that `pattern` names (files, folders or anything else; the caller
        picks). Raises GlobStopped when the budget runs out."""
        yield from self._match(cwd, [part for part in pattern.split("/") if part not in ("", ".")], 0)

    def _match(self, folder: Path, parts: list[str], depth: int) -> Iterator[Path]:
        if not parts:
            yield folder
            return
        head, rest = parts[0], parts[1:]
        if head == "**":
            yield from self._match(folder, rest, depth)
            if depth < MAX_DEPTH:
                for entry in self._entries(folder):
                    if entry.is_dir(follow_symlinks=False):  # like Path.glob: `**` follows no symlink
                        yield from self._match(folder / entry.name, parts, depth + 1)
            return
        if _MAGIC.search(head) is None:
            names = [head] if os.path.lexists(folder / head) else []
        else:
            rule = re.compile(fnmatch.translate(head))
            names = [entry.name for entry in self._entries(folder) if rule.fullmatch(entry.name)]
        for name in names:
            path = folder / name
            if not rest:
                yield path
            elif self._inside(path) and path.is_dir():
                yield from self._match(path, rest, depth + 1)

    def _inside(self, path: Path) -> bool:
        """Whether a folder to walk into stays inside the working directory (symlinks resolved)."""
        if not path.is_symlink():
            return True
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):  # dangling, or a loop
            return False
        if real.is_relative_to(self.real_cwd):
            return True
        self.outside.append(str(path))
        return False

    def _entries(self, folder: Path) -> list[os.DirEntry[str]]:
        """The folder's entries, by name, each counted against the budget."""
        found: list[os.DirEntry[str]] = []
        try:
            with os.scandir(folder) as listing:
                for entry in listing:
                    if self.left <= 0:
                        raise GlobStopped
                    self.left -= 1
                    found.append(entry)
        except OSError:  # unreadable or vanished: nothing to match there
            pass
        return sorted(found, key=lambda entry: entry.name)
