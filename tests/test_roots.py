"""The allowed roots hold for every path an MCP call can name (issue 9, item 1): the script, the
interpreter, the working directory, the checkpoint to start from, the checkpoints a run reported
and read back on resume, and any path argument a tool gains later. Nothing outside the roots is
executed, read, or even tested for existence: a refusal reads the same whether the path exists.

Over the MCP protocol: an in-memory client for the cases, the stdio server for the reported one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import pytest
from mcp import Client
from mcp_types import CallToolResult, TextContent

from backprop_mcp.mcp_server.arguments import PATH_ARGUMENTS
from backprop_mcp.mcp_server.roots import Roots
from backprop_mcp.mcp_server.schema import lean
from backprop_mcp.mcp_server.tools import build_server
from backprop_mcp.runs import confine
from backprop_mcp.runs.requests import RunRequest
from backprop_mcp.runs.service import Service
from tests.helpers import FIXTURES, isolated_env, wait_for_end

# Bounds every MCP session: runs start slowly on a loaded 2-core machine.
SESSION_SECONDS = 120
# Limits that admit runs on a small, busy test machine, as the run options of a tool call.
LIMITS = {"use_gpu": False, "min_free_ram_gb": 0, "max_cpu_percent": 100}
GENEROUS = {"options": LIMITS}

# Every string argument of every tool that is NOT a path, and why: a new string argument must be
# classified here or in mcp_server.arguments.PATH_ARGUMENTS, where the service checks it against the roots.
NOT_PATHS = {
    "args": "passed to the script unchanged; the server never opens them",
    "name": "a label (and a glob over labels in list_experiments)",
    "run_id": "checked against the run-id pattern: letters, digits, '._-'",
    "run_ids": "run ids, as above",
    "framework": "one of a fixed set",
    "gpu_memory_limit": "a percentage or a size",
    "stop_signal": "one of a fixed set of signal names",
    "gpus": "GPU indices or UUIDs",
    "status": "one of the run states",
    "cursor": "a page offset",
    "metric": "a metric name looked up in the run's record",
    "until": "one of a fixed set",
    "since": "one of the run states",
    "sort": "a metric name to order runs by",
    "metrics": "metric names looked up in the runs' history",
    "sweep_id": "checked against the sweep-id pattern: letters, digits, '._-'",
    "sweep": "a sweep id: matched against index rows, or read (plot_metrics) after the sweep-id check",
    "params": "values and distribution strings a sweep passes to the script as its arguments",
    "snapshot": "globs relative to the run's cwd: absolute ones and '..' refused (parsers.parse_globs), "
    "matches that resolve outside the cwd left out (runs.provenance)",
    "note": "text appended to the run's notebook; never opened",
    "tags": "tags: letters, digits and _ . : = + - (core.notebook.TAG_RE)",
    "tag": "a tag, as above, matched against the tag index",
}
# The fields of RunRequest that are not paths.
NOT_PATH_FIELDS = {"args", "name", "run_id", "options", "source", "file_defaults", "sweep", "tags", "note"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Layout(NamedTuple):
    root: Path
    outside: Path
    service: Service


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    shutil.copy(FIXTURES / "counts_and_exits.py", root / "train.py")
    env = isolated_env(tmp_path / "home")
    return Layout(root, outside, Service(Path(env["BACKPROP_HOME"]), env=env, cwd=root))


@asynccontextmanager
async def connect(layout: Layout) -> AsyncIterator[Client]:
    server = build_server(
        service=layout.service, roots=Roots((layout.root,), "option"), cwd=layout.root, poll_seconds=0.05
    )
    with anyio.fail_after(SESSION_SECONDS):
        async with Client(server, mode="legacy") as client:
            yield client


def text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


async def call(client: Client, tool: str, **arguments: Any) -> Any:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, text_of(result)
    return result.structured_content


async def refused(client: Client, tool: str, **arguments: Any) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result.structured_content
    text = text_of(result)
    assert text.startswith("PathNotAllowed:"), text
    return text


async def run_to_end(client: Client, **arguments: Any) -> dict[str, Any]:
    record = await call(client, "run_training", **GENEROUS, **arguments)
    while True:
        waited = await call(client, "wait_for_run", run_id=record["run_id"], until="end", timeout_seconds=60)
        if waited["ended"]:
            return dict((await call(client, "get_status", run_id=record["run_id"], detail=True))["record"])


# -- every path argument is known to the guard -----------------------------------------------------


def _takes_strings(schema: dict[str, Any]) -> bool:
    """True when a property accepts free strings (enums of fixed words are not paths)."""
    if "enum" in schema or "const" in schema:
        return False
    if schema.get("type") == "string":
        return True
    if schema.get("type") == "array":
        return _takes_strings(schema.get("items", {}))
    if isinstance(schema.get("additionalProperties"), dict):  # a map: its values may be strings
        return _takes_strings(schema["additionalProperties"])
    return any(_takes_strings(option) for option in schema.get("anyOf", []))


def _string_arguments(properties: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted name, leaf name) of every argument that takes free strings, inside object arguments
    (`options`) too."""
    found = []
    for name, schema in properties.items():
        if _takes_strings(schema):
            found.append((prefix + name, name))
        found += _string_arguments(schema.get("properties", {}), f"{prefix}{name}.")
    return found


@pytest.mark.anyio
async def test_every_string_argument_of_every_tool_is_a_guarded_path_or_known_not_to_be_one(
    layout: Layout,
) -> None:
    server = build_server(service=layout.service, roots=Roots((layout.root,), "option"), cwd=layout.root)
    # What each tool validates, nested objects whole: a published schema may show an object argument
    # as "as in run_training", but its strings are still classified here.
    tools = (await server.tools()).values()
    unknown = []
    for tool in tools:
        guarded = PATH_ARGUMENTS.get(tool.name, {})
        properties = lean(tool.fn_metadata.arg_model.model_json_schema(by_alias=True))["properties"]
        for dotted, name in _string_arguments(properties):
            if name not in guarded and name not in NOT_PATHS:
                unknown.append(f"{tool.name}.{dotted}")
        assert set(guarded) <= set(tool.parameters["properties"]), tool.name
        # Each guarded argument becomes a request field the service checks before looking at it.
        assert set(guarded.values()) <= set(confine.REQUEST_PATHS), tool.name
    assert unknown == [], "classify these in mcp_server.arguments.PATH_ARGUMENTS or in NOT_PATHS here"
    assert set(RunRequest._fields) == set(confine.REQUEST_PATHS) | NOT_PATH_FIELDS


# -- each path argument, directly and by every trick ------------------------------------------------


def _target(layout: Layout, argument: str) -> Path:
    """The outside thing each argument would reach: a folder for cwd, a file otherwise."""
    if argument == "cwd":
        return layout.outside / "work"
    return layout.outside / ("evil.py" if argument == "script" else "thing")


def _make(target: Path, argument: str, marker: Path) -> None:
    if argument == "cwd":
        target.mkdir()
        return
    # An interpreter or script that leaves a mark if anything ever runs it.
    target.write_text(f"#!/bin/sh\ntouch {marker}\n", encoding="utf-8")
    target.chmod(0o755)


def _remove(target: Path) -> None:
    if target.is_dir():
        target.rmdir()
    else:
        target.unlink()


TRICKS: dict[str, Callable[[Layout, Path], str]] = {
    "directly": lambda lay, target: str(target),
    "symlink in a root": lambda lay, target: _link(lay.root / "link", target),
    "through a symlinked folder": lambda lay, target: (
        _link(lay.root / "dir-link", target.parent) + "/" + target.name
    ),
    "by ..": lambda lay, target: str(lay.root / ".." / target.relative_to(lay.root.parent)),
    "by .. after a subfolder": lambda lay, target: str(
        lay.root / "sub" / ".." / ".." / target.relative_to(lay.root.parent)
    ),
    "by .. through a symlinked folder": lambda lay, target: (
        _link(lay.root / "in-link", lay.outside / "deep") + "/../" + target.name
    ),
}


def _link(link: Path, to: Path) -> str:
    link.symlink_to(to)
    return str(link)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("argument", "trick"),
    [
        (argument, trick)
        for argument in PATH_ARGUMENTS["run_training"]
        for trick in TRICKS
        # An interpreter that is itself a link in a root is a virtualenv's: allowed as given.
        if (argument, trick) != ("python", "symlink in a root")
    ],
)
async def test_a_path_argument_leading_outside_the_roots_is_refused_alike_whether_it_exists_or_not(
    layout: Layout, argument: str, trick: str
) -> None:
    (layout.root / "sub").mkdir()
    (layout.outside / "deep").mkdir()
    marker = layout.outside / "ran"
    target = _target(layout, argument)
    given = TRICKS[trick](layout, target)
    arguments = {"script": "train.py", **GENEROUS, argument: given}
    if argument == "cwd":
        arguments["script"] = str(layout.root / "train.py")
    texts = []
    async with connect(layout) as client:
        for exists in (True, False):
            if exists:
                _make(target, argument, marker)
            else:
                _remove(target)
            texts.append(await refused(client, "run_training", **arguments))
            texts.append(await refused(client, "run_training", dry_run=True, **arguments))
        page = await call(client, "list_experiments")
    assert texts[0] == texts[2] and texts[1] == texts[3], "the refusal tells whether the path exists"
    assert repr(given) in texts[0] and str(layout.root) in texts[0]
    if not given.startswith(str(layout.outside)) and ".." not in given:
        assert str(layout.outside) not in texts[0], "the refusal tells where a link leads"
    assert page["runs"] == []
    assert not marker.exists()


@pytest.mark.anyio
async def test_the_reported_case_cat_as_the_interpreter_is_refused_and_reads_nothing(layout: Layout) -> None:
    async with connect(layout) as client:
        text = await refused(
            client, "run_training", script="train.py", python="/bin/cat", args=["/etc/shadow"]
        )
        bare = await refused(client, "run_training", script="train.py", python="cat", args=["/etc/shadow"])
        page = await call(client, "list_experiments")
    assert "interpreter (python) '/bin/cat'" in text and "configured" in text
    assert "interpreter (python) 'cat'" in bare
    assert page["runs"] == []


# -- what is allowed -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_virtualenv_inside_a_root_is_accepted_though_its_python_links_out_of_it(
    layout: Layout,
) -> None:
    venv_python = layout.root / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(sys.executable)  # as `python -m venv` makes it: a link out of the root
    outside_venv = layout.outside / "venv" / "bin"
    outside_venv.mkdir(parents=True)
    (outside_venv / "python").symlink_to(sys.executable)
    (layout.root / "venv-link").symlink_to(layout.outside / "venv")
    async with connect(layout) as client:
        absolute = await run_to_end(client, script="train.py", python=str(venv_python))
        relative = await run_to_end(client, script="train.py", python=".venv/bin/python")
        configured = await run_to_end(client, script="train.py", python=sys.executable)
        # A venv whose folder lies outside, reached by a link in the root, is not inside it.
        text = await refused(client, "run_training", script="train.py", python="venv-link/bin/python")
    assert (absolute["status"], absolute["python"]) == ("completed", str(venv_python))
    assert (relative["status"], relative["python"]) == ("completed", str(venv_python))
    assert configured["status"] == "completed"  # backprop's own interpreter is a configured one
    assert "venv-link/bin/python" in text


# -- resume ----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_resume_uses_only_checkpoints_inside_the_roots_or_the_runs_folder_and_tells_nothing_else(
    layout: Layout,
) -> None:
    shutil.copy(FIXTURES / "reports_checkpoints_outside_its_roots.py", layout.root / "ck.py")
    inside = layout.root / "inside.json"
    outside = layout.outside / "outside.json"
    for path in (inside, outside):
        path.write_text("{}", encoding="utf-8")
    async with connect(layout) as client:
        # The newest checkpoint lies outside: the older one inside is used instead.
        mixed = await run_to_end(client, script="ck.py", args=[str(inside), str(outside)])
        await call(client, "resume_run", run_id=mixed["run_id"])
        resumed = (await call(client, "get_status", run_id=mixed["run_id"], detail=True))["record"]
        only_outside = await run_to_end(client, script="ck.py", args=[str(outside)])
        present = await client.call_tool("resume_run", {"run_id": only_outside["run_id"]})
        outside.unlink()
        absent = await client.call_tool("resume_run", {"run_id": only_outside["run_id"]})
        in_store = await run_to_end(client, script="ck.py", args=["STORE"])
        await call(client, "resume_run", run_id=in_store["run_id"])
        from_store = (await call(client, "get_status", run_id=in_store["run_id"], detail=True))["record"]
    assert resumed["resume_from"] == str(inside)
    assert present.is_error and absent.is_error
    assert text_of(present) == text_of(absent), "the refusal tells whether the checkpoint exists"
    assert "outside the allowed roots" in text_of(present) and "not looked at" in text_of(present)
    assert from_store["resume_from"] == str(
        layout.service.store.run_dir(in_store["run_id"]) / "checkpoints" / "store.json"
    )
    final = wait_for_end(layout.service, mixed["run_id"])
    assert final["attempt"] == 2
    log = layout.service.logs(mixed["run_id"], attempt=2)["lines"]
    assert f"resume: {inside}" in log
    assert layout.service.get(only_outside["run_id"])["attempt"] == 1
    wait_for_end(layout.service, in_store["run_id"])


@pytest.mark.anyio
async def test_a_stored_run_whose_cwd_or_interpreter_lies_outside_the_roots_cannot_be_resumed_through_mcp(
    layout: Layout,
) -> None:
    service = layout.service
    python_link = layout.outside / "python"
    python_link.symlink_to(sys.executable)
    # Started outside MCP (the CLI, or an older server that did not check these).
    in_outside_cwd = service.start(
        RunRequest(script=str(layout.root / "train.py"), cwd=str(layout.outside), options=dict(LIMITS))
    )
    with_outside_python = service.start(
        RunRequest(script=str(layout.root / "train.py"), python=str(python_link), options=dict(LIMITS))
    )
    for run in (in_outside_cwd, with_outside_python):
        assert wait_for_end(service, run["run_id"])["status"] == "completed"
    async with connect(layout) as client:
        cwd_text = await refused(client, "resume_run", run_id=in_outside_cwd["run_id"])
        python_text = await refused(
            client, "resume_run", run_id=with_outside_python["run_id"], from_scratch=True
        )
    assert "working directory (cwd)" in cwd_text
    assert "interpreter (python)" in python_text
    for run in (in_outside_cwd, with_outside_python):
        assert service.get(run["run_id"])["attempt"] == 1


# -- the unit under the tools ----------------------------------------------------------------------


def test_the_walk_looks_only_inside_the_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "up").symlink_to("..")
    (root / "loop").symlink_to("loop")
    looked: list[str] = []
    real_lstat = os.lstat

    def spying_lstat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        looked.append(str(path))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", spying_lstat)
    assert confine.confined(root / "sub" / "x.py", [root]) == root / "sub" / "x.py"
    assert confine.confined(root / "sub" / ".." / "x.py", [root]) == root / "x.py"
    assert confine.confined(root / "up" / "root" / "x.py", [root]) == root / "x.py"  # out and back
    assert confine.confined(root / "up" / "elsewhere" / "x.py", [root]) is None  # out by a link to ..
    assert confine.confined(root / "loop", [root]) is None
    assert confine.confined(tmp_path / "elsewhere" / "x", [root]) is None
    assert confine.confined(Path("/etc/shadow"), [root]) is None
    # Resolving the roots themselves looks at them and their parents; nothing else is looked at.
    assert [p for p in looked if not (Path(p).is_relative_to(root) or root.is_relative_to(p))] == []


# -- over stdio, as reported -------------------------------------------------------------------------


def test_over_stdio_the_reported_escapes_are_refused_and_a_missing_path_reads_like_an_existing_one(
    env: dict[str, str], tmp_path: Path
) -> None:
    from mcp.client.stdio import StdioServerParameters

    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(FIXTURES / "counts_and_exits.py", root / "ok.py")
    params = StdioServerParameters(
        command=str(Path(sys.executable).parent / "backprop-mcp"),
        args=["--root", str(root)],
        env=env,
        cwd=str(tmp_path),
    )

    script = str(root / "ok.py")

    async def session() -> list[str]:
        texts = []
        with anyio.fail_after(SESSION_SECONDS):
            async with Client(params, mode="legacy") as client:
                for arguments in (
                    {"python": "/bin/cat", "args": ["/etc/shadow"]},
                    {"cwd": "/etc"},
                    {"resume_from": "/etc/passwd"},
                    {"resume_from": "/etc/no-such-file-here"},
                ):
                    result = await client.call_tool("run_training", {"script": script, **arguments})
                    assert result.is_error
                    texts.append(text_of(result))
                page = await client.call_tool("list_experiments", {})
                assert json.loads(text_of(page))["runs"] == []
        return texts

    cat, etc, passwd, missing = anyio.run(session)
    assert cat.startswith("PathNotAllowed: interpreter (python) '/bin/cat'")
    assert etc.startswith("PathNotAllowed: working directory (cwd) '/etc'")
    assert passwd.replace("/etc/passwd", "PATH") == missing.replace("/etc/no-such-file-here", "PATH")
    assert "root:" not in cat + etc + passwd
