"""Which code each attempt ran (issue 16): the script's hash and copy, snapshot globs within a size
limit, the git state (bounded: no git, a hanging git), the environment without variable values;
and `show`, `diff`, `compare_runs`' code, resume after an edit, `rerun` from the stored copy."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import anyio
import psutil
import pytest

from backprop_mcp import __version__
from backprop_mcp.runs.gitstate import git_state
from backprop_mcp.runs.provenance import code_dir
from backprop_mcp.runs.requests import RunRequest
from backprop_mcp.runs.service import Service
from tests.helpers import FIXTURES, cli, cli_json, wait_for_end, wait_until

GIT = shutil.which("git")
needs_git = pytest.mark.skipif(GIT is None, reason="git is not installed")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def project(folder: Path) -> Path:
    """A folder holding prints_its_version.py and its sibling module; returns the script."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "train.py"
    shutil.copy(FIXTURES / "prints_its_version.py", script)
    (folder / "sibling_value.py").write_text("VALUE = 'a'\n", encoding="utf-8")
    return script


def edit(script: Path, old: str, new: str) -> None:
    text = script.read_text("utf-8")
    assert old in text
    script.write_text(text.replace(old, new), encoding="utf-8")


def git(folder: Path, *args: str) -> str:
    assert GIT is not None
    done = subprocess.run(
        [GIT, "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main", *args],
        cwd=folder,
        env={**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def run_to_end(service: Service, script: Path, *args: str, **options: object) -> dict[str, object]:
    request = RunRequest(
        str(script), args, run_id=unique("run"), cwd=str(script.parent), options=options or None
    )
    record = service.start(request)
    return dict(wait_for_end(service, record["run_id"]))


def provenance(service: Service, run_id: str, attempt: int = 1) -> dict[str, object]:
    path = code_dir(service.store, run_id, attempt) / "provenance.json"
    data: dict[str, object] = json.loads(path.read_text("utf-8"))
    return data


@needs_git
def test_a_run_in_a_git_repository_records_its_commit_branch_dirty_state_and_diff(
    service: Service, tmp_path: Path
) -> None:
    script = project(tmp_path / "repo")
    git(script.parent, "init", "-q")
    git(script.parent, "add", "train.py", "sibling_value.py")
    git(script.parent, "commit", "-q", "-m", "first")
    head = git(script.parent, "rev-parse", "HEAD")
    edit(script, "VERSION = 1", "VERSION = 7")
    (script.parent / "notes.txt").write_text("untracked\n", encoding="utf-8")

    record = run_to_end(service, script)

    assert record["status"] == "completed"
    kept = provenance(service, str(record["run_id"]))
    assert kept["git"] == {
        "commit": head,
        "branch": "main",
        "dirty": True,
        "untracked": 1,
        "untracked_names": ["notes.txt"],
        "diff_bytes": kept["git"]["diff_bytes"],  # type: ignore[index]
        "diff_cut": False,
    }
    folder = code_dir(service.store, str(record["run_id"]), 1)
    diff = (folder / "git.diff").read_text("utf-8")
    assert "-VERSION = 1" in diff and "+VERSION = 7" in diff
    code = record["attempts"][0]["code"]  # type: ignore[index]
    assert code == {"sha": hashlib.sha256(script.read_bytes()).hexdigest(), "commit": head, "dirty": True}
    # The store's modes: folders 0700, files 0600, the copies included.
    for path in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path
    assert (folder / "files" / "train.py").read_bytes() == script.read_bytes()


def test_a_50_mb_file_named_for_snapshotting_is_hashed_not_copied(service: Service, tmp_path: Path) -> None:
    script = project(tmp_path / "big")
    data = script.parent / "data"
    data.mkdir()
    with (data / "weights.bin").open("wb") as handle:
        handle.truncate(50 * 1024 * 1024)  # sparse: made at once, read as zeros
    (script.parent / "conf.yaml").write_text("lr: 0.1\n", encoding="utf-8")

    record = run_to_end(service, script, snapshot=["data/*.bin", "*.yaml", "nothing/*.txt"])

    kept = provenance(service, str(record["run_id"]))
    files = {f["path"]: f for f in kept["files"]}  # type: ignore[attr-defined]
    big = files["data/weights.bin"]
    assert big["copied"] is False and big["bytes"] == 50 * 1024 * 1024
    assert big["sha256"] == hashlib.sha256(bytes(50 * 1024 * 1024)).hexdigest()
    assert "snapshot limit" in big["note"]
    assert files["conf.yaml"]["copied"] is True
    folder = code_dir(service.store, str(record["run_id"]), 1) / "files"
    assert (folder / "conf.yaml").read_text("utf-8") == "lr: 0.1\n"
    assert not (folder / "data" / "weights.bin").exists()
    assert "'nothing/*.txt' matched no file" in kept["notes"]  # type: ignore[operator]


def test_a_snapshot_glob_that_leaves_the_working_directory_is_refused_and_a_symlink_out_is_left_out(
    env: dict[str, str], service: Service, tmp_path: Path
) -> None:
    script = project(tmp_path / "globs")
    refused = cli(env, "run", str(script), "--snapshot", "../*.py", cwd=script.parent)
    assert refused.returncode == 2
    assert "without '..'" in refused.stderr and "Traceback" not in refused.stderr
    (tmp_path / "secret.txt").write_text("outside\n", encoding="utf-8")
    (script.parent / "link.txt").symlink_to(tmp_path / "secret.txt")

    record = run_to_end(service, script, snapshot=["*.txt"])

    kept = provenance(service, str(record["run_id"]))
    assert kept["files"] == []
    assert "link.txt: left out, it leads outside the working directory" in kept["notes"]  # type: ignore[operator]


def test_no_git_on_path_leaves_the_git_state_absent_with_its_reason_and_the_run_starts(
    env: dict[str, str], tmp_path: Path
) -> None:
    empty = tmp_path / "no-git-here"
    empty.mkdir()
    service = Service(Path(env["BACKPROP_HOME"]), env={**env, "PATH": str(empty)}, cwd=tmp_path)
    script = project(tmp_path / "plain")

    record = run_to_end(service, script)

    assert record["status"] == "completed"
    git_state = provenance(service, str(record["run_id"]))["git"]
    assert git_state["error"] == "git was not found on PATH"  # type: ignore[index]
    assert git_state["commit"] is None  # type: ignore[index]


def test_a_hanging_git_is_cut_off_killed_with_its_children_and_the_run_starts(
    env: dict[str, str], tmp_path: Path
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(FIXTURES / "hangs_as_git.sh", bin_dir / "git")
    pids = tmp_path / "git-pids"
    path = f"{bin_dir}{os.pathsep}{env['PATH']}"
    service = Service(
        Path(env["BACKPROP_HOME"]), env={**env, "PATH": path, "FAKE_GIT_PIDS": str(pids)}, cwd=tmp_path
    )
    script = project(tmp_path / "hung")

    record = run_to_end(service, script)

    assert record["status"] == "completed"
    git_state = provenance(service, str(record["run_id"]))["git"]
    assert "timed out" in git_state["error"]  # type: ignore[index]
    hung = [int(pid) for pid in pids.read_text("utf-8").split()]
    assert hung

    def gone() -> bool:
        return not any(
            psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in hung
        )

    wait_until(gone, what="the hanging git and its child to be killed")


def test_git_state_kills_a_hanging_git_with_its_children_and_says_it_timed_out(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(FIXTURES / "hangs_as_git.sh", bin_dir / "git")
    pids = tmp_path / "git-pids"

    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    state, diff = git_state(tmp_path, {**os.environ, "PATH": path, "FAKE_GIT_PIDS": str(pids)})

    assert state is not None and diff == b""
    assert state["error"].startswith("git status timed out after")
    hung = [int(pid) for pid in pids.read_text("utf-8").split()]
    assert len(hung) == 2

    def gone() -> bool:
        return not any(
            psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in hung
        )

    wait_until(gone, timeout=10, what="the hanging git's shell and its child to be killed")


def test_the_environment_is_recorded_without_any_environment_variable_value(
    env: dict[str, str], tmp_path: Path
) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    service = Service(Path(env["BACKPROP_HOME"]), env={**env, "MY_API_TOKEN": secret}, cwd=tmp_path)
    script = project(tmp_path / "envs")
    script.write_text("import json, numpy\n" + script.read_text("utf-8"), encoding="utf-8")
    (script.parent / "numpy.py").write_text("", encoding="utf-8")  # the script's own, not installed

    record = run_to_end(service, script)

    kept = provenance(service, str(record["run_id"]))
    assert kept["env"]["python"] == sys.executable  # type: ignore[index]
    assert kept["env"]["python_version"] == platform.python_version()  # type: ignore[index]
    assert kept["env"]["backprop"] == __version__  # type: ignore[index]
    for path in Path(env["BACKPROP_HOME"]).rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_the_script_starts_before_its_interpreter_is_asked_for_its_versions(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Asking the script's interpreter for its versions costs a process start, which the script's
    own start must not wait for. This interpreter answers that question only once the script has
    started (it waits for the file the script writes first, longer than the probe's bound), so a
    supervisor that asked before starting the script would get no answer."""
    marker = tmp_path / "script-started"
    late = tmp_path / "python-that-answers-late"
    late.write_text(
        "#!/bin/sh\n"
        'case "$2" in *metadata*)\n'
        f'  i=0; while [ ! -e "{marker}" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done ;;\n'
        "esac\n"
        f'exec "{sys.executable}" "$@"\n',
        encoding="utf-8",
    )
    late.chmod(0o755)
    script = tmp_path / "writes_a_marker.py"
    script.write_text("import pathlib, sys\npathlib.Path(sys.argv[1]).write_text('x')\n", encoding="utf-8")
    service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=tmp_path)
    request = RunRequest(
        str(script), [str(marker)], run_id=unique("late"), cwd=str(tmp_path), python=str(late)
    )

    record = wait_for_end(service, service.start(request)["run_id"])

    assert record["status"] == "completed"
    kept = provenance(service, record["run_id"])["env"]
    assert kept["python_version"] == platform.python_version() and "error" not in kept, kept  # type: ignore[index,operator]


def test_editing_the_script_between_two_runs_shows_in_show_and_diff(
    env: dict[str, str], tmp_path: Path
) -> None:
    script = project(tmp_path / "edits")
    first, second = unique("first"), unique("second")
    assert cli(env, "run", str(script), "--run-id", first, cwd=script.parent).returncode == 0
    edit(script, "VERSION = 1", "VERSION = 2")
    done = cli(env, "run", str(script), "--run-id", second, "-m", "5", "--", "--flag", cwd=script.parent)
    assert done.returncode == 0, done.stderr

    differ = cli(env, "diff", first, second)
    assert differ.returncode == 1, differ.stderr
    assert "-VERSION = 1" in differ.stdout and "+VERSION = 2" in differ.stdout
    assert "changed: train.py" in differ.stdout
    assert "+--flag" in differ.stdout
    assert "option max_run_minutes: 10.0 -> 5.0" in differ.stdout
    third = unique("third")
    assert cli(env, "run", str(script), "--run-id", third, cwd=script.parent).returncode == 0
    only_code = cli(env, "diff", first, third)
    assert only_code.returncode == 1 and "changed: train.py" in only_code.stdout
    assert "option" not in only_code.stdout and "args" not in only_code.stdout
    same = cli(env, "diff", first, f"{first}:1")
    assert same.returncode == 0 and "ran the same code" in same.stdout
    answer = json.loads(cli(env, "diff", first, second, "--json").stdout)
    assert answer["same"] is False and answer["code_a"]["sha"] != answer["code_b"]["sha"]

    shown = cli(env, "show", second)
    assert shown.returncode == 0
    assert "attempt 1 code" in shown.stdout and "train.py  sha256" in shown.stdout
    assert f"backprop {__version__}" in shown.stdout
    assert cli_json(env, "show", second)["code"][0]["args"] == ["--flag"]
    bad = cli(env, "diff", first, f"{second}:3")
    assert bad.returncode == 2 and "no attempt 3" in bad.stderr


def test_resume_after_an_edit_says_the_script_changed(env: dict[str, str], tmp_path: Path) -> None:
    script = project(tmp_path / "resumed")
    run_id = unique("resumed")
    assert cli(env, "run", str(script), "--run-id", run_id, cwd=script.parent).returncode == 0
    same = cli(env, "resume", run_id, "--from-scratch", "--json")
    assert same.returncode == 0
    edit(script, "VERSION = 1", "VERSION = 3")

    resumed = cli(env, "resume", run_id, "--from-scratch")

    assert resumed.returncode == 0, resumed.stderr
    assert f"{script} changed since attempt 2; this attempt runs the new code" in resumed.stdout
    record = cli_json(env, "status", run_id)
    assert [a.get("code_changed") for a in record["attempts"]] == [None, False, True]
    assert record["attempts"][2]["code"]["sha"] == hashlib.sha256(script.read_bytes()).hexdigest()


def test_rerun_runs_the_stored_copy_of_an_edited_script_with_its_siblings_still_importable(
    env: dict[str, str], tmp_path: Path
) -> None:
    script = project(tmp_path / "rerun")
    first, again, unchanged = unique("first"), unique("again"), unique("unchanged")
    assert cli(env, "run", str(script), "--run-id", first, cwd=script.parent).returncode == 0
    edit(script, "VERSION = 1", "VERSION = 2")
    (script.parent / "sibling_value.py").write_text("VALUE = 'b'\n", encoding="utf-8")

    rerun = cli(env, "rerun", first, "--run-id", again, "-n", "again")

    assert rerun.returncode == 0, rerun.stderr
    assert f"rerun of {first}:1, from its stored copy" in rerun.stdout
    log = (Path(env["BACKPROP_HOME"]) / "runs" / again / "logs" / "attempt-1.log").read_text("utf-8")
    assert "version 1, sibling b" in log  # the old script; its sibling (not snapshotted) as it is now
    record = cli_json(env, "status", again)
    assert record["rerun_of"] == {"run_id": first, "attempt": 1, "script": str(script)}
    assert record["script"] != str(script) and record["name"] == "again"
    # A script unchanged since runs from where it is.
    second = cli(env, "rerun", again, "--run-id", unchanged)
    assert second.returncode == 0, second.stderr
    again_record = cli_json(env, "status", unchanged)
    assert again_record["script"] == record["script"] and again_record["status"] == "completed"
    assert again_record["rerun_of"] == {"run_id": again, "attempt": 1, "script": str(script)}
    assert again_record["name"] == "again"  # a rerun goes by its original's name unless given one


@pytest.mark.anyio
async def test_compare_runs_says_when_runs_ran_different_code_and_resume_run_says_the_script_changed(
    service: Service, tmp_path: Path
) -> None:
    from mcp import Client

    from backprop_mcp.mcp_server.roots import Roots
    from backprop_mcp.mcp_server.tools import build_server

    script = project(tmp_path / "agent")
    first = run_to_end(service, script)["run_id"]
    same = run_to_end(service, script)["run_id"]
    edit(script, "VERSION = 1", "VERSION = 2")
    second = run_to_end(service, script)["run_id"]
    server = build_server(
        service=service, roots=Roots((script.parent,), "option"), cwd=script.parent, poll_seconds=0.05
    )
    with anyio.fail_after(120):
        async with Client(server, mode="legacy") as client:
            differ = (await client.call_tool("compare_runs", {"run_ids": [first, second]})).structured_content
            alike = (await client.call_tool("compare_runs", {"run_ids": [first, same]})).structured_content
            edit(script, "VERSION = 2", "VERSION = 3")
            resumed = await client.call_tool(
                "resume_run", {"run_id": second, "from_scratch": True, "options": {"use_gpu": False}}
            )
    assert differ is not None and alike is not None
    assert differ["code_differs"] is True and alike["code_differs"] is False
    shas = {row["run_id"]: row["code"]["sha"] for row in differ["runs"]}
    assert shas[first] != shas[second] and len(shas[first]) == 8
    summary = resumed.structured_content
    assert summary is not None and not resumed.is_error
    assert summary["code"]["changed"] is True
    assert summary["next_step"].startswith("Its script changed since the last attempt")
