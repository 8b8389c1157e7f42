"""Storage faults (issue 5, item 4): a full disk under a live run, truncated or corrupt records and
indexes, wrong permissions and a read-only store. The previous state survives, the error is clear
and names the cause, and the other runs stay readable."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backprop_mcp.core import files as files_module
from backprop_mcp.core.errors import RunNotFound
from backprop_mcp.runs.service import Service
from tests.fault_helpers import alive, assert_nothing_survives, start, strict_json, supervisor_pid
from tests.helpers import FIXTURES, cli, cli_json, isolated_env, unique_id, wait_for_end, wait_until


@contextlib.contextmanager
def mounted(target: Path, *options: str) -> Iterator[None]:
    """A tmpfs (or bind) mount for the block; skips the test where mounting is not allowed."""
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a file system needs root and mount(8)")
    done = subprocess.run(["mount", *options, str(target)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"mount is not allowed here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def fill(folder: Path) -> Path:
    """Fill the file system of `folder` to the last byte; returns the filler file."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as handle:  # unbuffered: close must not flush into ENOSPC
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


def test_a_full_disk_during_a_run_keeps_its_supervisor_and_its_last_good_record(tmp_path: Path) -> None:
    home = tmp_path / "small"
    with mounted(home, "-t", "tmpfs", "-o", "size=4m", "tmpfs"):
        env = isolated_env(home / "store")
        service = Service(home / "store", env=env, cwd=tmp_path)
        step_file, finish = tmp_path / "step", tmp_path / "finish"
        run_id = start(service, "trains_until_told_to_finish.py", str(step_file), str(finish))
        wait_until(lambda: (service.store.read(run_id)["step"] or 0) >= 3, what="a first recorded step")
        supervisor = supervisor_pid(service, run_id)
        filler = fill(home)
        reached = int(step_file.read_text(encoding="utf-8"))
        # The script goes on and its supervisor keeps draining it while nothing can be written.
        wait_until(
            lambda: int(step_file.read_text(encoding="utf-8")) >= reached + 50,
            what="fifty more steps on a full disk",
        )
        assert alive(supervisor)
        last_good = strict_json(service.store.record_path(run_id).read_bytes())
        assert isinstance(last_good, dict) and last_good["status"] == "running"
        assert cli_json(env, "status", run_id)["status"] == "running"  # readable, and not "lost"
        filler.unlink()
        finish.write_text("now", encoding="utf-8")
        record = wait_for_end(service, run_id)
        assert (record["status"], record["termination_reason"]) == ("completed", "exit_zero")
        assert record["step"] == int(step_file.read_text(encoding="utf-8"))
        assert record["metrics"]["final_step"] == record["step"]
        assert_nothing_survives(run_id)


def test_starting_a_run_on_a_full_disk_fails_clearly_and_stores_nothing_half_made(tmp_path: Path) -> None:
    before = unique_id("before")
    during = unique_id("during")
    home = tmp_path / "small"
    with mounted(home, "-t", "tmpfs", "-o", "size=1m", "tmpfs"):
        env = isolated_env(home / "store")
        first = cli_json(env, "run", str(FIXTURES / "counts_and_exits.py"), "--run-id", before, cwd=tmp_path)
        assert first["status"] == "completed"
        filler = fill(home)
        done = cli(env, "run", str(FIXTURES / "counts_and_exits.py"), "--run-id", during, cwd=tmp_path)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert "the disk is full" in done.stderr
        listed = cli_json(env, "list")["runs"]
        assert [r["run_id"] for r in listed] == [before]  # the old run is still readable
        filler.unlink()
        after = cli_json(env, "run", str(FIXTURES / "counts_and_exits.py"), "--run-id", during, cwd=tmp_path)
        assert after["status"] == "completed"  # the id was not left half-taken


def _two_runs(tmp_path: Path) -> tuple[dict[str, str], Service, str, str]:
    """A store with two completed runs: its environment, a service on it, and the runs' ids."""
    env = isolated_env(tmp_path / "home")
    good, bad = unique_id("good"), unique_id("bad")
    for run_id in (good, bad):
        cli_json(env, "run", str(FIXTURES / "counts_and_exits.py"), "--run-id", run_id, cwd=tmp_path)
    return env, Service(tmp_path / "home", env=env, cwd=tmp_path), good, bad


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: raw[: len(raw) // 2], id="truncated-in-half"),
        pytest.param(lambda raw: b"", id="empty"),
        pytest.param(lambda raw: b"\0" * len(raw), id="zeroed-by-a-crash"),
        pytest.param(lambda raw: b"[1, 2, 3]", id="not-an-object"),
        pytest.param(lambda raw: raw.replace(b'"bad-', b'"other-'), id="another-runs-id"),
        pytest.param(lambda raw: b"\xff\xfe" + raw, id="binary-garbage"),
        pytest.param(lambda raw: b"[" * 100000, id="deeply-nested"),
    ],
)
def test_a_damaged_record_is_moved_aside_with_a_clear_error_and_other_runs_stay_readable(
    tmp_path: Path, damage: object
) -> None:
    env, service, good, bad = _two_runs(tmp_path)
    path = service.store.record_path(bad)
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    done = cli(env, "status", bad)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "was corrupt; it was moved to" in done.stderr
    assert list(path.parent.glob("run.json.corrupt-*"))  # kept for inspection
    assert cli_json(env, "status", good)["status"] == "completed"
    listed = cli(env, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["run_id"] for r in json.loads(listed.stdout)["runs"]] == [good], listed.stdout
    with pytest.raises(RunNotFound):  # reported once, then out of the way
        service.store.read(bad)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: raw[:-7], id="last-line-truncated"),
        pytest.param(lambda raw: raw + b"\0" * 4096, id="zeros-appended"),
        pytest.param(lambda raw: b"garbage\n" + raw + b'{not json\n[]\n"s"\n', id="garbage-lines"),
        pytest.param(lambda raw: raw.replace(b"\n", b"\n\xff\xfe\n", 2), id="binary-lines"),
        pytest.param(lambda raw: b"", id="emptied"),
    ],
)
def test_a_damaged_index_never_stops_listing_the_runs(tmp_path: Path, damage: object) -> None:
    env, service, good, bad = _two_runs(tmp_path)
    index = service.store.index_path
    index.write_bytes(damage(index.read_bytes()))  # type: ignore[operator]
    done = cli(env, "list", "--json")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    shown = sorted(r["run_id"] for r in json.loads(done.stdout)["runs"])
    assert shown == sorted([bad, good]), done.stdout
    for run_id in (good, bad):  # each record is still readable by id
        assert cli_json(env, "status", run_id)["status"] == "completed"


def test_a_deleted_index_is_rebuilt_with_every_run(tmp_path: Path) -> None:
    env, service, good, bad = _two_runs(tmp_path)
    service.store.index_path.unlink()
    assert {r["run_id"] for r in cli_json(env, "list")["runs"]} == {good, bad}


def test_a_store_owned_by_another_user_gives_a_permission_error_not_a_traceback(tmp_path: Path) -> None:
    env, _, good, _ = _two_runs(tmp_path)
    os.chmod(tmp_path, 0o755)  # noqa: S103 - the unprivileged user may reach the store, not enter it
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    nobody = 65534
    as_nobody = {**env, "HOME": str(tmp_path)}

    def demote() -> None:
        os.setgid(nobody)
        os.setuid(nobody)

    for args in (["list"], ["status", good], ["run", str(FIXTURES / "counts_and_exits.py")]):
        try:
            done = subprocess.run(
                [sys.executable, "-m", "backprop_mcp", *args],
                env=as_nobody,
                cwd="/",
                capture_output=True,
                text=True,
                preexec_fn=demote,
                check=False,
                timeout=60,
            )
        except PermissionError:
            pytest.skip("the Python interpreter is not executable by an unprivileged user here")
        if "No module named" in done.stderr:
            pytest.skip("the virtual environment is not readable by an unprivileged user here")
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr  # store unreadable
        assert "permission denied" in done.stderr.lower(), done.stderr


def test_a_read_only_store_refuses_new_runs_clearly_and_still_lists_the_old_ones(tmp_path: Path) -> None:
    env, _, good, bad = _two_runs(tmp_path)
    home = Path(env["BACKPROP_HOME"])
    with mounted(home, "--bind", str(home)):
        remount = subprocess.run(
            ["mount", "-o", "remount,ro,bind", str(home)], capture_output=True, check=False
        )
        if remount.returncode != 0:
            pytest.skip("cannot remount read-only here")
        done = cli(env, "run", str(FIXTURES / "counts_and_exits.py"), cwd=tmp_path)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert "read-only" in done.stderr
        assert {r["run_id"] for r in cli_json(env, "list")["runs"]} == {good, bad}
        assert cli_json(env, "status", good)["status"] == "completed"
        logs = cli(env, "logs", good)
        assert logs.returncode == 0 and "args:" in logs.stdout


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=20),
    st.integers(min_value=1, max_value=16),
)
def test_reading_a_file_backwards_yields_its_lines_in_reverse_whatever_the_block_size(
    lines: list[bytes], block: int
) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "f"
        path.write_bytes(b"\n".join(lines))
        original = files_module._REVERSE_BLOCK
        files_module._REVERSE_BLOCK = block
        try:
            got = list(files_module.reverse_lines(path))
        finally:
            files_module._REVERSE_BLOCK = original
    assert got == [line for line in reversed(lines) if line.strip()]
