"""What `tools/list` shows of a tool, kept lean because every conversation pays for it: a short,
explicit description; an input schema derived from the function's typed arguments, then stripped
of what pydantic adds for its own sake (titles, `anyOf` with null for an optional argument,
`"default": null`, `$defs`); and an output schema written by hand that names the top-level fields
of the answer, never a whole record repeated in each tool."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mcp.server.mcpserver.tools import Tool
from mcp_types import ToolAnnotations

# The run summary (mcp_server.summary), in every answer about one run.
SUMMARY_TEXT = (
    "A run summary: run_id, name, status, reason, attempt, step, total, loss, metrics, elapsed_s, "
    "left_s (of its time box), eta_s, args, checkpoint (latest), checkpoints (count), queue_position, "
    "sweep, next_step; on start and resume also max_run_minutes, config_files."
)
SUMMARY = {"run_id": "string", "status": "string"}
SUMMARY_REF = "A run summary (as run_training's)"
ROWS = "run summaries without next_step"


def output(description: str, fields: Mapping[str, str] | None = None) -> dict[str, Any]:
    """An output schema: an object whose `fields` (name: JSON type) are always there, and whose
    other top-level fields the description names (typing each would cost five times the bytes
    every conversation pays for; nulls never appear)."""
    schema: dict[str, Any] = {"type": "object", "description": description}
    if fields:
        schema["properties"] = {name: {"type": kind} for name, kind in fields.items()}
        schema["required"] = list(fields)
    return schema


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
# conversation would pay for them. The numeric bounds of top-level arguments stay.
DROPPED = frozenset({"$defs", "maxLength", "maxItems", "minLength", "minItems", "pattern"})
# ...and, inside an object argument (`options`: rare settings such as min_free_ram_gb 0-65536),
# the numeric bounds too; they are validated all the same, each with a one-line error naming the
# option and its range.
NESTED_DROPPED = DROPPED | {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}


def lean(schema: dict[str, Any], plain: tuple[str, ...] = ()) -> dict[str, Any]:
    """An input schema without pydantic's extras: `$ref`s inlined, titles and null defaults gone,
    and an optional argument shown as its type (null is still accepted: it means "not given").
    The arguments named in `plain` are published as a described object only (their validation is
    unchanged): another tool's schema shows their fields once."""
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
                or (key, value) == ("default", None)
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
        leaned["properties"][name] = {"type": "object", "description": described.get("description", "")}
    return leaned
