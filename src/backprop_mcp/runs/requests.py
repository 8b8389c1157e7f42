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
    RunStateError,
    UsageError,
)
from backprop_mcp.core.records import RunRecord, SweepRef

# A missing script's error names at most this many `.py` files of its folder (then "and N more"),
# read from at most this many entries: the error stays one readable line in any folder.
MAX_SHOWN_SCRIPTS = 8
MAX_SCANNED_ENTRIES = 10_000


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
    tags: Sequence[str] = ()
    """Tags for the run's notebook (see `core.notebook`), written with the run."""
    note: str | None = None
    """A first note (why the run is started: its hypothesis), written with the run."""


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


def resolve_script(script: str, cwd: Path, roots: Sequence[Path] | None = None) -> Path:
    """The script's absolute path, which must be a file. When it is not, the error shows what the
    folder it looked in holds (its `.py` files), but only a folder inside `roots` when roots apply
    (the caller has already refused a script outside them; an empty `roots` lists nothing)."""
    if not script or "\0" in script:
        raise UsageError("the script path is empty or contains a NUL byte")
    path = Path(script).expanduser()
    path = path if path.is_absolute() else cwd / path
    path = Path(os.path.normpath(path))
    if not path.exists():
        raise UsageError(f"script not found: {path}{_folder_view(path.parent, roots)}")
    if path.is_dir():
        raise UsageError(f"the script must be a file, but {path} is a folder{_folder_view(path, roots)}")
    if not path.is_file():
        raise UsageError(f"the script must be a file, but {path} is not")
    return path


def _folder_view(folder: Path, roots: Sequence[Path] | None) -> str:
    """ "; .py files in FOLDER: a.py, b.py and 3 more" (or that there are none, or that the folder
    does not exist), for the error of a script that is not there; empty for a folder outside `roots`."""
    from backprop_mcp.runs.confine import confined

    where = folder if roots is None else confined(folder, roots)
    if where is None:
        return ""
    names: list[str] = []
    more = False
    try:
        with os.scandir(where) as entries:
            for seen, entry in enumerate(entries):
                if seen == MAX_SCANNED_ENTRIES:
                    more = True  # a huge folder: say there are more rather than read it all
                    break
                # Links are not followed: one may lead outside the roots, where nothing is looked at.
                plain = entry.is_file(follow_symlinks=False) or entry.is_symlink()
                if plain and entry.name.endswith(".py"):
                    names.append(entry.name)
    except FileNotFoundError:
        return f"; the folder {folder} does not exist"
    except NotADirectoryError:
        return f"; {folder} is not a folder"
    except OSError as exc:
        return f"; the folder {folder} cannot be read ({exc.strerror or exc})"
    if not names:
        return f"; there are no .py files in {folder}" + (" among its first entries" if more else "")
    names.sort()
    listed = ", ".join(names[:MAX_SHOWN_SCRIPTS])
    rest = len(names) - MAX_SHOWN_SCRIPTS
    if more:
        listed += " and more"
    elif rest > 0:
        listed += f" and {rest} more"
    return f"; .py files in {folder}: {listed}"


def new_run_id(name: str | None) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name or "").strip("-")[:40].lower() or "run"
    import secrets

    return f"{slug}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def refuse_a_finished_run(record: RunRecord) -> None:
    """A run that completed all its steps would resume only to end at once: say so, and how to
    train on (new arguments) or start again (from scratch)."""
    step, total = record["step"], record["total"]
    if record["status"] != "completed" or step is None or total is None or step < total:
        return
    run_id = record["run_id"]
    raise RunStateError(
        f"run {run_id} already completed its {total} steps (step {step}); resumed as it is, the "
        "next attempt would end at once",
        hint="to train longer, resume it with script arguments that ask for more steps; they "
        f"replace the stored ones ({' '.join(record['args'])[:200] or 'none'}): "
        f"`backprop resume {run_id} -- ARGS...`, or `args` in the resume_run tool. To start again "
        "from the beginning: --from-scratch (from_scratch=true)",
    )
