"""The suite's own isolation (issue 15, item 5): two suites on one machine at once never see each
other's runs, whatever their run ids."""

from __future__ import annotations

import pytest

from backprop_mcp.runs.service import Service
from tests import helpers
from tests.fault_helpers import start
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
