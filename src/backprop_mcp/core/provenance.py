"""The shapes of a run's provenance: which code and environment each attempt ran (`Provenance`,
stored as `runs/<id>/code/<N>/provenance.json` beside the copies), and the short reference to it
that each attempt of a record carries (`CodeRef`). Written by `runs.provenance`."""

from __future__ import annotations

from typing import Any, NotRequired

from typing_extensions import TypedDict

_DOC_CONFIG: Any = {"use_attribute_docstrings": True}


class CodeRef(TypedDict):
    """The code an attempt ran, in short (the full account is its provenance file)."""

    sha: str
    """SHA-256 of the script, hex."""
    commit: str | None
    """The git commit of the working directory (HEAD), when it lies in a git repository."""
    dirty: bool | None
    """Whether tracked files differed from that commit (untracked files do not count)."""


class CodeFile(TypedDict):
    """One file of an attempt's snapshot: the script or a file named by a `snapshot` glob."""

    path: str
    """Its path relative to the run's working directory (absolute when it lies outside it)."""
    sha256: str | None
    """SHA-256 of its content, hex; None when not hashed (see `note`)."""
    bytes: int
    """Its size."""
    copied: bool
    """Whether a copy was kept (under the attempt's `files/`)."""
    note: NotRequired[str]
    """Why it was not copied or hashed (e.g. past the snapshot's size limit)."""


class GitInfo(TypedDict):
    """The git state of the working directory when the attempt started."""

    commit: str | None
    """HEAD's commit; None in a repository without commits, or when git could not tell."""
    branch: str | None
    """The branch checked out; None when detached or unknown."""
    dirty: bool | None
    """Whether tracked files differ from HEAD (staged or not)."""
    untracked: int | None
    """How many untracked files (not ignored) there were."""
    untracked_names: list[str]
    """The first of them (at most 20), relative to the repository."""
    diff_bytes: int
    """Bytes of `git diff HEAD` kept in the attempt's `git.diff`."""
    diff_cut: bool
    """True when the diff was longer than the limit and was cut."""
    error: NotRequired[str]
    """Why (part of) the git state is missing: git not found, timed out, failed."""


class EnvInfo(TypedDict):
    """The environment the attempt ran in (never environment variable values)."""

    python: str
    """The interpreter."""
    python_version: str | None
    """Its version, e.g. 3.11.9; None when it could not be asked."""
    packages: dict[str, str]
    """Installed versions of the frameworks the script imports, and of numpy."""
    backprop: str
    """The version of backprop-mcp that supervised it."""
    gpu: NotRequired[str]
    """The GPU's name, when the attempt was given one."""
    gpu_driver: NotRequired[str]
    """The GPU driver's version, when it could be read."""
    error: NotRequired[str]
    """Why the interpreter could not be asked (its versions are then missing)."""


class Provenance(TypedDict):
    """Which code and environment one attempt ran."""

    attempt: int
    """The attempt."""
    captured_at: str
    """When it was captured (just before the script started), ISO 8601 UTC."""
    cwd: str
    """The working directory."""
    args: list[str]
    """The script's arguments."""
    options: dict[str, Any]
    """The run options in effect (the record keeps only the current attempt's)."""
    script: CodeFile
    """The script."""
    files: list[CodeFile]
    """Files named by the `snapshot` globs, in the order found."""
    limit_bytes: int
    """Most bytes copied for the attempt (the `snapshot_max_mb` setting)."""
    copied_bytes: int
    """Bytes copied."""
    notes: list[str]
    """What was left out and why (a glob that matched nothing, a file outside the cwd, ...)."""
    git: GitInfo | None
    """The git state; None when the working directory is not in a git repository."""
    env: EnvInfo
    """The environment."""


class RerunRef(TypedDict):
    """On a run made by `backprop rerun`: the attempt whose snapshot it runs."""

    run_id: str
    """The run rerun."""
    attempt: int
    """Its attempt whose snapshot (script copy, arguments, options) this run took."""
    script: str
    """The original script's path; when the run's `script` is the stored copy instead (the file
    changed since), this path's folder is put first on the script's PYTHONPATH."""


_DOCUMENTED: tuple[Any, ...] = (CodeRef, CodeFile, GitInfo, EnvInfo, Provenance, RerunRef)
for _shape in _DOCUMENTED:
    _shape.__pydantic_config__ = _DOC_CONFIG
