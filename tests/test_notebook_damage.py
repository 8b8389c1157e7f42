"""A damaged lab notebook (issue 16, point 4): a torn last line (a writer that died mid-line) must
not swallow the next note or tag, a notebook or tag index that cannot be read is a clear error for
that run and never a traceback, and the listing of the other runs goes on."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from backprop_mcp.core import notebook
from tests.helpers import FIXTURES, cli, cli_json, unique_id

QUICK = str(FIXTURES / "counts_and_exits.py")


def ended_run(env: dict[str, str], *extra: str) -> str:
    run_id = unique_id("nbd")
    done = cli(env, "run", QUICK, "--run-id", run_id, *extra)
    assert done.returncode == 0, done.stderr
    return run_id


def test_a_note_and_a_tag_after_a_torn_last_line_are_kept(env: dict[str, str]) -> None:
    run_id = ended_run(env, "--tag", "first")
    home = Path(env["BACKPROP_HOME"])
    with (home / "runs" / run_id / notebook.NOTES_FILE).open("ab") as torn:
        torn.write(b'{"at":"2026-01-01T00:00:00.000Z","source":"cli","note":"cut sh')
    with (home / notebook.TAG_INDEX_FILE).open("ab") as torn:
        torn.write(b'{"run_id":"' + run_id.encode() + b'","created_at":"2026')

    done = cli(env, "note", run_id, "written after the torn line", "--tag", "second")
    assert done.returncode == 0, done.stderr

    shown = cli_json(env, "note", run_id)
    assert [n["text"] for n in shown["notes"]] == ["written after the torn line"]
    assert shown["tags"] == ["first", "second"]
    assert [r["run_id"] for r in cli_json(env, "list", "--tag", "second")["runs"]] == [run_id]


def test_tags_in_a_notebook_that_no_command_could_write_are_ignored(env: dict[str, str]) -> None:
    run_id = ended_run(env, "--tag", "kept")
    path = Path(env["BACKPROP_HOME"]) / "runs" / run_id / notebook.NOTES_FILE
    with path.open("a", encoding="utf-8") as edited:
        edited.write(
            json.dumps({"at": "2026-01-01T00:00:00.000Z", "tag": ["\x1b[31mred", "-x", "ok"]}) + "\n"
        )

    # A tag that `backprop tag --remove` would refuse to name could never be taken off again.
    assert cli_json(env, "note", run_id)["tags"] == ["kept", "ok"]


def test_a_notebook_that_cannot_be_read_is_a_clear_error_and_the_other_runs_still_list(
    env: dict[str, str],
) -> None:
    broken = ended_run(env, "--tag", "shared")
    fine = ended_run(env, "--tag", "shared")
    home = Path(env["BACKPROP_HOME"])
    notes = home / "runs" / broken / notebook.NOTES_FILE
    notes.unlink()
    notes.mkdir()  # read fails with an OSError other than "no such file"
    (home / notebook.TAG_INDEX_FILE).unlink()  # the next listing rebuilds it from the notebooks

    listed = cli_json(env, "list", "--tag", "shared")
    assert [r["run_id"] for r in listed["runs"]] == [fine]
    for args in (["note", broken, "more"], ["note", broken], ["show", broken]):
        done = cli(env, *args)
        assert done.returncode == 1, args  # docs/cli.md: the store could not be read or written
        assert "Traceback" not in done.stderr, done.stderr
        assert str(notes) in done.stderr and "backprop: error:" in done.stderr, done.stderr
    # `status` still shows the run, whose record is fine, and says why its notes are missing.
    done = cli(env, "status", broken)
    assert done.returncode == 0, done.stderr
    assert f"run        {broken}" in done.stdout, done.stdout
    assert "notes      cannot be read:" in done.stdout and str(notes) in done.stdout, done.stdout

    (home / notebook.TAG_INDEX_FILE).unlink()
    (home / notebook.TAG_INDEX_FILE).mkdir()
    done = cli(env, "list", "--tag", "shared")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and notebook.TAG_INDEX_FILE in done.stderr, done.stderr


@pytest.mark.anyio
async def test_get_status_of_a_run_whose_notebook_cannot_be_read_still_answers_and_says_why(
    env: dict[str, str], tmp_path: Path
) -> None:
    from mcp import Client

    from backprop_mcp.mcp_server.roots import Roots
    from backprop_mcp.mcp_server.tools import build_server
    from backprop_mcp.runs.service import Service

    run_id = ended_run(env, "--tag", "kept")
    home = Path(env["BACKPROP_HOME"])
    notes = home / "runs" / run_id / notebook.NOTES_FILE
    notes.unlink()
    notes.mkdir()
    service = Service(home, env=env, cwd=tmp_path)
    server = build_server(service=service, roots=Roots((tmp_path,), "option"), cwd=tmp_path)
    with anyio.fail_after(60):
        async with Client(server, mode="legacy") as client:
            result = await client.call_tool("get_status", {"run_id": run_id, "detail": True})
    answer = result.structured_content
    assert not result.is_error and answer is not None
    assert (answer["run_id"], answer["status"]) == (run_id, "completed")
    assert str(notes) in answer["notes_error"] and answer["notes"] == [] and "tags" not in answer
