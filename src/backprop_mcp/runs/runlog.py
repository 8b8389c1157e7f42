"""An attempt's log file: raw stdout and stderr appended as they arrive, rotated past a size cap
so a script flooding its output for a whole time box cannot fill the disk; and the follower that
reads it as it grows (`logs -f`, the foreground view), across rotations; and why a log is empty."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from backprop_mcp.core.records import ACTIVE_STATES, RunRecord

log = logging.getLogger(__name__)

# Per attempt, the log rotates to `attempt-N.log.1` past this size, keeping at most twice it.
MAX_LOG_BYTES = 64 * 1024 * 1024
# BACKPROP_LOG_ROTATE_BYTES overrides it (tests make rotations happen with a few kB of output);
# below this floor a rotation per write would only churn the disk.
MIN_LOG_BYTES = 1024
ROTATE_ENV = "BACKPROP_LOG_ROTATE_BYTES"
# The follower reads this much at a time; a line longer than this is shown in pieces of it, so a
# 50 MB line without a newline never has to sit whole in memory.
FOLLOW_CHUNK_BYTES = 1 << 20
# One read follows at most this many rotations, so a flood cannot keep it from returning.
MAX_SWITCHES_PER_READ = 8


def rotate_bytes(env: Mapping[str, str]) -> int:
    """The rotation size: BACKPROP_LOG_ROTATE_BYTES when it is a whole number of bytes from
    MIN_LOG_BYTES up, else MAX_LOG_BYTES (a bad value is logged, never fatal to a run)."""
    raw = env.get(ROTATE_ENV, "").strip()
    if not raw:
        return MAX_LOG_BYTES
    if raw.isascii() and raw.isdigit() and len(raw) <= 18 and int(raw) >= MIN_LOG_BYTES:
        return int(raw)
    log.warning(
        "%s=%r is not a whole number of bytes >= %d; using %d", ROTATE_ENV, raw, MIN_LOG_BYTES, MAX_LOG_BYTES
    )
    return MAX_LOG_BYTES


def rotated_path(path: Path) -> Path:
    return path.with_name(path.name + ".1")


class RunLog:
    """Appends output to one attempt's log; write errors drop output, never raise."""

    def __init__(self, path: Path, *, max_bytes: int | None = None) -> None:
        self.path = path
        self.max_bytes = rotate_bytes(os.environ) if max_bytes is None else max_bytes
        self.file = self._open()
        self.size = 0

    def _open(self) -> BinaryIO:
        handle = open(self.path, "ab", buffering=0)  # noqa: SIM115 - held for the attempt's life
        os.chmod(self.path, 0o600)
        return handle

    def write(self, data: bytes) -> None:
        # A chunk is cut where the file is full, so each file stays within the limit whatever the
        # size of the chunks the pipe hands over (a read can be larger than a small limit); the
        # follower and `logs --tail` join a line that a rotation cut in two.
        rest = memoryview(data)
        try:
            while rest:
                if self.size >= self.max_bytes:
                    self._rotate()
                written = self.file.write(rest[: self.max_bytes - self.size])
                if not written:
                    break
                self.size += written
                rest = rest[written:]
        except OSError as exc:
            log.warning("cannot write the log %s (%s); output is dropped", self.path, exc)

    def _rotate(self) -> None:
        os.replace(self.path, rotated_path(self.path))
        # If the new file cannot be opened (full disk), output goes on to the rotated one.
        reopened = self._open()
        self.file.close()
        self.file = reopened
        self.size = 0

    def close(self) -> None:
        self.file.close()


class LogFollower:
    """Every line of a growing log once, in order, across rotations.

    It holds the file open, so a rotation (a rename) never takes unread lines away: the old file
    is read to its end before the new one is opened. A rotation is seen as the path naming another
    file (another inode); a file that shrank under the read position was truncated and is read
    again from its start. A line cut in two by a rotation is joined again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: BinaryIO | None = None
        self._inode: int | None = None
        self._pending = b""

    def lines(self, *, final: bool = False) -> list[bytes]:
        """The complete lines written since the last call; with `final`, also an unended last line."""
        out: list[bytes] = []
        switches = 0
        while (handle := self._handle or self._open_current()) is not None:
            self._drain(handle, out)
            try:
                now = os.stat(self.path)
            except OSError:
                break  # rotated this instant, or the run folder is gone: what was held is read
            if now.st_ino == self._inode:
                if now.st_size < handle.tell():
                    handle.seek(0)  # truncated in place
                    continue
                break
            # Rotated. The held file is read to its end (the writer switched before writing on).
            # Two rotations since the last look leave the file between them at `.1`: read it too.
            self._read_between(now.st_ino, out)
            self.close()
            switches += 1
            if switches >= MAX_SWITCHES_PER_READ:
                break  # a flood rotating as fast as it is read: show what was read, go on next call
        if final and self._pending:
            out.append(self._pending)
            self._pending = b""
        return out

    def _open_current(self) -> BinaryIO | None:
        try:
            self._handle = open(self.path, "rb")  # noqa: SIM115 - held across calls, closed by close()
        except OSError:
            return None
        self._inode = os.fstat(self._handle.fileno()).st_ino
        return self._handle

    def _read_between(self, current_inode: int, out: list[bytes]) -> None:
        try:
            with open(rotated_path(self.path), "rb") as between:
                if os.fstat(between.fileno()).st_ino not in (self._inode, current_inode):
                    self._drain(between, out)
        except OSError:
            return

    def _drain(self, handle: BinaryIO, out: list[bytes]) -> None:
        while chunk := handle.read(FOLLOW_CHUNK_BYTES):
            *complete, self._pending = (self._pending + chunk).split(b"\n")
            out.extend(complete)
            if len(self._pending) >= FOLLOW_CHUNK_BYTES:
                out.append(self._pending)
                self._pending = b""

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle, self._inode = None, None


def empty_note(record: RunRecord, attempt: int, path: Path) -> str:
    """Why an attempt's log has no lines, in words."""
    summary = record["attempts"][attempt - 1] if attempt <= len(record["attempts"]) else None
    current = attempt == record["attempt"]
    started = summary["started_at"] if summary is not None else record["started_at"]
    if current and record["status"] == "queued":
        return "the run is queued: its script has not started yet"
    if started is None and not (current and record["status"] in ACTIVE_STATES):
        status = summary["status"] if summary is not None else record["status"]
        return f"the script never started (the attempt ended {status})"
    if current and record["status"] in ACTIVE_STATES:
        return "the script printed nothing yet"
    return "the script printed nothing"
