"""Which code and environment an attempt ran: captured just before its script starts (by its
supervisor; for a cluster run by the submitting side) into `runs/<id>/code/<N>/`: `provenance.json`
(`core.provenance.Provenance`), `files/` (the script and the `snapshot` globs' files, copied up to
the attempt's limit; larger files are hashed only), `git.diff` (the diff against HEAD, cut). Also
the readers of those files. Stdlib only: the supervisor imports it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

from backprop_mcp import __version__
from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.files import atomic_write
from backprop_mcp.core.provenance import CodeFile, CodeRef, EnvInfo, GitInfo, Provenance
from backprop_mcp.core.records import RunRecord
from backprop_mcp.core.store import Store
from backprop_mcp.core.stored import Invalid, check_shape
from backprop_mcp.runs.detect import imported_modules
from backprop_mcp.runs.gitstate import git_state
from backprop_mcp.runs.snapglob import GlobStopped, Walk

CODE_DIR = "code"
PROVENANCE_FILE = "provenance.json"
FILES_DIR = "files"
DIFF_FILE = "git.diff"
# Where a copied file that lies outside the working directory (a script given by absolute path)
# goes under `files/`, by its name.
OUTSIDE_DIR = "_outside"
MIB = 1024 * 1024
# Bounds of one capture: files a set of globs may add, directory entries they may look at (all
# patterns together: ~20 ms on a local disk), bytes hashed in all (at ~1 GB/s a second at most; a
# larger file is named with its size, not hashed), notes kept.
MAX_SNAPSHOT_FILES = 1000
MAX_GLOB_ENTRIES = 20_000
MAX_HASH_BYTES = 1024 * MIB
MAX_NOTES = 20
_CHUNK = MIB
# Asking the script's interpreter for its versions: a Python start and a few metadata reads,
# ~50 ms; past 5 s it is wedged (a network file system) and the start goes on without them.
ENV_PROBE_SECONDS = 5.0
# The frameworks whose versions are recorded when the script imports them (import name ->
# distribution), and numpy whenever installed.
FRAMEWORKS = {
    "torch": "torch",
    "tensorflow": "tensorflow",
    "jax": "jax",
    "lightning": "lightning",
    "pytorch_lightning": "pytorch-lightning",
    "transformers": "transformers",
    "keras": "keras",
}
ALWAYS = ("numpy",)
NVIDIA_VERSION_FILE = Path("/proc/driver/nvidia/version")
_PROBE = (
    "import json, platform, sys\n"
    "from importlib import metadata\n"
    "found = {}\n"
    "for name in sys.argv[1:]:\n"
    "    try:\n"
    "        found[name] = metadata.version(name)\n"
    "    except Exception:\n"
    "        pass\n"
    "print(json.dumps({'python_version': platform.python_version(), 'packages': found}))\n"
)


def code_dir(store: Store, run_id: str, attempt: int) -> Path:
    """The folder of an attempt's provenance."""
    return store.run_dir(run_id) / CODE_DIR / str(attempt)


class _Budget:
    def __init__(self, limit: int) -> None:
        self.limit, self.copied, self.hashed = limit, 0, 0


def capture(
    store: Store, record: RunRecord, env: Mapping[str, str], *, ask_python: bool = True, with_env: bool = True
) -> CodeRef:
    """Capture the current attempt's provenance into its folder; returns its short reference.
    Without `with_env` its environment is left for `add_environment` (a supervisor reads it once
    the script has started: asking another interpreter costs a process start, which the script's
    start must not wait for). Raises OSError or StoreError when the store cannot be written (the
    caller goes on without)."""
    folder = code_dir(store, record["run_id"], record["attempt"])
    if folder.exists():  # a capture begun before (a retried submission): start afresh
        shutil.rmtree(folder)
    folder.parent.mkdir(mode=0o700, exist_ok=True)
    folder.mkdir(mode=0o700)
    (folder / FILES_DIR).mkdir(mode=0o700)
    options = record["options"]
    limit_mb = options.get("snapshot_max_mb")  # absent from runs stored before it existed
    limit = int(float(1.0 if limit_mb is None else limit_mb) * MIB)
    budget = _Budget(limit)
    cwd = Path(record["cwd"])
    script = Path(record["script"])
    notes: list[str] = []
    seen: set[Path] = set()
    with contextlib.suppress(OSError):
        seen.add(script.resolve())
    script_file = _take(script, _relative(script, cwd), folder, budget)
    files = _globbed(cwd, options.get("snapshot") or [], folder, budget, seen, notes)
    git, diff = git_state(cwd, env)
    if diff:
        _write_new(folder / DIFF_FILE, diff)
    provenance = Provenance(
        attempt=record["attempt"],
        captured_at=now_iso(),
        cwd=str(cwd),
        args=list(record["args"]),
        options=dict(options),
        script=script_file,
        files=files,
        limit_bytes=limit,
        copied_bytes=budget.copied,
        notes=notes[:MAX_NOTES],
        git=git,
        env=environment(record, env, ask_python=ask_python) if with_env else _env_pending(record),
    )
    atomic_write(folder / PROVENANCE_FILE, json.dumps(provenance, indent=1).encode("utf-8"))
    return CodeRef(
        sha=script_file["sha256"] or "",
        commit=git["commit"] if git else None,
        dirty=git["dirty"] if git else None,
    )


def add_environment(
    store: Store, record: RunRecord, env: Mapping[str, str], on_spawn: Callable[[int], None] | None = None
) -> None:
    """Complete the attempt's provenance, captured without its environment, with it; `on_spawn`
    is told the pid of the interpreter asked (not one of the run's processes)."""
    kept = load(store, record["run_id"], record["attempt"])
    if kept is None:
        return
    kept["env"] = environment(record, env, on_spawn=on_spawn)
    folder = code_dir(store, record["run_id"], record["attempt"])
    atomic_write(folder / PROVENANCE_FILE, json.dumps(kept, indent=1).encode("utf-8"))


def _env_pending(record: RunRecord) -> EnvInfo:
    return EnvInfo(
        python=record["python"],
        python_version=None,
        packages={},
        backprop=__version__,
        error="read once the script has started; not read yet (or its supervisor ended first)",
    )


def keep(record: RunRecord, code: CodeRef) -> None:
    """Put an attempt's code reference on its summary (not written), and whether its script
    differs from the previous attempt's."""
    attempts = record["attempts"]
    attempts[-1]["code"] = code
    previous = attempts[-2].get("code") if len(attempts) > 1 else None
    if previous is not None:
        attempts[-1]["code_changed"] = previous["sha"] != code["sha"]


def note_code_change(record: RunRecord) -> None:
    """On a new attempt (resume): whether its script differs from the previous attempt's now (its
    supervisor confirms it when it captures the new snapshot). Not written."""
    previous = record["attempts"][-2].get("code") if len(record["attempts"]) > 1 else None
    current = file_sha256(Path(record["script"])) if previous is not None else None
    if previous is not None and current is not None:
        record["attempts"][-1]["code_changed"] = current != previous["sha"]


def _relative(path: Path, cwd: Path) -> str:
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)


def copy_path(folder: Path, file: CodeFile) -> Path:
    """Where an attempt's copy of `file` lies (whether or not it was copied)."""
    path = Path(file["path"])
    return folder / FILES_DIR / (OUTSIDE_DIR + "/" + path.name if path.is_absolute() else file["path"])


def _globbed(
    cwd: Path, globs: list[str], folder: Path, budget: _Budget, seen: set[Path], notes: list[str]
) -> list[CodeFile]:
    """The files the `snapshot` globs name inside the working directory (symlinks resolved, and
    left out when they lead outside it), each taken once."""
    taken: list[CodeFile] = []
    try:
        real_cwd = cwd.resolve(strict=True)
    except OSError as exc:
        notes.append(f"snapshot globs not read: the working directory cannot be read ({exc.strerror})")
        return taken
    walk = Walk(real_cwd, MAX_GLOB_ENTRIES)
    for pattern in globs:
        found = 0
        try:
            for match in walk.matches(cwd, pattern):
                if len(taken) >= MAX_SNAPSHOT_FILES:
                    notes.append(f"{pattern!r}: stopped at {MAX_SNAPSHOT_FILES} files")
                    break
                try:
                    real = match.resolve(strict=True)
                except (OSError, RuntimeError):
                    continue
                if not real.is_relative_to(real_cwd):
                    notes.append(f"{_relative(match, cwd)}: left out, it leads outside the working directory")
                    continue
                if real in seen or not real.is_file():
                    continue
                seen.add(real)
                found += 1
                taken.append(_take(match, _relative(match, cwd), folder, budget))
        except GlobStopped:
            notes.append(f"{pattern!r}: stopped after looking at {MAX_GLOB_ENTRIES} directory entries")
        except (OSError, ValueError) as exc:
            notes.append(f"{pattern!r} could not be read: {exc}")
            continue
        notes.extend(
            f"{_relative(Path(path), cwd)}: left out, it leads outside the working directory"
            for path in walk.outside
        )
        walk.outside.clear()
        if not found:
            notes.append(f"{pattern!r} matched no file")
    return taken


def _take(path: Path, rel: str, folder: Path, budget: _Budget) -> CodeFile:
    """Hash `path` (streamed), copying it while the attempt's copies stay within the limit."""
    taken = CodeFile(path=rel, sha256=None, bytes=0, copied=False)
    try:
        size = path.stat().st_size
    except OSError as exc:
        taken["note"] = f"not read: {exc.strerror or exc}"
        return taken
    taken["bytes"] = size
    if budget.hashed + size > MAX_HASH_BYTES:
        taken["note"] = f"not hashed: past the {MAX_HASH_BYTES // MIB} MiB one attempt hashes"
        return taken
    copying = budget.copied + size <= budget.limit
    digest = hashlib.sha256()
    dest = copy_path(folder, taken)
    out = None
    written = 0
    try:
        if copying:
            _make_dirs(folder / FILES_DIR, dest.parent)
            out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                budget.hashed += len(chunk)
                if out is not None and budget.copied + written + len(chunk) > budget.limit:
                    os.close(out)  # it grew while read: past the limit after all
                    out = None
                    dest.unlink()
                if out is not None:
                    os.write(out, chunk)
                    written += len(chunk)
    except OSError as exc:
        taken["note"] = f"not read: {exc.strerror or exc}"
        if out is not None:
            os.close(out)
            dest.unlink(missing_ok=True)
        return taken
    if out is not None:
        os.close(out)
        budget.copied += written
        taken["copied"] = True
    else:
        taken["note"] = (
            f"hashed, not copied: past the snapshot limit of {budget.limit / MIB:g} MB (snapshot_max_mb)"
        )
    taken["sha256"] = digest.hexdigest()
    return taken


def _make_dirs(base: Path, folder: Path) -> None:
    """`folder` and the folders between `base` and it, each 0700."""
    for part in reversed([folder, *folder.parents]):
        if part.is_relative_to(base) and part != base:
            part.mkdir(mode=0o700, exist_ok=True)


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def environment(
    record: RunRecord,
    env: Mapping[str, str],
    *,
    ask_python: bool = True,
    on_spawn: Callable[[int], None] | None = None,
) -> EnvInfo:
    """The interpreter's version and the versions of the frameworks the script imports (read from
    the interpreter's package metadata, nothing imported), the GPU, backprop's version."""
    info = EnvInfo(python=record["python"], python_version=None, packages={}, backprop=__version__)
    wanted = [
        FRAMEWORKS[name] for name in sorted(imported_modules(Path(record["script"]))) if name in FRAMEWORKS
    ]
    wanted += [name for name in ALWAYS if name not in wanted]
    if record["python"] == sys.executable:
        info["python_version"] = platform.python_version()
        info["packages"] = _versions(wanted)
    elif ask_python:
        _ask(info, record, wanted, env, on_spawn)
    else:
        info["error"] = "the interpreter runs elsewhere (the cluster's); not asked"
    gpu = record["gpu"]
    if gpu is not None:
        info["gpu"] = gpu["name"]
        driver = _nvidia_driver() if record["options"].get("gpu_probe") != "rocm" else None
        if driver:
            info["gpu_driver"] = driver
    return info


def _versions(names: list[str]) -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in names:
        with contextlib.suppress(Exception):  # a missing or broken distribution: not installed
            found[name] = metadata.version(name)
    return found


def _ask(
    info: EnvInfo,
    record: RunRecord,
    wanted: list[str],
    env: Mapping[str, str],
    on_spawn: Callable[[int], None] | None = None,
) -> None:
    """Ask the script's own interpreter (another virtualenv has other versions)."""
    try:
        with subprocess.Popen(
            [record["python"], "-c", _PROBE, *wanted],
            cwd="/",  # no folder of the user's first on sys.path: nothing may shadow json or platform
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        ) as proc:
            if on_spawn is not None:
                on_spawn(proc.pid)
            try:
                out, _ = proc.communicate(timeout=ENV_PROBE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        answer = json.loads(out.decode("utf-8", "replace").strip().splitlines()[-1])
        info["python_version"] = str(answer["python_version"])
        info["packages"] = {str(k): str(v) for k, v in dict(answer["packages"]).items()}
    except subprocess.TimeoutExpired:
        info["error"] = f"the interpreter did not answer within {ENV_PROBE_SECONDS:g} s"
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        info["error"] = f"the interpreter could not be asked: {exc}"[:200]


def _nvidia_driver() -> str | None:
    try:
        text = NVIDIA_VERSION_FILE.read_text("utf-8", "replace")
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", text)
    return match.group(1) if match else None


# -- reading back -------------------------------------------------------------------------------


def load(store: Store, run_id: str, attempt: int) -> Provenance | None:
    """An attempt's provenance, None when none was captured (or it cannot be read)."""
    path = code_dir(store, run_id, attempt) / PROVENANCE_FILE
    try:
        data = json.loads(path.read_text("utf-8"))
        return cast(Provenance, check_shape(data, Provenance, frozenset({"script"}), "the provenance"))
    except (OSError, ValueError, Invalid):
        return None


def diff_text(store: Store, run_id: str, attempt: int) -> str:
    """The attempt's `git diff HEAD` as kept (empty when none)."""
    try:
        return (code_dir(store, run_id, attempt) / DIFF_FILE).read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""


def file_sha256(path: Path) -> str | None:
    """SHA-256 of a file, streamed; None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def git_summary(git: GitInfo | None) -> str:
    """The git state in a few words: "1a2b3c4 on main, dirty (+2 untracked)"."""
    if git is None:
        return "not a git repository"
    if git.get("error") and git["commit"] is None:
        return f"unknown ({git.get('error')})"
    words = f"{(git['commit'] or 'no commit')[:10]}" + (f" on {git['branch']}" if git["branch"] else "")
    words += ", dirty" if git["dirty"] else ", clean"
    if git["untracked"]:
        words += f" (+{git['untracked']} untracked)"
    if git["diff_cut"]:
        words += f"; diff cut at {git['diff_bytes']} bytes"
    return words
