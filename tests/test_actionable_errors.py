"""Errors and notes that say what to do: a script that is not there (what its folder holds), a run
that already completed its steps (how to train on), a log the script left empty (why), and `stop`
of several runs (each one reported)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backprop_mcp.core.errors import PathNotAllowed, RunStateError, UsageError
from backprop_mcp.runs.requests import MAX_SHOWN_SCRIPTS, RunRequest
from backprop_mcp.runs.service import Service
from tests.fault_helpers import start
from tests.helpers import FIXTURES, cli, wait_for_end, wait_for_log, wait_until

# -- a script that is not there ---------------------------------------------------------------------


def _scripts(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("print('hi')\n", encoding="utf-8")


def test_a_missing_script_shows_the_py_files_of_the_folder_it_looked_in(
    service: Service, tmp_path: Path
) -> None:
    _scripts(tmp_path / "proj", "train.py", "eval.py", "notes.txt")
    (tmp_path / "proj" / "pkg.py").mkdir()  # a folder, not a script
    with pytest.raises(UsageError) as caught:
        service.start(RunRequest(script="proj/trian.py"))
    folder = tmp_path / "proj"
    assert (
        caught.value.message
        == f"script not found: {folder / 'trian.py'}; .py files in {folder}: eval.py, train.py"
    )


def test_a_missing_script_in_a_big_folder_shows_a_few_and_counts_the_rest(
    service: Service, tmp_path: Path
) -> None:
    names = [f"s{n:02d}.py" for n in range(MAX_SHOWN_SCRIPTS + 5)]
    _scripts(tmp_path / "many", *reversed(names))
    with pytest.raises(UsageError) as caught:
        service.start(RunRequest(script=str(tmp_path / "many" / "x.py")))
    shown = ", ".join(names[:MAX_SHOWN_SCRIPTS])
    assert caught.value.message.endswith(f": {shown} and 5 more")


def test_a_missing_script_says_when_its_folder_does_not_exist_or_holds_no_scripts(
    service: Service, tmp_path: Path
) -> None:
    with pytest.raises(UsageError, match=f"the folder {tmp_path / 'nowhere'} does not exist"):
        service.start(RunRequest(script="nowhere/train.py"))
    _scripts(tmp_path / "empty", "README.md")
    with pytest.raises(UsageError, match=f"there are no .py files in {tmp_path / 'empty'}"):
        service.start(RunRequest(script="empty/train.py"))


def test_a_folder_given_as_the_script_shows_the_scripts_inside_it(service: Service, tmp_path: Path) -> None:
    _scripts(tmp_path / "examples", "mnist.py")
    with pytest.raises(UsageError) as caught:
        service.start(RunRequest(script="examples"))
    assert caught.value.message.endswith(f"is a folder; .py files in {tmp_path / 'examples'}: mnist.py")


def test_the_cli_shows_the_folder_of_a_missing_script(env: dict[str, str], tmp_path: Path) -> None:
    _scripts(tmp_path, "train.py")
    done = cli(env, "run", "trian.py", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f".py files in {tmp_path}: train.py" in done.stderr


def test_a_missing_script_inside_the_roots_shows_its_folder_and_one_outside_shows_nothing(
    service: Service, tmp_path: Path
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    _scripts(root, "train.py")
    _scripts(outside, "secret_plan.py")
    (root / "link").symlink_to(outside)
    with pytest.raises(UsageError, match=r"\.py files in .*root: train\.py"):
        service.start(RunRequest(script=str(root / "trian.py"), cwd=str(root)), allowed_roots=[root])
    for script in (outside / "x.py", root / "link" / "x.py", root / ".." / "outside" / "x.py"):
        with pytest.raises(PathNotAllowed) as caught:
            service.start(RunRequest(script=str(script), cwd=str(root)), allowed_roots=[root])
        assert "secret_plan" not in str(caught.value)


def test_configured_roots_keep_a_missing_scripts_folder_outside_them_unlisted(
    env: dict[str, str], tmp_path: Path
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    _scripts(root, "train.py")
    _scripts(outside, "secret_plan.py")
    (root / "link").symlink_to(outside)
    confined = {**env, "BACKPROP_ALLOWED_ROOTS": str(root)}
    for script in (str(outside / "x.py"), str(root / "link" / "x.py")):
        done = cli(confined, "run", script, cwd=root)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "secret_plan" not in done.stderr and ".py files" not in done.stderr
    inside = cli(confined, "run", "trian.py", cwd=root)
    assert ".py files in" in inside.stderr and "train.py" in inside.stderr


def test_a_missing_script_with_a_missing_cwd_lists_nothing_it_was_not_allowed_to(
    service: Service, tmp_path: Path
) -> None:
    _scripts(tmp_path / "other", "secret_plan.py")
    with pytest.raises(UsageError) as caught:
        service.start(RunRequest(script=str(tmp_path / "other" / "x.py"), cwd=str(tmp_path / "gone")))
    assert "script not found" in caught.value.message and "secret_plan" not in caught.value.message


# -- resuming a run that completed its steps --------------------------------------------------------


@pytest.fixture
def completed(service: Service) -> str:
    """A run whose script reported 2 of 2 steps and a checkpoint, then exited 0."""
    run_id = start(service, "counts_and_exits.py", "2")
    end = wait_for_end(service, run_id)
    assert (end["status"], end["step"], end["total"]) == ("completed", 2, 2)
    return run_id


def test_resuming_a_run_that_completed_its_steps_says_so_and_how_to_train_on(
    service: Service, completed: str
) -> None:
    before = service.store.record_path(completed).read_bytes()
    with pytest.raises(RunStateError) as caught:
        service.resume(completed)
    assert "already completed its 2 steps" in caught.value.message
    assert caught.value.hint is not None
    assert "script arguments that ask for more steps" in caught.value.hint and "(2)" in caught.value.hint
    assert "from_scratch" in caught.value.hint
    with pytest.raises(RunStateError, match="already completed its 2 steps"):
        service.resume_dry_run(completed)
    assert service.store.record_path(completed).read_bytes() == before  # nothing started


def test_new_arguments_resume_a_completed_run_from_its_checkpoint(service: Service, completed: str) -> None:
    resumed = service.resume(completed, args=["4"])
    assert (resumed["attempt"], resumed["args"]) == (2, ["4"])
    assert resumed["resume_from"] is not None
    end = wait_for_end(service, completed)
    assert (end["status"], end["step"], end["total"]) == ("completed", 4, 4)


def test_from_scratch_restarts_a_completed_run(service: Service, completed: str) -> None:
    resumed = service.resume(completed, from_scratch=True)
    assert (resumed["attempt"], resumed["resume_from"]) == (2, None)
    assert wait_for_end(service, completed)["status"] == "completed"


def test_the_cli_refuses_to_resume_a_completed_run_and_takes_new_arguments_after_dashes(
    service: Service, env: dict[str, str], completed: str, tmp_path: Path
) -> None:
    refused = cli(env, "resume", completed, cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert (
        "already completed its 2 steps" in refused.stderr
        and f"backprop resume {completed} --" in refused.stderr
    )
    resumed = cli(env, "resume", completed, "--detach", "--json", "--", "3", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["args"] == ["3"]
    assert wait_for_end(service, completed)["step"] == 3


def test_a_run_that_ended_before_its_last_step_resumes_as_it_is(service: Service, tmp_path: Path) -> None:
    run_id = start(service, "counts_and_exits.py", "3")
    wait_for_end(service, run_id)
    record = service.store.read(run_id)
    record["total"] = 10  # as if it had been stopped at step 3 of 10
    service.store.write(record)
    assert service.resume(run_id)["attempt"] == 2


# -- logs the script left empty ---------------------------------------------------------------------


def test_an_empty_log_says_the_script_printed_nothing_yet_then_nothing(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    run_id = start(service, "prints_nothing_until_the_gate_opens.py", str(gate))
    wait_until(lambda: service.get(run_id)["started_at"], what="the script to start")
    tail = service.logs(run_id)
    assert (tail["lines"], tail.get("note")) == ([], "the script printed nothing yet")
    done = cli(env, "logs", run_id, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout == ""
    assert "backprop: the script printed nothing yet" in done.stderr
    gate.touch()
    assert wait_for_end(service, run_id)["status"] == "completed"
    assert service.logs(run_id).get("note") == "the script printed nothing"
    assert "the script printed nothing" in cli(env, "logs", run_id, "--json", cwd=tmp_path).stdout


def test_a_log_with_lines_has_no_note(service: Service) -> None:
    run_id = start(service, "counts_and_exits.py", "1")
    wait_for_end(service, run_id)
    assert "note" not in service.logs(run_id)


def test_the_log_of_a_queued_or_never_started_run_says_why_it_is_empty(service: Service) -> None:
    # More free RAM than any machine has: queued (or, refused at once, rejected) for good.
    refused = service.start(
        RunRequest(
            script=str(FIXTURES / "counts_and_exits.py"), options={"min_free_ram_gb": 65536, "queue": False}
        )
    )
    assert refused["status"] == "rejected"
    assert service.logs(refused["run_id"])["note"] == "the script never started (the attempt ended rejected)"
    waiting = start(service, "counts_and_exits.py", min_free_ram_gb=65536)
    wait_until(lambda: service.get(waiting)["queue_position"], what="the run to wait in the queue")
    assert service.logs(waiting)["note"] == "the run is queued: its script has not started yet"
    service.stop(waiting)
    assert wait_for_end(service, waiting)["status"] == "stopped"


# -- stopping several runs --------------------------------------------------------------------------


def test_stop_of_several_runs_stops_each_and_reports_the_ones_it_could_not(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    first, second = start(service, "waits_forever.py"), start(service, "waits_forever.py")
    finished = start(service, "counts_and_exits.py", "1")
    wait_for_end(service, finished)
    for run_id in (first, second):
        wait_for_log(service, run_id, "ready")
    done = cli(env, "stop", first, "ghost", second, finished, first, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"stop requested for {first}; it is ")
    assert lines[1] == "could not stop ghost: no run with id 'ghost'"
    assert lines[2].startswith(f"stop requested for {second}; it is ")
    assert (
        lines[3]
        == f"could not stop {finished}: run {finished} has already ended (completed); nothing to stop"
    )
    assert len(lines) == 4  # a repeated id is stopped once
    for run_id in (first, second):
        assert wait_for_end(service, run_id)["status"] == "stopped"


def test_stop_of_several_runs_exits_0_when_all_stop_and_reports_json(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    runs = [start(service, "waits_forever.py") for _ in range(2)]
    for run_id in runs:
        wait_for_log(service, run_id, "ready")
    done = cli(env, "stop", *runs, "--force", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["all_stopped"] is True
    assert [(r["run_id"], r["stopped"], r["error"]) for r in report["runs"]] == [
        (r, True, None) for r in runs
    ]
    for run_id in runs:
        assert wait_for_end(service, run_id)["status"] == "stopped"


def test_stop_of_several_runs_refuses_a_malformed_id_before_stopping_any(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    run_id = start(service, "waits_forever.py")
    wait_for_log(service, run_id, "ready")
    done = cli(env, "stop", run_id, "a/b", cwd=tmp_path)
    assert done.returncode == 2 and "invalid run id" in done.stderr
    assert service.get(run_id)["status"] == "running"
    with pytest.raises(UsageError, match="give 1 to 100 run ids"):
        service.stop_runs([])
    service.stop(run_id)
    wait_for_end(service, run_id)


def test_stopping_one_run_keeps_its_exit_codes(env: dict[str, str], tmp_path: Path) -> None:
    assert cli(env, "stop", "ghost", cwd=tmp_path).returncode == 2
