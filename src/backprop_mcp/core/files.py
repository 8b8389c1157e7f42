"""The store's file primitives: atomic replacement, single-write appends, flocks, reading lines
from a file's end, and the one wording of a storage failure (a full disk, a read-only file system).
Stdlib only, like the store: the supervisor and the CLI's fast paths import it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from backprop_mcp.core.errors import StoreError

_REVERSE_BLOCK = 64 * 1024


def storage_error(action: str, path: Path, exc: OSError) -> StoreError:
    if exc.errno == errno.ENOSPC:
        why = "the disk is full"
    elif exc.errno == errno.EDQUOT:
        why = "the disk quota is exceeded"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why = "permission denied"
    elif exc.errno == errno.EROFS:
        why = "the file system is read-only"
    else:
        why = exc.strerror or str(exc)
    return StoreError(
        f"cannot {action} {path}: {why}; nothing already stored was changed",
        hint="free space or fix the permissions of the store (BACKPROP_HOME), then try again",
    )


def atomic_write(path: Path, data: bytes) -> None:
    """Write a file by temp file + fsync + rename in the same folder: readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise storage_error("write", path, exc) from None


def replace_json(path: Path, data: object) -> None:
    """Replace a JSON file by temp file + rename (0600, its folder made 0700), without fsync:
    for caches and ledgers that are rewritten often and cost nothing when a power cut loses
    them. Raises OSError, leaving no temp file behind."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def append_line(path: Path, obj: object) -> None:
    """Append one JSON line with a single O_APPEND write (atomic with respect to other appenders)."""
    data = (json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        raise storage_error("append to", path, exc) from None


@contextlib.contextmanager
def file_lock(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """An flock held for the block; the kernel drops it if the holder dies, so no stale locks."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise storage_error("lock", path, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def all_lines(path: Path) -> list[bytes]:
    try:
        return [line for line in path.read_bytes().split(b"\n") if line.strip()]
    except FileNotFoundError:
        return []


def reverse_lines(path: Path, *, before: Path | None = None) -> Iterator[bytes]:
    """Lines of a file from the last to the first, reading blocks from the end; with `before`, the
    file that came before it (a log's rotated part) goes on where it ends, as if the two were one."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(handle)]
        with contextlib.suppress(OSError):
            # Opened after `path`: if a rotation came between, both name the same file (read once).
            earlier = stack.enter_context(before.open("rb")) if before is not None else None
            if earlier is not None and not _same_file(earlier, handle):
                handles.append(earlier)
        # Pieces of the line being read backwards, last piece first. Kept as a list and joined once
        # the line's start is found: prepending to one bytes object made a 50 MB line cost O(n²).
        pending: list[bytes] = []
        for current in handles:
            current.seek(0, os.SEEK_END)
            position = current.tell()
            while position > 0:
                size = min(_REVERSE_BLOCK, position)
                position -= size
                current.seek(position)
                lines = current.read(size).split(b"\n")
                if len(lines) == 1:
                    pending.append(lines[0])
                    continue
                pending.append(lines[-1])
                line = b"".join(reversed(pending))
                if line.strip():
                    yield line
                for line in reversed(lines[1:-1]):
                    if line.strip():
                        yield line
                pending = [lines[0]]
        rest = b"".join(reversed(pending))
        if rest.strip():
            yield rest


def _same_file(one: BinaryIO, other: BinaryIO) -> bool:
    a, b = os.fstat(one.fileno()), os.fstat(other.fileno())
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def tail_lines(path: Path, limit: int, *, before: Path | None = None) -> list[bytes]:
    out: list[bytes] = []
    for line in reverse_lines(path, before=before):
        out.append(line)
        if len(out) >= limit:
            break
    out.reverse()
    return out
