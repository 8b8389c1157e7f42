"""The suite's own isolation (issue 15, item 5): two suites on one machine at once never see each
other's runs, whatever their run ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from backprop_mcp.runs.service import Service
from tests import helpers
from tests.fault_helpers import start
from tests.fixed_ids import FixedId, scan, scan_tests
from tests.helpers import processes_with_run_id, unique_id, wait_for_end, wait_for_log


def test_the_leftover_check_sees_this_sessions_run_and_not_the_same_id_of_another_session(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = start(service, "waits_forever.py")
    wait_for_log(service, run_id, "ready")
    assert processes_with_run_id(run_id)  # its script carries the store's BACKPROP_HOME
    assert helpers.SESSION_ROOT is not None
    monkeypatch.setattr(helpers, "SESSION_ROOT", helpers.SESSION_ROOT.parent / "another-session")
    assert processes_with_run_id(run_id) == []  # seen from another session's suite: not its run
    monkeypatch.undo()
    service.stop(run_id)
    assert wait_for_end(service, run_id)["status"] == "stopped"
    assert processes_with_run_id(run_id) == []


def test_unique_ids_keep_their_stem_and_never_repeat() -> None:
    ids = {unique_id("first") for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("first-") and len(i) == len("first-") + 8 for i in ids)


# -- no fixed run ids (issue 15, item 5) ------------------------------------------------------------

# Functions that only build or store a record (in memory, or straight into the test's own store):
# no run starts, so no process ever carries the id. "*": in any test file.
RECORD_BUILDERS: dict[tuple[str, str], str] = {
    ("*", "new_record"): "a record built in memory",
    ("*", "Trial"): "a sweep trial row built in memory",
    ("test_governor.py", "run"): "a live-run row for the pure governor",
    ("test_list_sort.py", "add"): "a record written straight into the test's store",
    ("test_store.py", "add"): "a record written straight into the test's store",
    ("test_stored_data.py", "add_run"): "a record written straight into the test's store",
}
# Fixed ids that name no run any process carries: runs that do not exist (the answer must say
# so), arguments refused before any run is looked up, and records or queue files a test forges.
NO_RUN_IDS: dict[str, tuple[set[str], str]] = {
    "test_admission.py": ({"a-second", "b-third", "c-first", "other"}, "queue tickets of no run"),
    "test_bad_input.py": ({"ghost", "ok", "r", "x"}, "unknown runs, refused arguments, a forged record"),
    "test_history.py": ({"counted"}, "arguments refused before any run is looked up"),
    "test_mcp_answers.py": ({"a"}, "an index row rendered by itself"),
    "test_mcp_edges.py": ({"nope-1"}, "a run that does not exist"),
    "test_mcp_sweeps.py": (
        {"no-such-sweep", "s", "s-t1", "s-t2", "s-t3", "sweep-20260101-000000-abcd"}
        | {"f'sweep-20260101-000000-abcd-t{n}'"},
        "a sweep that does not exist, and sweep records (and their trials) forged in memory",
    ),
    "test_mcp_tools.py": ({"no-such-run", "x"}, "unknown runs, refused arguments"),
    "test_plot.py": ({"nope", "sw"}, "a run that does not exist, a sweep record forged in memory"),
    "test_stored_data.py": ({"good-1", "newer"}, "records forged in the test's store"),
}


def _allowed(fixed: FixedId) -> bool:
    if any(fixed.how.startswith(f"{name}(") and file in ("*", fixed.file) for file, name in RECORD_BUILDERS):
        return True
    return fixed.value in NO_RUN_IDS.get(fixed.file, (set(), ""))[0]


def test_no_test_gives_the_product_a_fixed_run_or_sweep_id() -> None:
    """Every run or sweep a test starts has an id of its own (`unique_id`): a fixed one (`first`,
    `m1`) is the same in two suites running at once, and a cluster job's processes are matched by
    id alone. A deliberately invalid id is not flagged (nothing runs with it); one that collides
    on purpose is a variable used twice within the test."""
    found = [fixed for fixed in scan_tests(Path(__file__).parent) if not _allowed(fixed)]
    assert not found, "fixed ids given to the product; use unique_id(...):\n" + "\n".join(map(str, found))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('service.start(RunRequest(script="s.py", run_id="first"))', "RunRequest(run_id=) 'first'"),
        ('cli(env, "run", "s.py", "--run-id", "m1")', "--run-id 'm1'"),
        ('argv = ["sweep", "s.py", "--sweep-id", "sw"]', "--sweep-id 'sw'"),
        ('call(client, "run_training", {"script": "s.py", "run_id": "r1"})', "\"run_id\": 'r1'"),
        ('write(path, {"runId": "seed-run"})', "\"runId\": 'seed-run'"),
        ('for n in range(3):\n    start(RunRequest(run_id=f"r{n}"))', "RunRequest(run_id=) \"f'r{n}'\""),
        (
            'start_at_once(env, cwd, script, [f"q{n}" for n in range(2)])',
            "start_at_once(run_ids=) \"f'q{n}'\"",
        ),
        ('def go(service, run_id):\n    pass\ngo(service, "mine")', "go(run_id=) 'mine'"),
        ('for run_id, steps in (("short", "2"),):\n    pass', "for ... in 'short'"),
        ('first_id = "first"', "first_id = 'first'"),
    ],
)
def test_the_fixed_id_scan_sees_each_way_a_test_names_a_run(source: str, expected: str) -> None:
    helpers = {"start_at_once": {"run_ids": 3}}
    assert [f"{f.how} {f.value!r}" for f in scan(source, "test_x.py", helpers)] == [expected]


@pytest.mark.parametrize(
    "source",
    [
        'service.start(RunRequest(script="s.py", run_id=unique_id("first")))',
        'cli(env, "run", "s.py", "--run-id", run_id)',
        'cli(env, "run", "s.py", "--run-id", "../escape")',  # refused: nothing runs
        'call(client, "get_status", {"run_id": "a\\n"})',
        'start_at_once(env, cwd, script, [unique_id(f"q{n}") for n in range(2)])',
        'trials = [f"{sweep_id}-t{n}" for n in range(2)]',
    ],
)
def test_the_fixed_id_scan_passes_unique_computed_and_invalid_ids(source: str) -> None:
    assert scan(source, "test_x.py", {"start_at_once": {"run_ids": 3}}) == []
