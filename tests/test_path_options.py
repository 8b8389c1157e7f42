"""Every CLI option that names a path is checked up front, on every command that takes it (issue 9,
item 19): a relative one resolves against the caller's working directory (--cwd) or the script's
(--python, --resume-from, the script), a missing one is a clear error, and nothing is stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import FIXTURES, cli, cli_json, unique_id

SCRIPT = str(FIXTURES / "counts_and_exits.py")


@pytest.fixture
def finished(env: dict[str, str], tmp_path: Path) -> str:
    """A run that completed, with a checkpoint, started from tmp_path."""
    run_id = unique_id("r1")
    record = cli_json(env, "run", SCRIPT, "--run-id", run_id, cwd=tmp_path)
    assert record["status"] == "completed"
    return run_id


def _events(env: dict[str, str], run_id: str) -> bytes:
    return (Path(env["BACKPROP_HOME"]) / "runs" / run_id / "events.jsonl").read_bytes()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["resume", "r1", "--cwd", "missing"], "working directory"),
        (["resume", "r1", "--cwd", "a-file"], "working directory"),
        (["resume", "r1", "--cwd", "/no/such/folder"], "working directory"),
        (["resume", "r1", "--python", "/no/such/python"], "interpreter"),
        (["resume", "r1", "--python", "no-such-python-here"], "interpreter"),
        (["resume", "r1", "--python", "a-file"], "interpreter"),
        (["run", SCRIPT, "--cwd", "missing"], "working directory"),
        (["run", SCRIPT, "--python", "/no/such/python"], "interpreter"),
        (["run", SCRIPT, "--python", "sh -c 'touch pwned'"], "interpreter"),
        (["run", SCRIPT, "--resume-from", "no-such.pt"], "checkpoint"),
        (["run", SCRIPT, "--dry-run", "--cwd", "missing"], "working directory"),
        (["run", SCRIPT, "--dry-run", "--python", "/no/such/python"], "interpreter"),
        (["run", SCRIPT, "--dry-run", "--resume-from", "no-such.pt"], "checkpoint"),
    ],
)
def test_a_path_option_that_names_nothing_usable_is_refused_up_front_and_nothing_is_stored(
    env: dict[str, str], tmp_path: Path, finished: str, argv: list[str], message: str
) -> None:
    (tmp_path / "a-file").write_text("not a folder, not a program\n", encoding="utf-8")
    argv = [finished if arg == "r1" else arg for arg in argv]  # the finished run's own id
    record_before = cli_json(env, "status", finished)
    events_before = _events(env, finished)
    done = cli(env, *argv, cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.startswith("backprop: error:") and message in done.stderr
    assert "Traceback" not in done.stderr and "could not start" not in done.stderr
    page = cli_json(env, "list")
    assert [row["run_id"] for row in page["runs"]] == [finished]
    assert cli_json(env, "status", finished)["attempt"] == record_before["attempt"]
    assert _events(env, finished) == events_before
    assert not (tmp_path / "pwned").exists()


def test_resume_cwd_is_taken_relative_to_the_callers_folder(
    env: dict[str, str], tmp_path: Path, finished: str
) -> None:
    (tmp_path / "elsewhere").mkdir()
    resumed = cli_json(env, "resume", finished, "--cwd", "elsewhere", "--from-scratch", cwd=tmp_path)
    assert resumed["cwd"] == str(tmp_path / "elsewhere"), "a relative --cwd was stored as given"
    # From another folder: relative to where the command runs, not to the run's old folder.
    again = cli(env, "resume", finished, "--cwd", ".", "--from-scratch", "--json", cwd=tmp_path / "elsewhere")
    assert again.returncode == 0, again.stderr
    record = json.loads(again.stdout)
    assert (record["cwd"], record["status"], record["attempt"]) == (
        str(tmp_path / "elsewhere"),
        "completed",
        3,
    )


def test_a_relative_interpreter_is_taken_from_the_scripts_folder_and_stored_absolute(
    env: dict[str, str], tmp_path: Path
) -> None:
    run_id = unique_id("v")
    import sys

    venv = tmp_path / "project" / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").symlink_to(sys.executable)
    record = cli_json(
        env,
        "run",
        SCRIPT,
        "--cwd",
        "project",
        "--python",
        ".venv/bin/python",
        "--run-id",
        run_id,
        cwd=tmp_path,
    )
    assert (record["status"], record["python"]) == ("completed", str(venv / "python"))
