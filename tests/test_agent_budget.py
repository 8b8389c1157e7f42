"""What an agent pays, in bytes (issue 11, "Done means"): the installed server over real stdio, driven
as an agent would drive it through a 6-trial sweep (learning rate x width) and the resume of the
best trial, with the MCP Python client. tools/list, the instructions, the sweep's whole tool output
and its largest answer are each held to a budget, so no later change can quietly grow them; and
every tool's schema is held to the shape that keeps tools/list small.

`pytest tests/test_agent_budget.py -s` prints the figures docs/mcp-tools.md shows.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp_types import ListToolsResult, TextContent

from backprop_mcp.mcp_server.roots import Roots
from backprop_mcp.mcp_server.tools import build_server
from tests.helpers import FIXTURES, isolated_env
from tests.test_mcp_stdio import server_command

KB = 1024
# The budgets of issue 11: all tools listed (the sweep tools of issue 12 and plot_metrics of issue
# 13 included; counted by `tools_list_bytes`, as the project's before-stop hook counts them), the
# whole sweep-and-resume's tool output, and any one answer the agent did not ask to be larger.
TOOLS_LIST_BYTES = 12_000
SWEEP_OUTPUT_BYTES = 12 * KB
ANSWER_BYTES = 4 * KB
# The server's instructions are in every conversation too.
INSTRUCTIONS_BYTES = 1536
# Bounds the whole session: 7 short runs on a loaded 2-core machine.
SESSION_SECONDS = 600
# The trials: the fixture's loss is lowest at lr 0.01 and width 64.
LEARNING_RATES = ("0.1", "0.01")
WIDTHS = ("16", "64", "256")
STEPS, MORE_STEPS = 20, 40


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def compact_bytes(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def tools_list_bytes(listed: ListToolsResult) -> int:
    """What tools/list costs, counted as the before-stop hook counts it: the compact JSON of the
    list of tools, each dumped as the wire has it (aliases, no nulls)."""
    return compact_bytes(
        [tool.model_dump(mode="json", by_alias=True, exclude_none=True) for tool in listed.tools]
    )


def _nulls(node: Any) -> bool:
    if isinstance(node, dict):
        return any(value is None or _nulls(value) for value in node.values())
    if isinstance(node, list):
        return any(value is None or _nulls(value) for value in node)
    return False


class Ledger:
    """The tool calls of a session and the bytes of text each answer cost."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.answers: list[tuple[str, int]] = []

    async def call(self, tool: str, progress_callback: Any = None, **arguments: Any) -> Any:
        result = await self.client.call_tool(tool, arguments, progress_callback=progress_callback)
        texts = [block.text for block in result.content if isinstance(block, TextContent)]
        assert not result.is_error, texts
        assert len(texts) == 1 and len(result.content) == 1, result.content
        # The same data once: the text is the structured content, compact (no indentation, no nulls).
        assert json.loads(texts[0]) == result.structured_content, tool
        assert texts[0] == json.dumps(result.structured_content, separators=(",", ":"), ensure_ascii=False)
        assert not _nulls(result.structured_content), texts[0][:300]
        self.answers.append((tool, len(texts[0].encode("utf-8"))))
        return result.structured_content

    @property
    def total(self) -> int:
        return sum(size for _, size in self.answers)


@pytest.mark.anyio
async def test_a_six_trial_sweep_and_the_resume_of_its_best_trial_stay_within_the_byte_budgets(
    tmp_path: Path,
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(FIXTURES / "trains_a_tiny_model_by_lr_and_width.py", project / "sweep.py")
    command, *args = server_command()
    params = StdioServerParameters(
        command=command,
        # A server option the agent never repeats: at most 3 trials at once, the rest queue.
        args=[*args, "--root", str(project), "--max-parallel", "3"],
        env=isolated_env(tmp_path / "home"),
        cwd=tmp_path,
    )
    with anyio.fail_after(SESSION_SECONDS):
        async with Client(params, mode="legacy") as client:
            listed = await client.list_tools()
            tools_bytes = tools_list_bytes(listed)
            instructions = client.instructions or ""
            # Not part of the sweep: the server option is in force.
            machine = await client.call_tool("get_status", {})
            assert (machine.structured_content or {})["limits"]["max_parallel"] == 3
            assert "max_parallel=3" in instructions
            agent = Ledger(client)
            ids = []
            for lr in LEARNING_RATES:
                for width in WIDTHS:
                    started = await agent.call(
                        "run_training",
                        script="sweep.py",
                        args=["--lr", lr, "--width", width, "--steps", str(STEPS)],
                        name=f"lr{lr}-w{width}",
                    )
                    assert started["status"] in ("queued", "running"), started
                    ids.append(started["run_id"])
            while not (
                waited := await agent.call("wait_for_run", run_id=ids, until="all", timeout_seconds=300)
            )["ended"]:
                pass
            assert [row["status"] for row in waited["runs"]] == ["completed"] * 6, waited
            page = await agent.call("list_experiments", sort="val_loss", limit=6)
            best = page["runs"][0]
            assert best["args"] == ["--lr", "0.01", "--width", "64", "--steps", str(STEPS)], page
            resumed = await agent.call(
                "resume_run",
                run_id=best["run_id"],
                args=["--lr", "0.01", "--width", "64", "--steps", str(MORE_STEPS)],
            )
            assert resumed["attempt"] == 2
            while not (
                done := await agent.call(
                    "wait_for_run", run_id=best["run_id"], until="end", timeout_seconds=300
                )
            )["ended"]:
                pass
    final = done["runs"][0]
    assert (final["status"], final["step"], final["total"]) == ("completed", MORE_STEPS, MORE_STEPS), final
    largest = max(agent.answers, key=lambda answer: answer[1])
    print(
        f"\ntools/list {tools_bytes} B for {len(listed.tools)} tools;"
        f" instructions {len(instructions.encode())} B;"
        f" sweep and resume {agent.total} B of tool output in {len(agent.answers)} calls;"
        f" largest answer {largest[1]} B ({largest[0]})"
    )
    assert tools_bytes <= TOOLS_LIST_BYTES
    assert len(instructions.encode("utf-8")) <= INSTRUCTIONS_BYTES
    assert agent.total <= SWEEP_OUTPUT_BYTES, agent.answers
    assert largest[1] <= ANSWER_BYTES, agent.answers


# -- the schemas that keep tools/list small ---------------------------------------------------------

# Fields only a whole run record has: an output schema that names them repeats the record.
RECORD_ONLY_FIELDS = ("supervisor_pid", "python_source", "bad_event_lines", "schema_version", "status_detail")


def _descriptions(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["description"]] if isinstance(node.get("description"), str) else []
        return found + [text for value in node.values() for text in _descriptions(value)]
    if isinstance(node, list):
        return [text for value in node for text in _descriptions(value)]
    return []


@pytest.mark.anyio
async def test_every_schema_is_lean_exact_text_and_no_output_schema_repeats_the_run_record(
    tmp_path: Path,
) -> None:
    server = build_server(home=tmp_path / "home", roots=Roots((tmp_path,), "option"), cwd=tmp_path)
    async with Client(server, mode="legacy") as client:
        tools = (await client.list_tools()).tools
    for tool in tools:
        texts = [
            tool.description or "",
            *_descriptions(tool.input_schema),
            *_descriptions(tool.output_schema),
        ]
        for text in texts:
            # Source-code indentation (a docstring taken as is) is bytes the model reads for nothing.
            assert "\n " not in text and "  " not in text, (tool.name, text)
            assert text == text.strip() and text, (tool.name, text)
        for schema in (tool.input_schema, tool.output_schema or {}):
            dumped = json.dumps(schema)
            assert "$defs" not in dumped and "$ref" not in dumped and '"title"' not in dumped, tool.name
        output = json.dumps(tool.output_schema)
        assert not [field for field in RECORD_ONLY_FIELDS if field in output], (tool.name, output)
        assert compact_bytes(tool.output_schema) <= 400, (tool.name, output)


def test_the_published_options_text_names_every_run_option_and_what_it_takes() -> None:
    # run_training publishes `options` as text, not typed properties (a third of the bytes): an
    # option the text leaves out would be one no agent knows it can set.
    from typing import get_args

    from backprop_mcp.mcp_server.arguments import OPTION_NAMES, OPTIONS_TEXT, FrameworkName, SignalName

    missing = [name for name in sorted(OPTION_NAMES) if name not in OPTIONS_TEXT]
    assert not missing, missing
    for choice in (*get_args(SignalName), *get_args(FrameworkName)):
        assert choice in OPTIONS_TEXT, choice


@pytest.mark.anyio
async def test_tools_list_fits_its_budget_as_the_hook_counts_it_and_keeps_the_bounds_agents_plan_around(
    tmp_path: Path,
) -> None:
    server = build_server(home=tmp_path / "home", roots=Roots((tmp_path,), "option"), cwd=tmp_path)
    async with Client(server, mode="legacy") as client:
        listed = await client.list_tools()
    sizes = {
        tool.name: compact_bytes(tool.model_dump(mode="json", by_alias=True, exclude_none=True))
        for tool in listed.tools
    }
    total = tools_list_bytes(listed)
    print(f"\ntools/list {total} B for {len(sizes)} tools: {sizes}")
    assert total <= TOOLS_LIST_BYTES, sizes
    arguments = {tool.name: tool.input_schema["properties"] for tool in listed.tools}
    # The bounds an agent plans a call around are published...
    assert arguments["wait_for_run"]["timeout_seconds"]["maximum"] == 300
    assert arguments["get_sweep"]["wait_seconds"] == {
        "default": 0,
        "description": "Wait for its end.",
        "maximum": 300,
        "type": "integer",
    }
    assert arguments["list_experiments"]["limit"]["maximum"] == 100
    assert arguments["get_logs"]["tail"]["maximum"] == 500
    assert arguments["get_metrics"]["points"]["maximum"] == 1000
    # ...the floors of counts, sanity caps and `default: false` are not (the server enforces them).
    assert arguments["get_logs"]["attempt"] == {
        "type": "integer",
        "description": arguments["get_logs"]["attempt"]["description"],
    }
    assert arguments["run_training"]["max_run_minutes"].keys() == {"type", "description"}
    assert arguments["run_training"]["dry_run"] == {
        "description": "Only show the command and the governor's verdict.",
        "type": "boolean",
    }
    # A default that depends on the call says on what: grid only when every param is a list.
    assert (
        arguments["run_sweep"]["method"]["description"]
        == "Default: grid if every param is a list, else random."
    )
    # A run's state is published as a string: the agent passes back one it saw.
    assert arguments["wait_for_run"]["since"]["type"] == "string"
    assert "enum" not in arguments["wait_for_run"]["since"]


# A list argument's cap below this is one an agent meets (runs to compare, panels to draw); 256
# script arguments is a sanity limit nobody plans around.
PLANNED_ITEMS = 100


def _max_items(node: Any) -> list[int]:
    """Every `maxItems` in a JSON schema, however deep (an argument may be an id or a list)."""
    if isinstance(node, dict):
        own = [node["maxItems"]] if "maxItems" in node else []
        return own + [cap for value in node.values() for cap in _max_items(value)]
    if isinstance(node, list):
        return [cap for value in node for cap in _max_items(value)]
    return []


@pytest.mark.anyio
async def test_every_list_cap_an_agent_can_meet_is_named_in_its_description(tmp_path: Path) -> None:
    # tools/list leaves out maxItems (schema.DROPPED, for the bytes); the server still enforces it,
    # so an agent learns the cap from the description or from a refusal. A description that names
    # another number ("4 at most" for the default of a cap of 6) misleads it.
    server = build_server(home=tmp_path / "home", roots=Roots((tmp_path,), "option"), cwd=tmp_path)
    unnamed = {}
    for tool in (await server.tools()).values():
        published = tool.parameters["properties"]
        for name, full in tool.fn_metadata.arg_model.model_json_schema()["properties"].items():
            said = published[name].get("description", "")
            for cap in _max_items(full):
                if cap < PLANNED_ITEMS and not re.search(rf"\b{cap}\b", said):
                    unnamed[f"{tool.name}.{name}"] = (cap, said)
    assert not unnamed, unnamed


# get_status(detail=true): the record is the agent's ask; the notes beside it stay within this.
DETAIL_NOTES_BYTES = 4000


@pytest.mark.anyio
async def test_get_status_detail_shows_the_newest_notes_within_their_budget_and_counts_the_rest(
    tmp_path: Path,
) -> None:
    from backprop_mcp.runs.requests import RunRequest
    from backprop_mcp.runs.service import Service
    from tests.helpers import unique_id, wait_until

    home = tmp_path / "home"
    service = Service(home, env=isolated_env(home), cwd=tmp_path)
    request = RunRequest(script=str(FIXTURES / "counts_and_exits.py"), run_id=unique_id("noted"))
    run_id = service.start(request)["run_id"]
    for i in range(20):  # 20 notes of the largest size: 40 KB of notes in all
        service.annotate(run_id, note=f"{i:02d} " + "x" * 1997)
    wait_until(lambda: service.get(run_id)["status"] == "completed", what="the run to end")
    server = build_server(service=service, roots=Roots((tmp_path,), "option"), cwd=tmp_path)
    with anyio.fail_after(60):
        async with Client(server, mode="legacy") as client:
            result = await client.call_tool("get_status", {"run_id": run_id, "detail": True})
    answer = result.structured_content
    assert answer is not None and not result.is_error
    notes = answer["notes"]
    assert len(json.dumps(notes, separators=(",", ":")).encode("utf-8")) <= DETAIL_NOTES_BYTES
    # Each note costs about 2,050 B: only the newest fits, and the 19 older ones are counted.
    assert [n["text"][:2] for n in notes] == ["19"] and answer["notes_left_out"] == 19
