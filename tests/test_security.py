"""Security (issue 5, item 6): scripts outside the allowed roots are refused however they are
reached, run ids cannot leave the store, nothing goes through a shell, secrets in the environment
never reach the store or any output, the store is private, and nothing opens a network socket."""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from backprop_mcp.core.errors import PathNotAllowed, UsageError
from backprop_mcp.runs.confine import check_allowed
from backprop_mcp.runs.requests import RunRequest
from backprop_mcp.runs.service import Service
from tests.fault_helpers import (
    assert_nothing_survives,
    modes,
    start,
    supervisor_pid,
    wait_for_supervisor_exit,
)
from tests.helpers import FIXTURES, cli, cli_json, unique_id, wait_for_end, wait_for_log

SECRET = "sekrit-123"  # noqa: S105 - a fake secret the store must never hold
MCP_WAIT = 60


def _layout(tmp_path: Path) -> tuple[Path, Path]:
    """An allowed root with a script inside, and a script outside it."""
    root, outside = tmp_path / "project", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (root / "train.py").write_text("print('inside')\n", encoding="utf-8")
    (outside / "evil.py").write_text("open('pwned', 'w')\n", encoding="utf-8")
    (root / "link.py").symlink_to(outside / "evil.py")
    (root / "linked-dir").symlink_to(outside)
    return root, outside


def _escapes(root: Path, outside: Path) -> list[str]:
    return [
        str(outside / "evil.py"),  # directly
        str(root / "link.py"),  # a symlinked file
        str(root / "linked-dir" / "evil.py"),  # through a symlinked folder
        str(root / ".." / "elsewhere" / "evil.py"),  # through ".."
        str(root / "sub" / ".." / ".." / "elsewhere" / "evil.py"),
    ]


def test_scripts_outside_the_allowed_roots_are_refused_directly_by_symlink_and_by_dotdot(
    service: Service, tmp_path: Path
) -> None:
    root, outside = _layout(tmp_path)
    (root / "sub").mkdir()
    check_allowed(root / "train.py", [root])
    for script in _escapes(root, outside):
        with pytest.raises(PathNotAllowed, match="outside the allowed roots"):
            check_allowed(Path(script), [root])
        with pytest.raises(PathNotAllowed):
            service.start(RunRequest(script=script), allowed_roots=[root])
    assert not (tmp_path / "pwned").exists() and not (root / "pwned").exists()
    assert service.list_runs()["runs"] == []


def test_the_cli_refuses_scripts_outside_the_configured_roots(env: dict[str, str], tmp_path: Path) -> None:
    root, outside = _layout(tmp_path)
    (root / "sub").mkdir()
    confined = {**env, "BACKPROP_ALLOWED_ROOTS": str(root)}
    for script in _escapes(root, outside):
        done = cli(confined, "run", script, cwd=root)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert "outside the allowed roots" in done.stderr
    assert not (root / "pwned").exists()


@pytest.mark.parametrize(
    "run_id",
    [
        "../x",
        "a/b",
        "..",
        ".",
        ".hidden",
        "a/../../b",
        "/etc",
        "a\\b",
        "x..y",
        "a\0b",
        "",
        "-rf",
        "a b",
        "a;b",
        "$(id)",
        "é",
        "x" * 129,
    ],
)
def test_run_ids_that_could_leave_the_store_are_refused(
    env: dict[str, str], service: Service, tmp_path: Path, run_id: str
) -> None:
    with pytest.raises(UsageError, match="invalid run id"):
        service.start(RunRequest(script=str(FIXTURES / "counts_and_exits.py"), run_id=run_id))
    with pytest.raises(UsageError, match="invalid run id"):
        service.get(run_id)
    if "\0" not in run_id and run_id and not run_id.startswith("-"):
        done = cli(env, "status", run_id)
        assert done.returncode == 2 and "invalid run id" in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.rglob("run.json"))


def test_shell_metacharacters_in_names_arguments_and_paths_are_inert(
    env: dict[str, str], tmp_path: Path
) -> None:
    weird = tmp_path / "dir $(touch pwned1); `touch pwned2` & | > x"
    weird.mkdir()
    script = weird / "train $(touch pwned3);'\".py"
    script.write_text((FIXTURES / "counts_and_exits.py").read_text(encoding="utf-8"), encoding="utf-8")
    tricky = [
        "2",
        "$(touch pwned4)",
        "`touch pwned5`",
        "; touch pwned6",
        "| touch pwned7",
        "&& touch pwned8",
        "$HOME",
        "*",
        "'",
        '"',
        "\\",
        "\n",
        ">out",
    ]
    done = cli(
        env,
        "run",
        str(script),
        "-n",
        "name; $(touch pwned9) `x`",
        "--cwd",
        str(weird),
        "--json",
        "--",
        *tricky,
        cwd=tmp_path,
    )
    record = json.loads(done.stdout)
    assert record["status"] == "completed", record
    assert record["args"] == tricky
    log = cli_json(env, "logs", record["run_id"])["lines"]
    assert f"args: {json.dumps(tricky)}" in log
    bad_python = cli(
        env,
        "run",
        str(FIXTURES / "counts_and_exits.py"),
        "--python",
        "sh -c 'touch pwned10'",
        "--json",
        cwd=tmp_path,
    )
    # Refused before anything starts: no such interpreter on PATH, and never a shell.
    assert bad_python.returncode == 2 and "interpreter" in bad_python.stderr
    created = [p.name for p in tmp_path.rglob("pwned*")] + [p.name for p in Path.cwd().glob("pwned*")]
    assert created == [] and not (weird / "out").exists()


def _grep_store(home: Path, needle: str) -> list[str]:
    return [str(p) for p in home.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_a_secret_in_the_starters_environment_never_reaches_the_store_or_the_cli_output(
    env: dict[str, str], tmp_path: Path
) -> None:
    secret_env = {**env, "AWS_SECRET_ACCESS_KEY": SECRET, "HF_TOKEN": SECRET + "-hf"}
    outputs = []
    s1 = unique_id("s1")
    for args in (
        ["run", str(FIXTURES / "counts_and_exits.py"), "--run-id", s1, "--json"],
        ["run", str(FIXTURES / "counts_and_exits.py"), "--dry-run", "--json"],
        ["resume", s1, "--json", "--", "6"],  # new arguments: s1 completed its steps
        ["status", s1, "--json"],
        ["status", "--json"],
        ["list", "--json"],
        ["logs", s1, "--json"],
        ["compare", s1, "--json"],
        ["status", s1],
        ["list"],
        ["logs", s1],
    ):
        done = cli(secret_env, *args, cwd=tmp_path)
        assert done.returncode == 0, (args, done.stderr)
        outputs.append(done.stdout + done.stderr)
    assert not [o for o in outputs if SECRET in o]
    wait_for_supervisor_exit(Service(Path(env["BACKPROP_HOME"]), env=env, cwd=tmp_path), s1)
    assert _grep_store(Path(env["BACKPROP_HOME"]), SECRET) == []


def test_store_files_are_0600_and_folders_0700(env: dict[str, str], service: Service, tmp_path: Path) -> None:
    private = unique_id("private")
    first = cli_json(env, "run", str(FIXTURES / "counts_and_exits.py"), "--run-id", private, cwd=tmp_path)
    assert first["status"] == "completed"
    cli_json(env, "resume", private, "--from-scratch")
    run_id = start(service, "exits_nonzero.py")
    wait_for_end(service, private)
    wait_for_end(service, run_id)
    wait_for_supervisor_exit(service, private, run_id)  # nothing of the runs is at work in the walk
    home = Path(env["BACKPROP_HOME"])
    wrong = {
        path: oct(mode)
        for path, mode in modes(home).items()
        if mode != (0o700 if (home / path).is_dir() else 0o600)
    }
    assert wrong == {}


def test_the_supervisor_opens_no_network_socket_during_a_run(service: Service) -> None:
    run_id = start(service, "waits_forever.py")
    wait_for_log(service, run_id, "ready")
    supervisor = psutil.Process(supervisor_pid(service, run_id))
    for proc in [supervisor, *supervisor.children(recursive=True)]:
        assert proc.net_connections(kind="inet") == []
    service.stop(run_id)
    wait_for_end(service, run_id)
    assert_nothing_survives(run_id)


@asynccontextmanager
async def _mcp(env: dict[str, str], cwd: Path, *roots: Path) -> AsyncIterator[Any]:
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    argv = [a for root in roots for a in ("--root", str(root))]
    params = StdioServerParameters(
        command=str(Path(sys.executable).parent / "backprop-mcp"), args=argv, env=env, cwd=str(cwd)
    )
    async with Client(params, mode="legacy") as client:
        yield client


def _server_process() -> psutil.Process:
    found = [
        p
        for p in psutil.Process().children(recursive=True)
        if any("backprop-mcp" in part for part in p.cmdline())
    ]
    assert len(found) == 1, found
    return found[0]


def test_the_mcp_server_refuses_escapes_hides_secrets_and_opens_no_socket_during_a_run(
    env: dict[str, str], tmp_path: Path
) -> None:
    root, outside = _layout(tmp_path)
    (root / "sub").mkdir()
    (root / "wait.py").write_text(
        (FIXTURES / "waits_forever.py").read_text(encoding="utf-8"), encoding="utf-8"
    )
    secret_env = {**env, "AWS_SECRET_ACCESS_KEY": SECRET}
    m1 = unique_id("m1")

    async def scenario() -> None:
        with anyio.fail_after(MCP_WAIT * 2):
            await session()

    async def session() -> None:
        async with _mcp(secret_env, tmp_path, root) as client:
            texts: list[str] = []
            for script in _escapes(root, outside):
                refused = await client.call_tool("run_training", {"script": script})
                assert refused.is_error
                texts.append(refused.content[0].text)
                assert "outside the allowed roots" in texts[-1]
            started = await client.call_tool(
                "run_training",
                {"script": str(root / "wait.py"), "run_id": m1, "options": {"use_gpu": False}},
            )
            assert not started.is_error, started
            service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=tmp_path)
            wait_for_log(service, m1, "ready")
            server = _server_process()
            supervisor = psutil.Process(supervisor_pid(service, m1))
            for proc in (server, supervisor, *supervisor.children(recursive=True)):
                assert proc.net_connections(kind="inet") == [], proc
            for name, arguments in (
                ("get_status", {"run_id": m1}),
                ("get_status", {}),
                ("list_experiments", {}),
                ("get_logs", {"run_id": m1}),
                ("stop_run", {"run_id": m1}),
                ("wait_for_run", {"run_id": m1, "until": "end"}),
            ):
                result = await client.call_tool(name, arguments)
                assert not result.is_error, (name, result)
                texts.append(
                    json.dumps(result.structured_content)
                    + "".join(getattr(block, "text", "") for block in result.content)
                )
            assert not [t for t in texts if SECRET in t]
        assert _grep_store(Path(env["BACKPROP_HOME"]), SECRET) == []
        assert_nothing_survives(m1)

    anyio.run(scenario)


def test_a_script_cannot_widen_its_own_roots_with_a_config_file_beside_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    root, outside = _layout(tmp_path)
    (outside / "backprop.config.json").write_text(
        json.dumps({"allowedRoots": [str(outside)]}), encoding="utf-8"
    )

    async def scenario() -> None:
        async with _mcp(env, tmp_path, root) as client:
            refused = await client.call_tool(
                "run_training", {"script": str(outside / "evil.py"), "cwd": str(outside)}
            )
            assert refused.is_error and "outside the allowed roots" in refused.content[0].text

    anyio.run(scenario)
    assert not (outside / "pwned").exists()


def test_files_created_by_the_store_are_private_even_under_a_permissive_umask(
    env: dict[str, str], tmp_path: Path
) -> None:
    old = os.umask(0)
    try:
        service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=tmp_path)
        wait_for_end(service, start(service, "counts_and_exits.py"))
    finally:
        os.umask(old)
    home = Path(env["BACKPROP_HOME"])
    loose = [p for p, mode in modes(home).items() if mode & (stat.S_IRWXG | stat.S_IRWXO)]
    assert loose == []
