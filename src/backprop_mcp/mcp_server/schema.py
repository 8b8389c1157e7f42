"""What `tools/list` shows of a tool, kept lean because every conversation pays for it: a short,
explicit description; an input schema derived from the function's typed arguments, then stripped
of what pydantic adds for its own sake (titles, `anyOf` with null for an optional argument,
`"default": null`, `$defs`) and of what says nothing (see DROPPED); and an output schema written by
hand whose description names the top-level fields of the answer, never a whole record repeated in
each tool."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver.tools import Tool
from mcp_types import ToolAnnotations

# The run summary (mcp_server.summary), in every answer about one run.
SUMMARY_TEXT = (
    "A run summary: run_id, name, status, reason, attempt, step, total, loss, metrics, elapsed_s, "
    "left_s (of its time box), eta_s, args, checkpoint, checkpoints, queue_position, sweep, tags, next_step; "
    "also max_run_minutes, config_files."
)
SUMMARY_REF = "A run summary (as run_training's)"
ROWS = "runs (summaries)"


def output(description: str) -> dict[str, Any]:
    """An output schema: an object whose top-level fields the description names. Not typed one by
    one: that would cost five times the bytes every conversation pays for, and say little more
    than the names (`runs` is a list, `ended` a boolean; nulls never appear)."""
    return {"type": "object", "description": description}


def tool(
    fn: Callable[..., Any],
    *,
    title: str,
    description: str,
    annotations: ToolAnnotations,
    returns: dict[str, Any] | None,
    plain: tuple[str, ...] = (),
) -> Tool:
    """A tool from a function: `description` (not the docstring) is what the model reads, and
    `returns` its output schema. The function returns a plain JSON-ready answer that the server
    compacts (see `app.BackpropServer.call_tool`), or, with `returns=None`, its own result (an
    image: a tool with an output schema must answer with structured content)."""
    built = Tool.from_function(
        fn, title=title, description=description, annotations=annotations, structured_output=False
    )
    built.parameters = lean(built.parameters, plain)
    built.fn_metadata.output_schema = returns  # read by Tool.output_schema, which tools/list shows
    return built


# Keys left out of published input schemas: definitions (inlined instead), the length bounds of
# strings and lists (sanity limits such as 4096 characters for a path) and the run id's pattern:
# the server still enforces them with a clear error, but no agent plans around them, and every
# conversation would pay for them. Of the numeric bounds of top-level arguments, those an agent
# plans around stay (a wait's 300 s, a page's 100 runs, a tail's 500 lines); the floor of a count
# or a duration (0 or 1: nobody asks for -3 lines) and sanity caps (SANITY_CAP or more: attempt
# 100,000, a 7-day time box) go, enforced all the same. So does `"default": false`: a flag is off
# unless set.
DROPPED = frozenset({"$defs", "maxLength", "maxItems", "minLength", "minItems", "pattern"})
SANITY_CAP = 10_000
# ...and, inside an object argument (`options`: rare settings such as min_free_ram_gb 0-65536),
# the numeric bounds too; they are validated all the same, each with a one-line error naming the
# option and its range.
NESTED_DROPPED = DROPPED | {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}


def lean(schema: dict[str, Any], plain: tuple[str, ...] = ()) -> dict[str, Any]:
    """An input schema without pydantic's extras: `$ref`s inlined, titles and null defaults gone,
    and an optional argument shown as its type (null is still accepted: it means "not given").
    The arguments named in `plain` are published as their type and description only (their
    validation is unchanged): an object whose fields another tool's schema or the description
    shows, or a string whose values the agent has seen (a run's state)."""
    definitions = schema.get("$defs", {})

    def walk(node: Any, depth: int) -> Any:
        if isinstance(node, list):
            return [walk(item, depth) for item in node]
        if not isinstance(node, dict):
            return node
        options = node.get("anyOf")
        if isinstance(options, list):
            kept = [option for option in options if option != {"type": "null"}]
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            node = {**kept[0], **rest} if len(kept) == 1 else {**rest, "anyOf": kept}
        if "$ref" in node:
            named = definitions[node["$ref"].rsplit("/", 1)[-1]]
            node = {**named, **{k: v for k, v in node.items() if k != "$ref"}}
        dropped = NESTED_DROPPED if depth > 1 else DROPPED
        out = {}
        for key, value in node.items():
            if (
                key in dropped
                or (key == "title" and isinstance(value, str))
                or (key == "default" and (value is None or value is False))
                or (key in ("minimum", "exclusiveMinimum") and value in (0, 1) and value is not True)
                or (key == "maximum" and isinstance(value, int | float) and value >= SANITY_CAP)
            ):
                continue
            if key == "properties":  # names to schemas: a property may be called "title" or "default"
                out[key] = {name: walk(item, depth + 1) for name, item in value.items()}
            else:
                out[key] = walk(value, depth)
        return out

    leaned: dict[str, Any] = walk(schema, 0)
    for name in plain:
        described = leaned["properties"][name]
        leaned["properties"][name] = {
            "type": described.get("type", "object"),
            "description": described.get("description", ""),
        }
    return leaned
