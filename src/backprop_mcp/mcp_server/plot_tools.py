"""The MCP tool that shows curves: plot_metrics, the metric curves of runs (or of a sweep's
trials) drawn from their history as a PNG and returned as image content, for an agent (or the
person in Claude Desktop) to look at, with one line of JSON text saying what it shows. Drawn on a
worker thread: matplotlib takes a fraction of a second, and the event loop keeps serving."""

from __future__ import annotations

from typing import Annotated, Any

from mcp.server.mcpserver import Image
from mcp.server.mcpserver.tools import Tool
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from backprop_mcp.core.errors import UsageError
from backprop_mcp.mcp_server.app import App
from backprop_mcp.mcp_server.arguments import RUN_ID_PATTERN, OneRun
from backprop_mcp.mcp_server.schema import tool
from backprop_mcp.mcp_server.summary import to_text
from backprop_mcp.mcp_server.sweep_tools import named
from backprop_mcp.runs.plots import MAX_PANELS, MAX_PLOT_RUNS

READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)


def build(app: App) -> list[Tool]:
    """The tool, bound to the app."""

    async def plot_metrics(
        run_ids: Annotated[
            OneRun | list[OneRun] | None,
            Field(description=f"A run id or a list ({MAX_PLOT_RUNS} runs at most)."),
        ] = None,
        metrics: Annotated[
            list[Annotated[str, Field(max_length=200)]] | None,
            Field(
                description=f"Metrics, a panel each, {MAX_PANELS} at most (default: loss, val_*; 4).",
                max_length=MAX_PANELS,
            ),
        ] = None,
        sweep: Annotated[
            str | None,
            Field(
                description=f"A sweep id: its trials (the best {MAX_PLOT_RUNS} when more).",
                max_length=128,
                pattern=RUN_ID_PATTERN,
            ),
        ] = None,
    ) -> CallToolResult:
        from backprop_mcp.sweeps.curves import plot
        from backprop_mcp.sweeps.service import Sweeps

        ids = [run_ids] if isinstance(run_ids, str) else list(run_ids or [])
        if not ids and sweep is None:
            raise UsageError("give run_ids, a sweep, or both")
        if sweep is not None:
            with named(sweep):  # an unknown sweep's refusal names where an agent finds sweep ids
                await app.call(Sweeps(app.service).record, sweep)
        drawn = await app.call(plot, app.service, ids, sweep_id=sweep, metrics=metrics)
        said: dict[str, Any] = {"runs": drawn["runs"], "metrics": drawn["metrics"]}
        if drawn["joins"]:
            said["joins"] = drawn["joins"]
        if drawn["notes"]:
            said["notes"] = drawn["notes"]
        said["size"] = f"{drawn['width']}x{drawn['height']}"
        return CallToolResult(
            content=[
                Image(data=drawn["png"], format="png").to_image_content(),
                TextContent(type="text", text=to_text(said)),
            ]
        )

    return [
        tool(
            plot_metrics,
            title="Plot curves",
            description="A PNG image of the metric curves of runs or a sweep's trials: a panel per "
            "metric, a line per run, dashed where a resume joins.",
            annotations=READ_ONLY,
            returns=None,
        ),
    ]
