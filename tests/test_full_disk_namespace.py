"""A full disk under a live run without root (issue 15, item 4): the store lives on a size-limited
tmpfs mounted inside an unprivileged user and mount namespace (`unshare --user --map-root-user
--mount`), so the test needs no privilege outside it and runs the same as root. The CLI and the
supervisor it starts run inside the namespace; the test reads the store through the namespace's
root (`/proc/PID/root`). The run keeps going while nothing can be written, what was stored before
is kept byte for byte, a new run is refused with a clear error, and the run completes truthfully
once there is room again."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fault_helpers import alive, assert_nothing_survives, strict_json
from tests.helpers import FIXTURES, isolated_env, unique_id, wait_until
from tests.test_storage_faults import fill

HOLDER = Path(__file__).parent / "userns_tmpfs.py"


class Namespace:
    """A user and mount namespace with a small tmpfs, and a way to run commands inside it."""

    def __init__(self, holder: subprocess.Popen[str]) -> None:
        self.holder = holder

    def run(self, env: dict[str, str], cwd: Path, *argv: str) -> dict[str, Any]:
        """Run a command inside the namespace: {"rc", "stdout", "stderr"}."""
        assert self.holder.stdin is not None and self.holder.stdout is not None
        self.holder.stdin.write(json.dumps({"argv": list(argv), "env": env, "cwd": str(cwd)}) + "\n")
        self.holder.stdin.flush()
        answer: dict[str, Any] = json.loads(self.holder.stdout.readline())
        return answer

    def cli(self, env: dict[str, str], cwd: Path, *args: str) -> dict[str, Any]:
        return self.run(env, cwd, sys.executable, "-m", "backprop_mcp", *args)

    def path(self, inside: Path) -> Path:
        """Where a path as the namespace sees it can be read from outside."""
        return Path(f"/proc/{self.holder.pid}/root") / inside.relative_to("/")


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[Namespace]:
    """`folder` as a tmpfs of `size` inside a new user and mount namespace; skips the test only
    where the kernel (or a sandbox) forbids such namespaces, saying so."""
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("mount") is None:
        pytest.skip("unshare(1) and mount(8) are needed to make a namespace with a small tmpfs")
    folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [
            unshare,
            "--user",
            "--map-root-user",
            "--mount",
            "--",
            sys.executable,
            str(HOLDER),
            str(folder),
            size,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )
    assert holder.stdout is not None and holder.stdin is not None and holder.stderr is not None
    first = holder.stdout.readline()
    if not first or "error" in json.loads(first):
        holder.stdin.close()
        holder.wait(timeout=30)
        why = json.loads(first)["error"] if first else holder.stderr.read().strip()
        holder.stderr.close()
        holder.stdout.close()
        pytest.skip(
            f"this kernel does not allow an unprivileged user and mount namespace with a tmpfs: {why}"
        )
    try:
        yield Namespace(holder)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
        holder.stderr.close()


def test_a_full_disk_under_a_live_run_without_root_keeps_the_run_and_what_was_stored(tmp_path: Path) -> None:
    small = tmp_path / "small"
    with small_tmpfs(small, "4m") as ns:
        home = small / "store"
        env = isolated_env(home)
        step_file, finish = tmp_path / "step", tmp_path / "finish"
        run_id = unique_id("full")
        script = str(FIXTURES / "trains_until_told_to_finish.py")
        started = ns.cli(
            env, tmp_path, "run", script, "--run-id", run_id, "--detach", "--", str(step_file), str(finish)
        )
        assert started["rc"] == 0, started["stderr"]
        run_dir = ns.path(home / "runs" / run_id)
        assert not (tmp_path / "small" / "store").exists()  # the store is inside the namespace only

        def record() -> dict[str, Any]:
            loaded = strict_json((run_dir / "run.json").read_bytes())
            assert isinstance(loaded, dict)
            return loaded

        wait_until(lambda: (record()["step"] or 0) >= 3, what="a first recorded step")
        supervisor = record()["supervisor_pid"]
        events_before = (run_dir / "events.jsonl").read_bytes()
        log_before = (run_dir / "logs" / "attempt-1.log").read_bytes()

        filler = fill(ns.path(small))
        reached = int(step_file.read_text(encoding="utf-8"))
        # The script goes on and its supervisor keeps draining it while nothing can be written.
        wait_until(
            lambda: int(step_file.read_text(encoding="utf-8")) >= reached + 50,
            what="fifty more steps on a full disk",
        )
        assert alive(supervisor)
        assert record()["status"] == "running"  # the last good record, whole
        status = ns.cli(env, tmp_path, "status", run_id, "--json")
        assert status["rc"] == 0 and json.loads(status["stdout"])["status"] == "running", status["stderr"]
        refused = ns.cli(
            env, tmp_path, "run", script, "--run-id", f"{run_id}-2", "--", str(step_file), str(finish)
        )
        assert (refused["rc"], "Traceback" in refused["stderr"]) == (1, False)
        assert "the disk is full" in refused["stderr"]

        filler.unlink()
        finish.write_text("now", encoding="utf-8")
        final = wait_until(
            lambda: record() if record()["status"] not in ("running", "queued", "paused") else None,
            what="the run to end",
        )
        assert (final["status"], final["termination_reason"]) == ("completed", "exit_zero")
        assert final["step"] == int(step_file.read_text(encoding="utf-8"))
        assert final["metrics"]["final_step"] == final["step"]
        # Nothing stored before the disk filled was lost: the append-only files still begin with it.
        assert (run_dir / "events.jsonl").read_bytes().startswith(events_before)
        assert (run_dir / "logs" / "attempt-1.log").read_bytes().startswith(log_before)
        for line in (run_dir / "events.jsonl").read_bytes().splitlines():
            strict_json(line)
        listed = ns.cli(env, tmp_path, "list", "--json")
        assert [r["run_id"] for r in json.loads(listed["stdout"])["runs"]] == [run_id]
        wait_until(lambda: not alive(supervisor), what="the supervisor to exit")
        assert_nothing_survives(run_id)
