"""`list` sorted by a metric or a field, its rows' arguments and metrics, and rows indexed by an
earlier version (without them)."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.errors import UsageError
from backprop_mcp.core.files import storage_error
from backprop_mcp.core.records import (
    MAX_ROW_ARG_CHARS,
    MAX_ROW_ARGS,
    MAX_ROW_METRICS,
    RunRecord,
    new_record,
    row_of,
)
from backprop_mcp.core.store import Store
from backprop_mcp.runs.service import Service
from tests.helpers import cli, isolated_env

SCRIPT = "/nowhere/train.py"
# Creation times one second apart, oldest first, so "newest first" is known in advance.
T0 = 1_700_000_000.0


def add(store: Store, run_id: str, n: int, **fields: Any) -> RunRecord:
    """A finished run, created `n` seconds after T0, stored and indexed as the service does."""
    record = new_record(
        run_id=run_id,
        script=SCRIPT,
        created_at=now_iso(T0 + n),
        status="completed",
        termination_reason="exit_zero",
        **fields,
    )
    store.create(record)
    store.index_append(row_of(record), new=True)
    return record


@pytest.fixture
def runs(service: Service) -> Service:
    store = service.store
    add(store, "a", 1, name="lr-0.1", loss=0.5, step=10, metrics={"val_acc": 0.7}, args=["--lr", "0.1"])
    add(store, "b", 2, name="lr-0.01", loss=0.2, step=30, metrics={"val_acc": 0.9}, args=["--lr", "0.01"])
    add(store, "c", 3, name="other", loss=None, step=None, metrics={})
    add(store, "d", 4, name="lr-0.001", loss=0.2, step=20, metrics={"val_acc": 0.8}, args=["--lr", "0.001"])
    return service


def ids(page: Any) -> list[str]:
    return [r["run_id"] for r in page["runs"]]


def test_without_sort_runs_come_newest_first(runs: Service) -> None:
    assert ids(runs.list_runs()) == ["d", "c", "b", "a"]


@pytest.mark.parametrize(
    ("sort", "expected"),
    [
        ("loss", ["d", "b", "a", "c"]),  # ties (d, b at 0.2) newest first; no loss last
        ("-loss", ["a", "d", "b", "c"]),
        ("val_acc", ["a", "d", "b", "c"]),
        ("-val_acc", ["b", "d", "a", "c"]),  # highest first, the run without it still last
        ("created", ["a", "b", "c", "d"]),
        ("-created", ["d", "c", "b", "a"]),
        ("name", ["d", "b", "a", "c"]),
        ("step", ["a", "d", "b", "c"]),
        ("-step", ["b", "d", "a", "c"]),
        ("never_reported", ["d", "c", "b", "a"]),  # nobody has it: all "without", newest first
    ],
)
def test_sort_orders_by_a_metric_or_a_field_with_runs_without_it_last(
    runs: Service, sort: str, expected: list[str]
) -> None:
    page = runs.list_runs(sort=sort)
    assert ids(page) == expected
    assert page["total_matching"] == 4


def test_a_sorted_list_pages_with_a_cursor_without_repeats_or_gaps(runs: Service) -> None:
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        page = runs.list_runs(sort="-val_acc", limit=1, cursor=cursor)
        seen += ids(page)
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ["b", "d", "a", "c"]


def test_sort_keeps_the_state_and_name_filters(runs: Service) -> None:
    assert ids(runs.list_runs(sort="-val_acc", name="lr-*")) == ["b", "d", "a"]
    assert ids(runs.list_runs(sort="loss", status="failed")) == []


@pytest.mark.parametrize("sort", ["", "-", " loss", "loss ", "   ", "a\nb", "x" * 201, "-" + "x" * 201])
def test_a_malformed_sort_key_is_a_usage_error_saying_what_is_allowed(runs: Service, sort: str) -> None:
    with pytest.raises(UsageError, match="created, name or step") as caught:
        runs.list_runs(sort=sort)
    assert "prefix '-' for descending" in caught.value.message


def test_a_sort_key_that_is_not_a_string_is_refused(runs: Service) -> None:
    with pytest.raises(UsageError, match="sort must be a string"):
        runs.list_runs(sort=3)  # type: ignore[arg-type]


def test_rows_carry_the_scripts_arguments_and_metrics(runs: Service) -> None:
    row = runs.list_runs(sort="-val_acc", limit=1)["runs"][0]
    assert row["args"] == ["--lr", "0.01"]
    assert row["metrics"] == {"val_acc": 0.9}


def test_row_arguments_and_metrics_are_bounded(service: Service) -> None:
    args = [f"--a{i}={'x' * 300}" for i in range(MAX_ROW_ARGS + 10)]
    metrics = {f"m{i}": float(i) for i in range(MAX_ROW_METRICS + 20)} | {"n" * 150: 1.0}
    record = add(service.store, "big", 1, args=args, metrics=metrics)
    row = row_of(record)
    assert len(row["args"]) == MAX_ROW_ARGS + 1 and row["args"][-1] == "..."
    assert all(len(a) <= MAX_ROW_ARG_CHARS for a in row["args"])
    assert row["args"][0].startswith("--a0=xx") and row["args"][0].endswith("...")
    assert len(row["metrics"]) == MAX_ROW_METRICS and "n" * 150 not in row["metrics"]
    assert len(json.dumps(row)) < 7000
    listed = service.list_runs()["runs"][0]
    assert listed["args"] == row["args"] and listed["metrics"] == row["metrics"]


def _strip_new_fields(store: Store) -> None:
    """Rewrite the index as the previous version wrote it: rows without args and metrics."""
    lines = store.index_path.read_text(encoding="utf-8").splitlines()
    old = []
    for line in lines:
        row = json.loads(line)
        row.pop("args", None)
        row.pop("metrics", None)
        old.append(json.dumps(row))
    store.index_path.write_text("".join(line + "\n" for line in old), encoding="utf-8")


def test_rows_indexed_by_the_previous_version_are_filled_from_the_record(runs: Service) -> None:
    _strip_new_fields(runs.store)
    row = runs.list_runs(limit=1)["runs"][0]
    assert row["run_id"] == "d" and row["args"] == ["--lr", "0.001"] and row["metrics"] == {"val_acc": 0.8}
    # Not damage, and a page newest first reads a few records: the index is left as it is.
    assert not runs.store.index_damaged
    assert "args" not in runs.store.index_path.read_text(encoding="utf-8")
    assert ids(runs.list_runs(sort="-val_acc")) == ["b", "d", "a", "c"]
    # A sorted listing read every record to fill them: it wrote the rows whole, once.
    rows = [json.loads(line) for line in runs.store.index_path.read_text(encoding="utf-8").splitlines()]
    assert {r["run_id"]: r["args"] for r in rows}["a"] == ["--lr", "0.1"]
    inode = runs.store.index_path.stat().st_ino
    assert ids(runs.list_runs(sort="-val_acc")) == ["b", "d", "a", "c"]
    assert runs.store.index_path.stat().st_ino == inode


def test_an_old_row_whose_record_cannot_be_read_lists_with_empty_args(
    runs: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    _strip_new_fields(runs.store)
    # The disk refuses d's record as it refuses an unprivileged user (a chmod 0 file does not stop
    # root, who runs the suite in CI).
    read = runs.store.read

    def refusing(run_id: str) -> RunRecord:
        if run_id == "d":
            raise storage_error("read", runs.store.record_path("d"), PermissionError(errno.EACCES, "denied"))
        return read(run_id)

    monkeypatch.setattr(runs.store, "read", refusing)
    rows = {r["run_id"]: r for r in runs.list_runs()["runs"]}
    assert (rows["d"]["args"], rows["d"]["metrics"]) == ([], {})
    assert rows["b"]["args"] == ["--lr", "0.01"]


def test_index_compaction_and_rebuild_keep_args_and_metrics(
    runs: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backprop_mcp.core import store as store_module

    monkeypatch.setattr(store_module, "COMPACT_SLACK", 0)
    record = runs.store.read("b")
    for _ in range(30):
        runs.store.write(record)
    runs.store.maybe_compact()
    rows = [json.loads(line) for line in runs.store.index_path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4
    assert {r["run_id"]: r["args"] for r in rows}["b"] == ["--lr", "0.01"]
    runs.store.index_path.unlink()
    runs.store.rebuild_index()
    rows = [json.loads(line) for line in runs.store.index_path.read_text(encoding="utf-8").splitlines()]
    assert {r["run_id"]: r["metrics"] for r in rows}["d"] == {"val_acc": 0.8}


def test_the_cli_sorts_shows_the_metric_and_args_and_pages_with_the_same_options(
    runs: Service, env: dict[str, str], tmp_path: Path
) -> None:
    done = cli(env, "list", "--sort=-val_acc", "--limit", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:8] == ["RUN", "ID", "NAME", "STATUS", "ATT", "STEP", "LOSS", "val_acc"]
    assert lines[1].split()[0] == "b" and "--lr 0.01" in lines[1] and "0.9" in lines[1]
    assert lines[2].split()[0] == "d"
    assert lines[-1] == "more: backprop list --sort=-val_acc --limit=2 --cursor 2"
    nxt = cli(env, "list", "--sort=-val_acc", "--limit=2", "--cursor", "2", cwd=tmp_path)
    assert [line.split()[0] for line in nxt.stdout.splitlines()[1:]] == ["a", "c"]


def test_the_cli_says_how_to_write_a_descending_sort(env: dict[str, str], tmp_path: Path) -> None:
    done = cli(env, "list", "--sort", "-val_acc", cwd=tmp_path)
    assert done.returncode == 2
    assert "--sort=-val_acc" in done.stderr and "Traceback" not in done.stderr
    bad = cli(env, "list", "--sort= loss", cwd=tmp_path)
    assert bad.returncode == 2 and "invalid sort" in bad.stderr and "Traceback" not in bad.stderr


def test_the_cli_args_column_is_shortened(service: Service, env: dict[str, str], tmp_path: Path) -> None:
    add(service.store, "long", 1, args=["--layers", "64,128,256,512,1024,2048", "--dropout", "0.125"])
    done = cli(env, "list", cwd=tmp_path)
    row = done.stdout.splitlines()[1]
    assert "--layers 64,128,256,512,1024,2048 --d..." in row


def test_a_sorted_listing_of_an_isolated_store_sees_live_rows_fresh(tmp_path: Path) -> None:
    """A live run's row comes from its record (current metrics), also when sorting."""
    env = isolated_env(tmp_path / "home")
    service = Service(tmp_path / "home", env=env, cwd=tmp_path)
    add(service.store, "old", 1, metrics={"val_acc": 0.5})
    record = add(service.store, "live", 2, metrics={"val_acc": 0.1})
    record["metrics"] = {"val_acc": 0.99}  # the supervisor writes progress without an index row
    service.store.write(record, index=False)
    assert ids(service.list_runs(sort="-val_acc")) == ["old", "live"]  # finished: the row is trusted
    record["status"], record["metrics"] = "running", {"val_acc": 0.1}
    service.store.write(record, index=True)
    record["metrics"] = {"val_acc": 0.99}
    service.store.write(record, index=False)
    # Running but no supervisor: read fresh (within the launch grace it is not lost yet).
    assert ids(service.list_runs(sort="-val_acc"))[0] == "live"


def test_a_run_of_a_newer_backprop_is_listed_with_its_arguments_bounded(service: Service) -> None:
    record = add(service.store, "newer", 1, args=[f"--x{i}" for i in range(MAX_ROW_ARGS + 5)])
    path = service.store.record_path("newer")
    path.write_text(json.dumps({**record, "schema_version": 99}), encoding="utf-8")
    service.store.rebuild_index()
    (row,) = service.list_runs()["runs"]
    assert row["status"] == "unknown" and "newer backprop" in row.get("note", "")
    assert len(row["args"]) == MAX_ROW_ARGS + 1 and row["metrics"] == {}
