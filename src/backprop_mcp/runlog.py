"""An attempt's log file: raw stdout and stderr appended as they arrive, rotated past a size cap
so a script flooding its output for a whole time box cannot fill the disk."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

# Per attempt, the log rotates to `attempt-N.log.1` past this size, keeping at most twice it.
MAX_LOG_BYTES = 64 * 1024 * 1024


class RunLog:
    """Appends output to one attempt's log; write errors drop output, never raise."""

    def __init__(self, path: Path, *, max_bytes: int = MAX_LOG_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.file = self._open()
        self.size = 0

    def _open(self) -> BinaryIO:
        handle = open(self.path, "ab", buffering=0)  # noqa: SIM115 - held for the attempt's life
        os.chmod(self.path, 0o600)
        return handle

    def write(self, data: bytes) -> None:
        try:
            if self.size + len(data) > self.max_bytes:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                # If the new file cannot be opened (full disk), output goes on to the rotated one.
                reopened = self._open()
                self.file.close()
                self.file = reopened
                self.size = 0
            self.file.write(data)
            self.size += len(data)
        except OSError as exc:
            log.warning("cannot write the log %s (%s); output is dropped", self.path, exc)

    def close(self) -> None:
        self.file.close()
