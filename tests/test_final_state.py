"""The final state is the last change to the store (issue 15, item 1): whoever sees a run ended
(a walk of the store, a resume, a listing) finds the run's store quiescent: its slot and ticket
gone, its events and index rows written, its index compacted, no temp file left. Each test takes
a picture of the run's part of the store at the very instant its final record replaces the old one
(the real supervisor, or the reader that ends the run, with the record write watched) and compares
it with the store once every process of the run has exited."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from backprop_mcp.backends import local
from backprop_mcp.core import store as store_module
from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.files import atomic_write
from backprop_mcp.core.records import TERMINAL_STATES, RunRecord, new_record, row_of
from backprop_mcp.runs import detached
from backprop_mcp.runs.launch import AWAIT_GO_FLAG
from backprop_mcp.runs.requests import RunRequest
from backprop_mcp.runs.service import Service
from tests.fault_helpers import run_view, supervisor_pid, wait_for_supervisor_exit
from tests.helpers import FIXTURES, unique_id, wait_for_end, wait_until

REPO = Path(__file__).resolve().parents[1]
# More free RAM than any machine has: the governor holds the run in the queue (or refuses it).
NEVER_ADMITTED = {"min_free_ram_gb": 65536}


@pytest.fixture
def watched(service: Service, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Supervisors of this service are the real one wrapped to snapshot their final write; returns
    the file the snapshot goes to."""
    snapshot = tmp_path / "snapshot.json"

    def spawn(home: Path, run_id: str, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        env = {**env, "SNAPSHOT_FILE": str(snapshot), "PYTHONPATH": str(REPO)}
        return detached.spawn(
            "tests.fixtures.supervisor_snapshots_its_final_write",
            [str(home), run_id, AWAIT_GO_FLAG],
            home / "runs" / run_id / "supervisor.log",
            env,
        )

    monkeypatch.setattr(local, "spawn_supervisor", spawn)
    return snapshot


def _start(service: Service, fixture: str, run_id: str, **options: object) -> str:
    request = RunRequest(script=str(FIXTURES / fixture), run_id=run_id, options=dict(options))
    return service.start(request)["run_id"]


def _assert_quiescent_after_final_write(service: Service, snapshot: Path, run_id: str) -> RunRecord:
    end = wait_for_end(service, run_id)
    wait_for_supervisor_exit(service, run_id)
    seen: dict[str, Any] = json.loads(snapshot.read_text("utf-8"))
    assert seen == run_view(service.store.home, run_id)
    assert seen["queue"] == [] and seen["temps"] == []
    return end


def _pad_the_index(service: Service) -> None:
    """Rows of another run, enough that the next run's end compacts the index (it compacts past
    about COMPACT_RATIO rows per run plus COMPACT_SLACK rows of up to 320 bytes: this is more)."""
    service.store.ensure()
    row = json.dumps(dict(row_of(new_record(run_id="padding", script="x.py", created_at=now_iso()))))
    lines = (store_module.COMPACT_SLACK + store_module.COMPACT_RATIO * 10) * 400 // len(row)
    with service.store.index_path.open("a", encoding="utf-8") as index:
        index.write((row + "\n") * lines)


def test_a_run_that_completes_changes_nothing_after_its_final_state(service: Service, watched: Path) -> None:
    run_id = _start(service, "counts_and_exits.py", unique_id("done"))
    end = _assert_quiescent_after_final_write(service, watched, run_id)
    assert end["status"] == "completed"
    events = service.store.read_events(run_id)
    assert events[-1]["type"] == "state" and events[-1]["status"] == "completed"


def test_the_index_compaction_at_a_runs_end_comes_before_its_final_state(
    service: Service, watched: Path
) -> None:
    _pad_the_index(service)
    padded = service.store.index_size()
    run_id = _start(service, "counts_and_exits.py", unique_id("compacted"))
    assert _assert_quiescent_after_final_write(service, watched, run_id)["status"] == "completed"
    assert service.store.index_size() < padded / 100  # it was compacted


def test_a_run_whose_interpreter_cannot_start_changes_nothing_after_its_final_state(
    service: Service, watched: Path, tmp_path: Path
) -> None:
    python = tmp_path / "not-a-program"
    python.write_text("neither a binary nor a #! line\n", encoding="utf-8")
    python.chmod(0o755)
    request = RunRequest(
        script=str(FIXTURES / "counts_and_exits.py"), run_id=unique_id("no-exec"), python=str(python)
    )
    run_id = service.start(request)["run_id"]
    end = _assert_quiescent_after_final_write(service, watched, run_id)
    assert (end["status"], end["termination_reason"]) == ("failed", "start_failed")


def test_a_run_that_waits_past_its_queue_timeout_changes_nothing_after_its_final_state(
    service: Service, watched: Path
) -> None:
    run_id = _start(
        service, "counts_and_exits.py", unique_id("timeout"), queue_timeout_minutes=0.01, **NEVER_ADMITTED
    )
    end = _assert_quiescent_after_final_write(service, watched, run_id)
    assert (end["status"], end["termination_reason"]) == ("rejected", "queue_timeout")


def test_a_run_stopped_while_queued_changes_nothing_after_its_final_state(
    service: Service, watched: Path
) -> None:
    run_id = _start(service, "counts_and_exits.py", unique_id("queued"), **NEVER_ADMITTED)
    wait_until(
        lambda: "GB required" in (service.store.read(run_id)["status_detail"] or ""),
        what="the run to wait in the queue for RAM",
    )
    service.stop(run_id)
    end = _assert_quiescent_after_final_write(service, watched, run_id)
    assert (end["status"], end["termination_reason"]) == ("stopped", "stop_requested")


def _watch_here(service: Service, monkeypatch: pytest.MonkeyPatch, run_id: str) -> list[dict[str, Any]]:
    """Snapshots of the run taken in this process the instant a final record of it is written."""
    seen: list[dict[str, Any]] = []

    def watched(path: Path, data: bytes) -> None:
        atomic_write(path, data)
        final = path.parent.name == run_id and path.name == "run.json"
        if final and json.loads(data)["status"] in TERMINAL_STATES and not seen:
            seen.append(run_view(service.store.home, run_id))

    monkeypatch.setattr(store_module, "atomic_write", watched)
    return seen


def test_a_run_refused_at_its_start_is_whole_when_it_is_seen_rejected(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = unique_id("refused")
    seen = _watch_here(service, monkeypatch, run_id)
    _start(service, "counts_and_exits.py", run_id, queue=False, **NEVER_ADMITTED)
    assert service.get(run_id)["status"] == "rejected"
    assert seen == [run_view(service.store.home, run_id)]
    assert [e.get("status") for e in service.store.read_events(run_id)] == ["queued", "rejected"]


def test_a_run_a_reader_finds_lost_is_quiescent_when_it_is_seen_lost(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = _start(service, "waits_forever.py", unique_id("orphan"))
    wait_until(lambda: service.store.read(run_id)["status"] == "running", what="the run to start")
    pid = supervisor_pid(service, run_id)
    os.kill(pid, signal.SIGKILL)
    wait_for_supervisor_exit(service, run_id)
    seen = _watch_here(service, monkeypatch, run_id)
    assert service.get(run_id)["status"] == "lost"
    assert seen == [run_view(service.store.home, run_id)]
    assert seen[0]["queue"] == []
