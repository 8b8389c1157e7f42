"""What a start asks for (`RunRequest`), and the checks of its parts that need no store: the script,
the interpreter, a new run id."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from backprop_mcp.core.errors import (
    UsageError,
)
from backprop_mcp.core.records import SweepRef


class RunRequest(NamedTuple):
    """A request to start a run: the script, its arguments and the run options.

    `options` maps config field names (see `core.settings.FIELDS`, e.g. "max_run_minutes",
    "gpu_min_free_vram_mb") to raw values: strings from the CLI, typed values from MCP. They are
    validated by the same parsers as config files, and `source` names where they came from in
    error messages ("option" for the CLI, "argument" for MCP tools).
    """

    script: str | None
    args: Sequence[str] = ()
    name: str | None = None
    run_id: str | None = None
    cwd: str | None = None
    python: str | None = None
    resume_from: str | None = None
    options: Mapping[str, object] | None = None
    source: str = "option"
    file_defaults: bool = False
    """Take a missing script, run id and resume_from from the config files' `trainingScriptPath`,
    `runId` and `resumeFrom` (the seed's keys; the CLI's `backprop run`, never MCP arguments)."""
    sweep: SweepRef | None = None
    """Set by a sweep's runner on each trial: the record names its sweep and parameters."""


def check_python(python: str | None, cwd: Path, env: Mapping[str, str]) -> str | None:
    """An interpreter given as an option or argument, checked before anything is stored: a path
    (relative to the script's working directory, as the script's own paths are) must be an
    executable file, a bare name must be found on PATH. Returns what to store."""
    if python is None:
        return None
    if not python.strip() or "\0" in python:
        raise UsageError("the interpreter (--python) is empty or contains a NUL byte")
    if os.sep not in python and not (os.altsep and os.altsep in python):
        if shutil.which(python, path=env.get("PATH", os.defpath)) is None:
            raise UsageError(
                f"interpreter {python!r} was not found on PATH; give its path, "
                "e.g. --python .venv/bin/python or --python /usr/bin/python3"
            )
        return python
    path = cwd / os.path.expanduser(python)
    if not path.is_file():
        raise UsageError(f"interpreter {str(path)!r} does not exist or is not a file")
    if not os.access(path, os.X_OK):
        raise UsageError(f"interpreter {str(path)!r} is not executable")
    return str(path)


def resolve_script(script: str, cwd: Path) -> Path:
    if not script or "\0" in script:
        raise UsageError("the script path is empty or contains a NUL byte")
    path = Path(script).expanduser()
    path = path if path.is_absolute() else cwd / path
    path = Path(os.path.normpath(path))
    if not path.exists():
        raise UsageError(f"script not found: {path}")
    if not path.is_file():
        raise UsageError(f"the script must be a file, but {path} is not")
    return path


def new_run_id(name: str | None) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name or "").strip("-")[:40].lower() or "run"
    import secrets

    return f"{slug}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"
