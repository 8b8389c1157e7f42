"""The git state of a run's working directory (commit, branch, dirty, untracked, the diff against
HEAD), read by bounded git calls that can never hang a start: each call has a timeout and all of
them a total one, git never prompts, takes no optional lock, runs no pager nor fsmonitor, reads no
stdin and touches no network; a missing, failing or hanging git leaves the state with its reason."""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from backprop_mcp.core.provenance import GitInfo

# Each git call gets this long: `git status` in a large repository takes a few hundred ms on a
# cold cache; past 2 s git is stuck (a network file system, a lock) and the run must not wait.
GIT_CALL_SECONDS = 2.0
# All git calls of one capture together: a start is delayed by at most this much.
GIT_TOTAL_SECONDS = 4.0
# The diff against HEAD kept per attempt: enough for the edits an agent makes between runs.
MAX_DIFF_BYTES = 256 * 1024
# Untracked files named in the record (all are counted).
MAX_UNTRACKED_NAMES = 20
# `git status` output read at most: a tree with a million untracked files must not fill memory.
MAX_STATUS_BYTES = 4 * 1024 * 1024
_REAP_SECONDS = 0.2


class GitFailed(Exception):
    """A git call that did not answer (missing, timed out, failed): the reason in words."""


def git_state(
    cwd: Path, env: Mapping[str, str], *, total: float = GIT_TOTAL_SECONDS
) -> tuple[GitInfo | None, bytes]:
    """(the git state of `cwd`, the diff against HEAD cut to MAX_DIFF_BYTES); (None, b"") when
    `cwd` is not in a git repository."""
    git = shutil.which("git", path=env.get("PATH", os.defpath))
    if git is None:
        return _unknown("git was not found on PATH"), b""
    end = time.monotonic() + total
    try:
        code, out = _run([git, "status", "--porcelain=v2", "--branch", "-z"], cwd, env, end, MAX_STATUS_BYTES)
    except GitFailed as exc:
        return _unknown(str(exc)), b""
    if code != 0:
        return None, b""  # not a repository (128), or one git cannot read: no git state to tell
    info = _parse_status(out)
    if info["commit"] is None:
        return info, b""
    try:
        code, diff = _run(
            [git, "diff", "HEAD", "--no-color", "--no-ext-diff", "--no-textconv"],
            cwd,
            env,
            end,
            MAX_DIFF_BYTES + 1,
        )
    except GitFailed as exc:
        info["error"] = f"no diff: {exc}"
        return info, b""
    if code != 0:
        info["error"] = f"no diff: git diff exited {code}"
        return info, b""
    info["diff_cut"] = len(diff) > MAX_DIFF_BYTES
    diff = diff[:MAX_DIFF_BYTES]
    info["diff_bytes"] = len(diff)
    return info, diff


def _unknown(why: str) -> GitInfo:
    return GitInfo(
        commit=None,
        branch=None,
        dirty=None,
        untracked=None,
        untracked_names=[],
        diff_bytes=0,
        diff_cut=False,
        error=why,
    )


def _parse_status(out: bytes) -> GitInfo:
    """`git status --porcelain=v2 --branch -z`: headers, then one entry per changed path."""
    info = _unknown("")
    del info["error"]
    info["dirty"], info["untracked"] = False, 0
    entries = out.split(b"\0")
    skip = False
    for entry in entries:
        if skip:  # a rename's second path
            skip = False
            continue
        text = entry.decode("utf-8", "replace")
        if text.startswith("# branch.oid "):
            oid = text[len("# branch.oid ") :]
            info["commit"] = None if oid == "(initial)" else oid
        elif text.startswith("# branch.head "):
            head = text[len("# branch.head ") :]
            info["branch"] = None if head == "(detached)" else head
        elif text.startswith("? "):
            info["untracked"] = (info["untracked"] or 0) + 1
            if len(info["untracked_names"]) < MAX_UNTRACKED_NAMES:
                info["untracked_names"].append(text[2:])
        elif text[:2] in ("1 ", "2 ", "u "):
            info["dirty"] = True
            skip = text.startswith("2 ")
    return info


def _run(argv: list[str], cwd: Path, env: Mapping[str, str], end: float, limit: int) -> tuple[int, bytes]:
    """Run git until it exits, `limit` bytes of output are read, or `end` passes (then its whole
    process group is killed: a git that runs helpers must not leave them holding the pipe)."""
    timeout = min(GIT_CALL_SECONDS, end - time.monotonic())
    if timeout <= 0:
        raise GitFailed(f"git took longer than {GIT_TOTAL_SECONDS:g} s in all")
    command = argv[1]
    argv = [argv[0], "--no-pager", "-c", "core.fsmonitor=false", "-c", "core.untrackedCache=false", *argv[1:]]
    child_env = {
        **env,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_OPTIONAL_LOCKS": "0",
        "GIT_PAGER": "cat",
        "GIT_ASKPASS": "",
        "SSH_ASKPASS": "",
        "LC_ALL": "C",
    }
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        raise GitFailed(f"git could not be started: {exc.strerror or exc}") from None
    chunks: list[bytes] = []
    read = 0
    stop = time.monotonic() + timeout
    timed_out = False
    if proc.stdout is None:
        raise RuntimeError("git was started without a pipe")  # Popen(stdout=PIPE) always has one
    with proc, selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while read < limit:
            left = stop - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if not selector.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 64 * 1024)
            if not chunk:
                break
            chunks.append(chunk)
            read += len(chunk)
        if timed_out or read >= limit:
            _kill(proc)
        else:
            try:
                proc.wait(max(0.0, stop - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill(proc)
    if timed_out:
        raise GitFailed(f"git {command} timed out after {timeout:.1f} s")
    return (0 if read >= limit else proc.returncode), b"".join(chunks)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill git's process group and reap what of it became ours (the supervisor is a subreaper)."""
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    end = time.monotonic() + _REAP_SECONDS
    while time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-proc.pid, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)
