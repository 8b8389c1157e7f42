"""The JSON store: atomic writes, the index, permissions, corruption and storage faults."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from backprop_mcp.core import files as files_module
from backprop_mcp.core import store as store_module
from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.errors import RunNotFound, StoreCorrupt, StoreError
from backprop_mcp.core.records import RunRecord, new_record, row_of
from backprop_mcp.core.store import Store
from backprop_mcp.runs.service import Service
from tests.helpers import FIXTURES, cli_json, unique_id, wait_for_end, wait_until


def make_record(run_id: str, *, status: str = "completed", name: str | None = None) -> RunRecord:
    now = now_iso()
    return new_record(
        run_id=run_id,
        script="/x/train.py",
        created_at=now,
        name=name,
        status=status,
        python="python3",
        python_source="current",
        cwd="/x",
        started_at=now,
        ended_at=now,
        step=5,
        total=10,
        loss=0.5,
        exit_code=0,
        termination_reason="exit_zero",
    )


def add(store: Store, run_id: str, *, status: str = "completed", name: str | None = None) -> RunRecord:
    record = make_record(run_id, status=status, name=name)
    store.create(record)
    store.index_append(row_of(record), new=True)
    return record


def test_files_are_0600_and_folders_0700(tmp_path: Path) -> None:
    store = Store(tmp_path / "home")
    add(store, "a")
    store.append_event("a", {"type": "x"})
    for path in [store.home, store.runs, store.run_dir("a"), store.governor_dir]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for path in [store.record_path("a"), store.events_path("a"), store.index_path]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_corrupt_record_is_moved_aside_and_other_runs_stay_readable(tmp_path: Path) -> None:
    store = Store(tmp_path / "home")
    add(store, "good")
    add(store, "bad")
    store.record_path("bad").write_text('{"run_id": "bad", "sta', encoding="utf-8")
    with pytest.raises(StoreCorrupt, match="moved to"):
        store.read("bad")
    assert list(store.run_dir("bad").glob("run.json.corrupt-*"))
    assert store.read("good")["run_id"] == "good"


def test_listing_survives_a_corrupt_record_and_a_corrupt_index_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    service = Service(home, env={"BACKPROP_HOME": str(home)}, cwd=tmp_path)
    for n in range(3):
        add(service.store, f"r{n}")
    with service.store.index_path.open("ab") as handle:
        handle.write(b"\x00garbage{{\n")
    assert [r["run_id"] for r in service.list_runs()["runs"]] == ["r2", "r1", "r0"]


def test_a_missing_index_is_rebuilt_from_the_run_folders(tmp_path: Path) -> None:
    store = Store(tmp_path / "home")
    for n in range(3):
        add(store, f"r{n}")
    store.index_path.unlink()
    rows = [row["run_id"] for row in store.index_rows()]
    assert sorted(rows) == ["r0", "r1", "r2"]
    assert store.index_path.exists()


def test_the_index_is_compacted_when_it_grows_far_past_one_line_per_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "COMPACT_SLACK", 0)
    store = Store(tmp_path / "home")
    record = add(store, "busy")
    for step in range(200):
        record["step"] = step
        store.write(record)
    store.maybe_compact()
    lines = store.index_path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["step"] == 199


def test_listing_reads_only_as_far_back_as_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    service = Service(home, env={"BACKPROP_HOME": str(home)}, cwd=tmp_path)
    for n in range(300):
        add(service.store, f"r{n:03d}", name=f"n{n}")
    read_lines = 0
    original = files_module.reverse_lines

    def counting(path: Path):  # type: ignore[no-untyped-def]
        nonlocal read_lines
        for line in original(path):
            read_lines += 1
            yield line

    monkeypatch.setattr(files_module, "reverse_lines", counting)
    page = service.list_runs(limit=5)
    assert [r["run_id"] for r in page["runs"]] == ["r299", "r298", "r297", "r296", "r295"]
    assert read_lines <= 6
    second = service.list_runs(limit=5, cursor=page["next_cursor"])
    assert second["runs"][0]["run_id"] == "r294"


def test_a_full_disk_during_a_write_keeps_the_previous_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "home")
    record = add(store, "r")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    record["step"] = 999
    with pytest.raises(StoreError, match="the disk is full; nothing already stored was changed"):
        store.write(record, index=False)
    monkeypatch.undo()
    assert store.read("r")["step"] == 5
    assert not [p for p in store.run_dir("r").iterdir() if p.name.endswith(".tmp")]


def test_a_really_full_file_system_keeps_the_previous_record(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True, check=False
        ).returncode
        != 0
    ):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        store = Store(mount / "home")
        record = add(store, "r")
        record["metrics"] = {f"m{n}-{uuid.uuid4().hex}": float(n) for n in range(4000)}
        with pytest.raises(StoreError, match="disk is full"):
            store.write(record, index=False)
        assert store.read("r")["step"] == 5
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_read_only_store_gives_a_clear_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "home")
    record = add(store, "r")
    os.chmod(store.run_dir("r"), 0o500)
    try:
        if os.access(store.run_dir("r"), os.W_OK):
            pytest.skip("running as a user that ignores permissions (root)")
        with pytest.raises(StoreError, match="permission denied"):
            store.write(record)
    finally:
        os.chmod(store.run_dir("r"), 0o700)


def test_an_unknown_run_suggests_listing(tmp_path: Path) -> None:
    with pytest.raises(RunNotFound) as info:
        Store(tmp_path / "home").read("ghost")
    assert "backprop list" in str(info.value)


def test_a_record_of_a_newer_schema_is_refused_clearly(tmp_path: Path) -> None:
    store = Store(tmp_path / "home")
    record = add(store, "r")
    record["schema_version"] = 99
    store.record_path("r").write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(StoreError, match="schema 99"):
        store.read("r")


def test_a_new_record_refuses_fields_a_record_does_not_have() -> None:
    with pytest.raises(TypeError, match="not fields of a RunRecord: colour"):
        new_record(run_id="r", script="/x.py", created_at=now_iso(), colour="red")


# Holds one run's lock, as a command doing read-modify-write of its record does, until stdin closes.
_RUN_LOCK_HOLDER = """
import sys
from pathlib import Path
from backprop_mcp.core.store import Store
with Store(Path(sys.argv[1])).run_lock(sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


def _waits_for_a_lock(pid: int) -> bool:
    """Whether `pid` is blocked on a file lock another process holds: a `->` line of /proc/locks
    (`N: -> FLOCK ADVISORY WRITE <pid> ...`)."""
    for line in Path("/proc/locks").read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if "->" in fields and fields[fields.index("->") + 4 :][:1] == [str(pid)]:
            return True
    return False


def test_a_resume_waits_while_another_process_holds_the_runs_lock(
    env: dict[str, str], service: Service, tmp_path: Path
) -> None:
    run_id = unique_id("locked")
    done = cli_json(env, "run", str(FIXTURES / "counts_and_exits.py"), "--run-id", run_id, cwd=tmp_path)
    assert done["status"] == "completed"
    holder = subprocess.Popen(
        [sys.executable, "-c", _RUN_LOCK_HOLDER, env["BACKPROP_HOME"], run_id],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    assert holder.stdout.readline().strip() == "held"
    resume = subprocess.Popen(
        [sys.executable, "-m", "backprop_mcp", "resume", run_id, "--detach", "--json", "--", "6"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: resume.poll() is not None or _waits_for_a_lock(resume.pid), what="resume to wait or end"
        )
        assert resume.poll() is None, "resume changed the run while another process held its lock"
        assert service.store.read(run_id)["attempt"] == 1
    finally:
        holder.stdin.close()
        holder.wait()
        holder.stdout.close()
    out, err = resume.communicate(timeout=60)
    assert resume.returncode == 0, err
    assert json.loads(out)["attempt"] == 2
    assert wait_for_end(service, run_id)["attempt"] == 2
