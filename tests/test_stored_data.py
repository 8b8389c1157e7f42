"""Bad stored data (issue 9, items 13-17): damaged or foreign records and index lines, seed files
with impossible values, run ids with a trailing newline, control characters in stored strings, and
logs that rotate under a follower. Each case gets a clear answer, never a traceback, and never
hides the runs that are fine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.records import RunRecord, new_record, row_of
from backprop_mcp.core.store import Store
from backprop_mcp.governor.admission import Admission
from backprop_mcp.mcp_server.roots import Roots
from backprop_mcp.mcp_server.tools import build_server
from backprop_mcp.runs.service import Service
from tests.helpers import FIXTURES, WAIT_SECONDS, cli, unique_id

SCRIPT = str(FIXTURES / "counts_and_exits.py")


def add_run(store: Store, run_id: str, **fields: Any) -> RunRecord:
    """A finished run stored the way the service stores one, without starting anything."""
    record = new_record(
        run_id=run_id,
        script=SCRIPT,
        created_at=now_iso(),
        status="completed",
        termination_reason="exit_zero",
        loss=0.5,
        **fields,
    )
    store.create(record)
    store.index_append(row_of(record), new=True)
    return record


def no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr


def listed(env: dict[str, str]) -> list[dict[str, Any]]:
    done = cli(env, "list", "--json")
    no_traceback(done)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)["runs"]
    return rows


def index_inode(store: Store) -> int:
    return store.index_path.stat().st_ino


# -- item 13: one bad record never hides the others -------------------------------------------------


def _folder_named_run_json(store: Store) -> None:
    (store.runs / "bad").mkdir()
    (store.runs / "bad" / "run.json").mkdir()


def _newer_schema_without_index(store: Store) -> None:
    record = dict(add_run(store, "bad", name="from the future"))
    record.update(schema_version=99, shiny_new_field=[1, 2])
    store.record_path("bad").write_text(json.dumps(record), encoding="utf-8")
    store.index_path.unlink()


def _missing_fields(store: Store) -> None:
    (store.runs / "bad").mkdir()
    store.record_path("bad").write_text('{"run_id": "bad", "schema_version": 1}', encoding="utf-8")


def _wrong_types(store: Store) -> None:
    add_run(store, "bad")
    record = json.loads(store.record_path("bad").read_text(encoding="utf-8"))
    record.update(status=7, loss="low", attempts="many")
    store.record_path("bad").write_text(json.dumps(record), encoding="utf-8")
    store.index_path.unlink()


def _nan_loss(store: Store) -> None:
    add_run(store, "bad")
    text = store.record_path("bad").read_text(encoding="utf-8").replace('"loss": 0.5', '"loss": NaN')
    store.record_path("bad").write_text(text, encoding="utf-8")
    store.index_path.unlink()


DAMAGE: dict[str, Callable[[Store], None]] = {
    "a folder named run.json": _folder_named_run_json,
    "a newer schema and no index": _newer_schema_without_index,
    "a record missing its fields": _missing_fields,
    "fields of the wrong types": _wrong_types,
    "a NaN loss": _nan_loss,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_one_unreadable_record_never_hides_the_other_runs_and_the_index_converges(
    env: dict[str, str], damage: str
) -> None:
    store = Store(Path(env["BACKPROP_HOME"])).ensure()
    add_run(store, "good-1")
    DAMAGE[damage](store)
    add_run(store, "good-2")

    table = cli(env, "list")
    no_traceback(table)
    assert table.returncode == 0 and "no runs" not in table.stdout, table.stdout
    assert "good-1" in table.stdout and "good-2" in table.stdout
    rows = {row["run_id"]: row for row in listed(env)}
    assert {"good-1", "good-2"} <= set(rows)
    if damage == "a newer schema and no index":
        # Listed as such, not dropped, and not moved aside: a newer backprop can read it.
        assert rows["bad"]["status"] == "unknown" and "newer backprop" in rows["bad"]["note"]
        assert rows["bad"]["name"] == "from the future"
        assert store.record_path("bad").is_file()
    else:
        assert "bad" not in rows  # moved aside, kept for inspection
        assert list((store.runs / "bad").glob("run.json.corrupt-*"))
    # The index was rebuilt at most once: the next listings find it complete and leave it alone.
    inode = index_inode(store)
    assert [r["run_id"] for r in listed(env)] == list(rows)
    assert index_inode(store) == inode


@pytest.mark.parametrize(
    "argv",
    [["status", "bad"], ["compare", "good-1", "bad"], ["logs", "bad"], ["stop", "bad"], ["resume", "bad"]],
)
def test_a_record_missing_its_fields_is_moved_aside_with_a_clear_error(
    env: dict[str, str], argv: list[str]
) -> None:
    store = Store(Path(env["BACKPROP_HOME"])).ensure()
    add_run(store, "good-1")
    _missing_fields(store)
    done = cli(env, *argv)
    no_traceback(done)
    assert done.returncode == 1, done.stderr
    assert "record of run 'bad' was corrupt; it was moved to" in done.stderr
    assert "(attempt is missing)" in done.stderr
    again = cli(env, *argv)
    assert again.returncode == 2 and "no run with id 'bad'" in again.stderr
    assert cli(env, "status", "good-1").returncode == 0


INDEX_LINES = [
    '{"run_id": 5, "new": true}',
    '{"run_id": "x", "status": 7, "attempt": 1, "created_at": "t", "script": "s", "new": true}',
    '{"run_id": "good-1", "status": "completed", "attempt": "one", "created_at": "t", "script": "s"}',
    '{"run_id": "../escape", "status": "completed", "attempt": 1, "created_at": "t", "script": "s"}',
    '{"run_id": "y", "status": "completed", "attempt": 1, "created_at": 5, "script": "s", "new": true}',
    '{"run_id": "z", "status": "completed", "attempt": 1, "created_at": "t", "script": "s", "loss": "NaN"}',
    '{"run_id": "deep", "name": ' + "[" * 5000 + "]" * 5000 + "}",
    "[]",
    '"a string"',
    "null",
    "{not json",
]


def test_index_lines_of_the_wrong_types_are_skipped_and_the_index_rebuilt_once(env: dict[str, str]) -> None:
    store = Store(Path(env["BACKPROP_HOME"])).ensure()
    add_run(store, "good-1")
    with store.index_path.open("a", encoding="utf-8") as handle:
        handle.write("\n".join(INDEX_LINES) + "\n")
    add_run(store, "good-2")
    table = cli(env, "list")
    no_traceback(table)
    assert table.returncode == 0 and "good-1" in table.stdout and "good-2" in table.stdout
    assert [r["run_id"] for r in listed(env)] == ["good-2", "good-1"]
    inode = index_inode(store)
    assert [r["run_id"] for r in listed(env)] == ["good-2", "good-1"]
    assert index_inode(store) == inode


def test_a_cursor_that_is_not_plain_digits_is_a_usage_error(env: dict[str, str]) -> None:
    for cursor in ("²", "\u0661", "9" * 5000, " 1", "1\n"):
        done = cli(env, "list", "--cursor", cursor)
        no_traceback(done)
        assert done.returncode == 2 and "invalid cursor" in done.stderr, (cursor, done.stderr)


# -- MCP over the same damage -------------------------------------------------------------------------


def test_bad_stored_data_over_mcp_gives_error_results_and_keeps_the_good_runs(
    env: dict[str, str], tmp_path: Path
) -> None:
    from mcp import Client

    service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=tmp_path)
    store = service.store.ensure()
    add_run(store, "good-1")
    _missing_fields(store)
    (store.runs / "newer").mkdir()
    store.record_path("newer").write_text(
        json.dumps({"run_id": "newer", "schema_version": 2, "created_at": "2020-01-01T00:00:00.000Z"}),
        encoding="utf-8",
    )
    server = build_server(
        service=service, roots=Roots((tmp_path,), "option"), cwd=tmp_path, poll_seconds=0.05
    )

    async def scenario() -> None:
        with anyio.fail_after(WAIT_SECONDS):
            async with Client(server, mode="legacy") as client:
                page = await client.call_tool("list_experiments", {})
                assert not page.is_error, page.content
                assert page.structured_content is not None
                runs = {r["run_id"]: r for r in page.structured_content["runs"]}
                assert set(runs) == {"good-1", "newer"} and runs["newer"]["status"] == "unknown"
                cases: list[tuple[str, dict[str, Any], str]] = [
                    ("list_experiments", {"cursor": "²"}, "invalid cursor"),
                    ("get_status", {"run_id": "newer"}, "newer backprop"),
                    ("compare_runs", {"run_ids": ["good-1", "newer"]}, "newer backprop"),
                    ("get_logs", {"run_id": "newer"}, "newer backprop"),
                ]
                for tool, arguments, fragment in cases:
                    result = await client.call_tool(tool, arguments)
                    text = "".join(getattr(block, "text", "") for block in result.content)
                    assert result.is_error and fragment in text, (tool, text)
                    assert not text.startswith("Error executing tool") and "Traceback" not in text

    anyio.run(scenario)


# -- item 14: the seed's file with impossible values ----------------------------------------------------


def test_import_legacy_skips_entries_with_impossible_values_whole_and_says_why(
    env: dict[str, str], tmp_path: Path
) -> None:
    entries = [
        '{"id": "inf-loss", "status": "completed", "lastLoss": 1e999}',
        '{"id": "nan-loss", "status": "completed", "lastLoss": NaN}',
        '{"id": "far-future", "status": "completed", "startTime": 1e30}',
        '{"id": "negative-time", "status": "completed", "endTime": -5}',
        '{"id": "huge-step", "status": "completed", "lastStep": ' + "9" * 30 + "}",
        '{"id": "bad-name", "status": "completed", "name": ["x"]}',
        '{"id": "bad-checkpoints", "status": "completed", "checkpoints": "ck.pt"}',
        '{"id": "newline\\n", "status": "completed"}',
        '{"id": "fine", "status": "completed", "lastLoss": 0.25, "startTime": 1700000000000}',
    ]
    legacy = tmp_path / "experiments.json"
    legacy.write_text('{"experiments": [' + ",".join(entries) + "]}", encoding="utf-8")
    done = cli(env, "import-legacy", str(legacy), "--json")
    no_traceback(done)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["imported"] == ["fine"]
    reasons = "\n".join(report["skipped"])
    for fragment in (
        "lastLoss must be a finite number or null, got inf",
        "lastLoss must be a finite number or null, got nan",
        "startTime must be a time in milliseconds since 1970",
        "endTime must be a time",
        "lastStep must be a whole number",
        "name must be a string",
        "checkpoints must be a list",
        "entry 7 ('newline\\n'): no valid id",
    ):
        assert fragment in reasons, reasons
    assert len(report["skipped"]) == len(entries) - 1
    # All or nothing: a skipped entry left no folder behind, and everything stored lists cleanly.
    home = Path(env["BACKPROP_HOME"])
    assert sorted(p.name for p in (home / "runs").iterdir()) == ["fine"]
    assert [r["run_id"] for r in listed(env)] == ["fine"]
    table = cli(env, "import-legacy", str(legacy))
    no_traceback(table)
    assert "skipped entry 7 ('newline\\n')" in table.stdout  # quoted, never a raw newline


# -- item 15: "id\n" is refused everywhere an id enters -------------------------------------------------


def test_a_run_id_with_a_trailing_newline_is_refused_everywhere_an_id_enters(
    env: dict[str, str], tmp_path: Path
) -> None:
    from mcp import Client

    store = Store(Path(env["BACKPROP_HOME"])).ensure()
    add_run(store, "a")  # so that "a\n" cannot be mistaken for a missing run
    for argv in (
        ["run", SCRIPT, "--run-id", "b\n", "--dry-run"],
        ["run", SCRIPT, "--run-id", "b\n", "--detach"],
        ["status", "a\n"],
        ["logs", "a\n"],
        ["stop", "a\n"],
        ["resume", "a\n"],
        ["compare", "a\n"],
    ):
        done = cli(env, *argv)
        no_traceback(done)
        assert done.returncode == 2 and "invalid run id" in done.stderr, (argv, done.stderr)
    assert not (store.runs / "b\n").exists()
    with pytest.raises(ValueError, match="invalid run id"):
        Admission(store.governor_dir).join("a\n", os.getpid(), 0.0)

    service = Service(store.home, env=env, cwd=tmp_path)
    server = build_server(
        service=service, roots=Roots((FIXTURES,), "option"), cwd=tmp_path, poll_seconds=0.05
    )

    async def scenario() -> None:
        with anyio.fail_after(WAIT_SECONDS):
            async with Client(server, mode="legacy") as client:
                cases: list[tuple[str, dict[str, Any]]] = [
                    ("run_training", {"script": SCRIPT, "run_id": "b\n"}),
                    ("get_status", {"run_id": "a\n"}),
                    ("resume_run", {"run_id": "a\n"}),
                    ("stop_run", {"run_id": "a\n"}),
                    ("get_logs", {"run_id": "a\n"}),
                    ("wait_for_run", {"run_id": "a\n"}),
                    ("compare_runs", {"run_ids": ["a\n"]}),
                ]
                for tool, arguments in cases:
                    result = await client.call_tool(tool, arguments)
                    text = "".join(getattr(block, "text", "") for block in result.content)
                    assert result.is_error and "run_id" in text, (tool, text)

    anyio.run(scenario)
    assert not (store.runs / "b\n").exists()


# -- item 16: control characters never reach the terminal raw ------------------------------------------

FORGED = "x\nforged  completed  1\x1b]0;pwned\x07\x9b31m\u202eevil\x7f"


def _raw_controls(text: str) -> list[str]:
    return [c for c in text if (ord(c) < 32 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F or c == "\u202e"]


def test_stored_strings_are_escaped_in_every_human_output(env: dict[str, str]) -> None:
    store = Store(Path(env["BACKPROP_HOME"])).ensure()
    add_run(
        store,
        "forged",
        name=FORGED,
        status_detail=FORGED,
        args=[FORGED],
        metrics={FORGED: 1.0},
        latest_checkpoint=FORGED,
    )
    log = store.log_path("forged", 1)
    log.write_bytes(b"plain\tcolumns\n\x1b]0;title\x07\x1b[2J cleared\n")
    for argv in (
        ["list"],
        ["status", "forged"],
        ["compare", "forged", "--metric", FORGED],
        ["logs", "forged"],
        ["logs", "forged", "-f"],
        ["status", "no-such-\x1b]0;x\x07"],
        ["list", "--status", FORGED],
        ["list", "--bogus\x1b[2J"],
    ):
        done = cli(env, *argv)
        no_traceback(done)
        assert _raw_controls(done.stdout + done.stderr) == [], (argv, done.stdout, done.stderr)
    table = cli(env, "list").stdout.splitlines()
    assert len(table) == 2 and table[1].startswith("forged")  # the header and one row: none forged
    assert "x\\nforged" in table[1] and "\\x1b]0;pwned\\x07" in table[1] and "\\u202e" in table[1]
    logs = cli(env, "logs", "forged").stdout
    assert "plain\tcolumns" in logs and "\\x1b]0;title\\x07" in logs  # tabs are kept
    # --json stays JSON: the strings come back exactly as stored.
    assert json.loads(cli(env, "status", "forged", "--json").stdout)["name"] == FORGED


# -- item 17: a log that rotates under its follower --------------------------------------------------


def test_the_follower_reads_every_line_once_across_rotations(tmp_path: Path) -> None:
    from backprop_mcp.runs.runlog import LogFollower, RunLog

    path = tmp_path / "attempt-1.log"
    writer = RunLog(path, max_bytes=64)
    follower = LogFollower(path)
    seen: list[bytes] = []
    written: list[bytes] = []
    for number in range(200):
        line = f"line {number:04d}".encode()
        written.append(line)
        # A line cut in two by a rotation (the writer gets pipe chunks, not lines).
        writer.write(line[:4])
        writer.write(line[4:] + b"\n")
        if number % 7 == 0:  # several rotations between some reads, none between others
            seen += follower.lines()
    writer.write(b"unended")
    seen += follower.lines(final=True)
    writer.close()
    follower.close()
    assert seen == [*written, b"unended"]


def test_a_write_larger_than_the_limit_keeps_each_log_file_within_it(tmp_path: Path) -> None:
    from backprop_mcp.runs.runlog import RunLog, rotated_path

    path = tmp_path / "attempt-1.log"
    writer = RunLog(path, max_bytes=1024)
    data = bytes(range(256)) * 20  # one 5 KiB chunk, as one pipe read can hand over
    writer.write(b"head\n")
    writer.write(data)
    writer.close()
    current, rotated = path.read_bytes(), rotated_path(path).read_bytes()
    assert len(current) <= 1024 and len(rotated) == 1024
    assert rotated + current == (b"head\n" + data)[-(len(rotated) + len(current)) :]


def test_the_follower_starts_again_when_the_file_shrinks(tmp_path: Path) -> None:
    from backprop_mcp.runs.runlog import LogFollower

    path = tmp_path / "attempt-1.log"
    path.write_bytes(b"one\ntwo\n")
    follower = LogFollower(path)
    assert follower.lines() == [b"one", b"two"]
    with path.open("r+b") as handle:  # truncated in place, same inode
        handle.truncate(0)
        handle.write(b"three\n")
    assert follower.lines() == [b"three"]
    follower.close()


def _follow_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("line ")]


@pytest.mark.parametrize("view", ["logs -f", "foreground"])
def test_every_line_of_a_rotating_log_is_shown_exactly_once(
    env: dict[str, str], tmp_path: Path, view: str
) -> None:
    # 8 kB rotations: the fixture's 400 lines of ~100 bytes rotate the log four times.
    run_id = unique_id("rotating")
    env = {**env, "BACKPROP_LOG_ROTATE_BYTES": "8192"}
    script = str(FIXTURES / "floods_past_log_rotation.py")
    run = [sys.executable, "-m", "backprop_mcp", "run", script, "--run-id", run_id]
    if view == "logs -f":
        started = cli(env, *run[3:], "--detach", cwd=tmp_path)
        assert started.returncode == 0, started.stderr
        done = cli(env, "logs", run_id, "-f", timeout=WAIT_SECONDS * 2)
    else:
        done = subprocess.run(
            run, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=WAIT_SECONDS * 2, check=False
        )
    no_traceback(done)
    assert done.returncode == 0, done.stderr
    assert _follow_lines(done.stdout) == [f"line {n:05d} {'x' * 80}" for n in range(400)]
    assert "colour \\x1b[31mred\\x1b[0m and\ta tab" in done.stdout
    assert "the end" in done.stdout
    logs = Path(env["BACKPROP_HOME"]) / "runs" / run_id / "logs"
    assert (logs / "attempt-1.log.1").exists()  # it did rotate
