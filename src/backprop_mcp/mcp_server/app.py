"""The MCP server object of backprop-mcp and what its tools share: one compact answer per call (the
same JSON as structured content and as text, without nulls), failures turned into results a model
can act on, the service (created on first use), the server's own run defaults, the allowed roots of
a call, and the resources."""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import anyio
import anyio.to_thread
from mcp.server.mcpserver import Context, ListRoots, MCPServer, Resolve
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.server.mcpserver.tools import Tool
from mcp_types import (
    CallToolResult,
    InputRequiredResult,
    ListRootsResult,
    NotificationParams,
    TextContent,
)
from mcp_types import Tool as MCPTool
from pydantic import ValidationError

from backprop_mcp.core.errors import BackpropError, PathNotAllowed, RunNotFound
from backprop_mcp.mcp_server.arguments import OPTION_NAMES
from backprop_mcp.mcp_server.roots import Roots, client_roots
from backprop_mcp.mcp_server.shapes import render_error, render_invalid_arguments, render_unknown
from backprop_mcp.mcp_server.summary import compact, to_text

if TYPE_CHECKING:
    from backprop_mcp.runs.service import Service

log = logging.getLogger("backprop_mcp.mcp")
P = ParamSpec("P")
T = TypeVar("T")

# wait_for_run looks at its runs this often: a store read is ~1 ms, and agents wait seconds.
WAIT_POLL_SECONDS = 0.5
# The log resource shows this many lines (get_logs can ask for up to 500).
RESOURCE_LOG_LINES = 200


class BackpropServer(MCPServer[Any]):
    """MCPServer whose failed tool calls say what was wrong and what to do, never just
    "Error executing tool": a `BackpropError` becomes its message and hint, and arguments that fail
    the input schema become one line per bad argument.

    Its tools are built on a thread while `initialize` is answered: deriving their schemas from
    the TypedDicts takes pydantic most of a second, and a client should not wait for that to
    learn the server is alive. `tools/list` and `tools/call` wait for the build.
    """

    def __init__(self, build_tools: Callable[[], list[Tool]], **settings: Any) -> None:
        super().__init__(**settings)
        self._tools: dict[str, Tool] = {}
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self._build_tools = build_tools
        self._build_started = False
        # The build starts once `initialize` has been answered: on two cores a building thread
        # holds the GIL while the main thread would be answering it.
        self._lowlevel_server.add_notification_handler(
            "notifications/initialized", NotificationParams, self._on_initialized
        )

    async def _on_initialized(self, ctx: Any, params: NotificationParams) -> None:
        self._start_build()

    def _start_build(self) -> None:
        if self._build_started:
            return
        self._build_started = True
        # Not a daemon: a daemon thread still inside pydantic's C code when the interpreter shuts
        # down (a client that closes stdin right after initialize) aborts the process.
        threading.Thread(target=self._build, args=(self._build_tools,), name="build-tools").start()

    def _build(self, build_tools: Callable[[], list[Tool]]) -> None:
        try:
            self._tools = {tool.name: tool for tool in build_tools()}
        except Exception as exc:  # retried by the first tools/list or tools/call
            self._build_error = exc
        finally:
            self._built.set()

    async def tools(self) -> dict[str, Tool]:
        self._start_build()  # a client of the 2026-07-28 era may never send notifications/initialized
        if not self._built.is_set():
            await anyio.to_thread.run_sync(self._built.wait)
        if self._build_error is not None:
            # CPython 3.11 before 3.11.8 can fail `ast.parse` (used by pydantic to read field
            # docstrings) when two threads parse at once; a second build, alone, succeeds.
            log.warning("building the tools again after: %r", self._build_error)
            self._tools, self._build_error = {t.name: t for t in self._build_tools()}, None
        return self._tools

    async def list_tools(self) -> list[MCPTool]:
        return [
            MCPTool(
                name=tool.name,
                title=tool.title,
                description=tool.description,
                input_schema=tool.parameters,
                output_schema=tool.output_schema,
                annotations=tool.annotations,
                icons=tool.icons,
                _meta=tool.meta,
            )
            for tool in (await self.tools()).values()
        ]

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        """Run a tool and answer once, compactly: the same JSON (no nulls, no indentation) as
        structured content and as text, where the SDK would pretty-print it and keep the nulls."""
        tool = (await self.tools()).get(name)
        if tool is None:
            return _error(f"Unknown tool: {name}. The tools are: {', '.join(self._tools)}.")
        refusal = unknown_arguments(tool, arguments)
        if refusal is not None:
            # Refused, not ignored: a misspelt max_run_minute would otherwise start a 10-minute run.
            return _error(refusal)
        if context is None:
            context = Context(mcp_server=self)
        try:
            result = await tool.run(arguments, context, convert_result=False)
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(cause, BackpropError):
                log.info("tool %s refused: %r", name, cause.message)
                return _error(render_error(cause))
            if isinstance(cause, ValidationError):
                return _error(render_invalid_arguments(name, cause.errors()))
            raise
        if isinstance(result, CallToolResult | InputRequiredResult):
            return result
        answer = compact(result)
        return CallToolResult(
            content=[TextContent(type="text", text=to_text(answer))], structured_content=answer
        )


def unknown_arguments(tool: Tool, arguments: Mapping[str, Any]) -> str | None:
    """The refusal of arguments the tool does not take, or of unknown keys in an object argument
    (`options`); None when every name is known."""
    properties: dict[str, Any] = tool.parameters.get("properties", {})
    nested = OPTION_NAMES if "options" in properties else frozenset()
    unknown = sorted(set(arguments) - set(properties))
    if unknown:
        return render_unknown(tool.name, unknown, properties, dict(arguments), nested)
    given = arguments.get("options")
    if isinstance(given, str):  # clients that send objects as JSON text (the SDK parses them too)
        try:
            given = json.loads(given)
        except ValueError:
            return None  # not an object: the schema's validation says so
    if isinstance(given, dict) and nested and set(given) - set(nested):
        return render_unknown(tool.name, sorted(set(given) - nested), nested, given, what="option")
    return None


def _error(text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], is_error=True)


async def _ask_client_roots(ctx: Context[Any, Any]) -> ListRoots | None:
    """Ask for the client's roots when it declared it has some (roots/list, or input_required)."""
    capabilities = ctx.client_capabilities
    return ListRoots() if capabilities is not None and capabilities.roots is not None else None


ClientRoots = Annotated[ListRootsResult | None, Resolve(_ask_client_roots)]


class App:
    """What the tools share: the service (created on first use), the roots, the wait cadence and
    the server's run defaults."""

    def __init__(
        self,
        make_service: Callable[[], Service],
        roots: Roots,
        cwd: Path,
        poll_seconds: float = WAIT_POLL_SECONDS,
        defaults: Mapping[str, object] | None = None,
    ) -> None:
        self._make_service = make_service
        self._service: Service | None = None
        self.roots = roots
        self.cwd = cwd
        self.poll_seconds = poll_seconds
        self.defaults: dict[str, object] = dict(defaults or {})
        """The server's own run options (`backprop-mcp --max-parallel 3`): below a call's arguments,
        above the config files and variables, for new runs and the machine's verdict."""

    @property
    def service(self) -> Service:
        if self._service is None:
            self._service = self._make_service()
        return self._service

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A blocking service call, off the event loop."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    def roots_for(self, announced: ListRootsResult | None) -> Roots:
        """The client's roots when it announced any local folder, else the server's own."""
        paths = client_roots(str(root.uri) for root in announced.roots) if announced else ()
        return Roots(paths, "client") if paths else self.roots

    async def guarded(self, roots: Roots, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A call that checks the roots: its refusal says where these roots came from."""
        try:
            return await self.call(fn, *args, **kwargs)
        except PathNotAllowed as exc:
            raise PathNotAllowed(exc.message, hint=roots.hint()) from None


def add_resources(server: MCPServer[Any], app: App) -> None:
    """The run record, its log tail and the machine's status as readable resources."""

    async def read(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await app.call(fn, *args, **kwargs)
        except RunNotFound as exc:
            raise ResourceNotFoundError(render_error(exc)) from None
        except BackpropError as exc:
            raise ResourceError(render_error(exc)) from None

    @server.resource(
        "backprop://runs/{run_id}",
        name="run",
        title="A run's record",
        description="The full record of one run, as JSON.",
        mime_type="application/json",
    )
    async def run_record(run_id: str) -> str:
        return json.dumps(await read(app.service.get, run_id), indent=1)

    @server.resource(
        "backprop://runs/{run_id}/log",
        name="run-log",
        title="A run's log",
        description=f"The last {RESOURCE_LOG_LINES} lines of a run's current log.",
        mime_type="text/plain",
    )
    async def run_log(run_id: str) -> str:
        tail = await read(app.service.logs, run_id, tail=RESOURCE_LOG_LINES)
        return "\n".join(tail["lines"]) + ("\n" if tail["lines"] else "")

    @server.resource(
        "backprop://system",
        name="system",
        title="The machine",
        description="CPU, RAM, GPUs, live and queued runs, and the verdict for a new run, as JSON.",
        mime_type="application/json",
    )
    async def system() -> str:
        return json.dumps(await read(app.service.system_status), indent=1)
