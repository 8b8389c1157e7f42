"""The MCP tools and resources of backprop-mcp: each one service call plus rendering, with typed,
described inputs, structured outputs and annotations an agent can trust."""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, ParamSpec, TypeVar, Union

import anyio
import anyio.to_thread
from mcp.server.mcpserver import Context, ListRoots, MCPServer, Resolve
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.server.mcpserver.tools import Tool
from mcp_types import CallToolResult, InputRequiredResult, ListRootsResult, TextContent, ToolAnnotations
from mcp_types import Tool as MCPTool
from pydantic import Field, TypeAdapter, ValidationError

from backprop_mcp import __version__
from backprop_mcp.config import FIELDS_BY_NAME, FRAMEWORK_CHOICES, STOP_SIGNALS
from backprop_mcp.errors import BackpropError, PathNotAllowed, RunNotFound
from backprop_mcp.mcp_server import Roots, client_roots, locate_script
from backprop_mcp.mcp_shapes import (
    STATUS_LOG_LINES,
    RunStatus,
    RunWait,
    progress_message,
    render_error,
    render_invalid_arguments,
    run_status,
    run_wait,
)
from backprop_mcp.models import (
    ACTIVE_STATES,
    ALL_STATES,
    Comparison,
    DryRun,
    LogTail,
    RunPage,
    RunRecord,
    SystemStatus,
)

if TYPE_CHECKING:
    from backprop_mcp.service import Service

log = logging.getLogger("backprop_mcp.mcp")
P = ParamSpec("P")
T = TypeVar("T")

# wait_for_run looks at the run this often: a store read is ~1 ms, and agents wait seconds.
WAIT_POLL_SECONDS = 0.5
# ...and sends a progress notification at least this often, so clients see the call is alive.
PROGRESS_EVERY_SECONDS = 5.0
MAX_WAIT_SECONDS = 300
MAX_LOG_TAIL = 500
RESOURCE_LOG_LINES = 200

INSTRUCTIONS = """\
backprop runs Python training scripts on this machine safely: each run is admitted by a resource \
governor (RAM, CPU, GPU memory and temperature), time-boxed (10 minutes by default), stopped \
gracefully so the script can checkpoint, and resumable from its last checkpoint.

The pattern:
1. run_training(script=...) starts a run and returns its record at once (status queued or running). \
Use dry_run=true first to see the exact command and whether the governor would admit it now.
2. Follow it with wait_for_run(run_id) (returns when its state changes or it ends, up to \
timeout_seconds) or poll get_status(run_id) (record, log tail, time left, and the next step).
3. A run that timed_out (or was stopped or lost) continues from its latest checkpoint with \
resume_run(run_id); use from_scratch=true when it saved none.
4. list_experiments browses runs newest first; compare_runs ranks runs by a metric; get_logs shows \
output; stop_run ends a run early.

Keep runs short (a few minutes, max_run_minutes) and resume them, rather than starting long ones: \
sweeps of many short runs are the intended use. Scripts must lie inside the allowed roots. Training \
scripts report progress by printing JSON lines such as {"step": 3, "total": 10, "loss": 0.5} and \
{"event": "checkpoint_saved", "path": "ck.pt", "step": 3}; they read BACKPROP_RESUME_FROM to resume.
"""


def _help(name: str) -> str:
    text = FIELDS_BY_NAME[name].help
    return text[0].upper() + text[1:] + "."


RunId = Annotated[str, Field(description="The run's id, as returned by run_training or list_experiments.",
                             min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Args = Annotated[list[Annotated[str, Field(max_length=4096)]] | None, Field(
    description="Extra command-line arguments passed to the script unchanged.", max_length=256)]
Minutes = Annotated[float | None, Field(description=_help("max_run_minutes"), gt=0, le=1440)]
WallMinutes = Annotated[float | None, Field(description=_help("max_wall_minutes"), gt=0, le=4320)]
CheckpointEvery = Annotated[float | None, Field(description=_help("checkpoint_every_minutes"), gt=0, le=1440)]
Grace = Annotated[float | None, Field(description=_help("grace_seconds"), ge=0, le=3600)]
StopSignal = Annotated[Literal[STOP_SIGNALS] | None, Field(description=_help("stop_signal"))]  # type: ignore[valid-type]
Queue = Annotated[bool | None, Field(description=_help("queue"))]
QueueTimeout = Annotated[float | None, Field(description=_help("queue_timeout_minutes"), gt=0, le=10080)]
UseGpu = Annotated[bool | None, Field(description=_help("use_gpu"))]
Gpus = Annotated[list[Annotated[str, Field(max_length=64)]] | None, Field(
    description="GPUs the run may use: indices like \"0\" or UUIDs like \"GPU-8f3a...\" (default all).",
    max_length=64)]
GpuMemory = Annotated[str | None, Field(description=_help("gpu_memory_limit"), max_length=16)]
Status = Annotated[Literal[ALL_STATES] | None, Field(  # type: ignore[valid-type]
    description="Only runs in this state.")]

READ_ONLY = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)


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
        # Not a daemon: a daemon thread still inside pydantic's C code when the interpreter shuts
        # down (a client that closes stdin right after initialize) aborts the process.
        threading.Thread(target=self._build, args=(build_tools,), name="build-tools").start()

    def _build(self, build_tools: Callable[[], list[Tool]]) -> None:
        try:
            self._tools = {tool.name: tool for tool in build_tools()}
        except BaseException as exc:  # reported on the first tools/list or tools/call
            self._build_error = exc
        finally:
            self._built.set()

    async def tools(self) -> dict[str, Tool]:
        if not self._built.is_set():
            await anyio.to_thread.run_sync(self._built.wait)
        if self._build_error is not None:
            raise RuntimeError("the tools could not be built") from self._build_error
        return self._tools

    async def list_tools(self) -> list[MCPTool]:
        return [
            MCPTool(name=tool.name, title=tool.title, description=tool.description, input_schema=tool.parameters,
                    output_schema=tool.output_schema, annotations=tool.annotations, icons=tool.icons,
                    _meta=tool.meta)
            for tool in (await self.tools()).values()
        ]

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        tool = (await self.tools()).get(name)
        if tool is None:
            return _error(f"Unknown tool: {name}. The tools are: {', '.join(self._tools)}.")
        if context is None:
            context = Context(mcp_server=self)
        try:
            result: CallToolResult | InputRequiredResult = await tool.run(arguments, context, convert_result=True)
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(cause, BackpropError):
                log.info("tool %s refused: %r", name, cause.message)
                return _error(render_error(cause))
            if isinstance(cause, ValidationError):
                return _error(render_invalid_arguments(name, cause.errors()))
            raise
        return result


def _error(text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], is_error=True)


async def _ask_client_roots(ctx: Context[Any, Any]) -> ListRoots | None:
    """Ask for the client's roots when it declared it has some (roots/list, or input_required)."""
    capabilities = ctx.client_capabilities
    return ListRoots() if capabilities is not None and capabilities.roots is not None else None


ClientRoots = Annotated[ListRootsResult | None, Resolve(_ask_client_roots)]


class App:
    """What the tools share: the service (created on first use), the roots, the wait cadence."""

    def __init__(self, make_service: Callable[[], Service], roots: Roots, cwd: Path,
                 poll_seconds: float = WAIT_POLL_SECONDS) -> None:
        self._make_service = make_service
        self._service: Service | None = None
        self.roots = roots
        self.cwd = cwd
        self.poll_seconds = poll_seconds

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

    async def status(self, run_id: str) -> RunStatus:
        record = await self.call(self.service.get, run_id)
        tail = await self.call(self.service.logs, run_id, tail=STATUS_LOG_LINES)
        return run_status(record, tail["lines"])

    async def wait(self, run_id: str, timeout: float, until: str,
                   report: Callable[[float, float | None, str | None], Awaitable[None]]) -> RunWait:
        """Poll the run until its state changes (or it ends), or the timeout passes."""
        started = time.monotonic()
        first = await self.call(self.service.get, run_id)
        record, reported, last_step = first, -PROGRESS_EVERY_SECONDS, None
        with anyio.move_on_after(timeout):
            while record["status"] in ACTIVE_STATES:
                elapsed = time.monotonic() - started
                if record["step"] != last_step or elapsed - reported >= PROGRESS_EVERY_SECONDS:
                    await report(round(elapsed, 2), float(timeout), progress_message(record))
                    reported, last_step = elapsed, record["step"]
                await anyio.sleep(self.poll_seconds)
                record = await self.call(self.service.get, run_id)
                moved = (record["status"], record["attempt"]) != (first["status"], first["attempt"])
                if moved and (until == "change" or record["status"] not in ACTIVE_STATES):
                    break
        status = await self.status(run_id)
        changed = (status["run"]["status"], status["run"]["attempt"]) != (first["status"], first["attempt"])
        return run_wait(status, changed=changed, waited=time.monotonic() - started)


def _options(**values: object) -> dict[str, object]:
    return {k: v for k, v in values.items() if v is not None}


def _tool(fn: Callable[..., Any], title: str, annotations: ToolAnnotations,
          outputs: tuple[type, ...] = ()) -> Tool:
    """A tool from a function; `outputs` publishes a union of shapes as the structured output
    itself, where the SDK would wrap a union in {"result": ...}."""
    tool = Tool.from_function(fn, title=title, annotations=annotations, structured_output=False if outputs else None)
    if outputs:
        union: Any = Union[outputs]  # noqa: UP007 - a runtime tuple of types has no `|` spelling
        tool.fn_metadata.output_model = union
        tool.fn_metadata.output_schema = {"type": "object", **TypeAdapter(union).json_schema()}
    return tool


def build_tools(app: App) -> list[Tool]:  # noqa: C901 - one closure per tool reads best together
    """The tools, bound to the app."""

    async def run_training(
        script: Annotated[str, Field(
            description="Path of the Python training script: absolute (best), or relative to cwd when "
            "given, else to the first allowed root. It must lie inside the allowed roots.",
            min_length=1, max_length=4096)],
        client_roots: ClientRoots,
        args: Args = None,
        name: Annotated[str | None, Field(description="A human-readable name for the run (also the prefix "
                                          "of a generated run id).", max_length=200)] = None,
        run_id: Annotated[str | None, Field(description="Choose the run id (default: generated from the "
                                            "name and time).", max_length=128,
                                            pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] = None,
        cwd: Annotated[str | None, Field(description="Working directory of the script (default: the "
                                         "script's folder); relative checkpoint paths resolve here.",
                                         max_length=4096)] = None,
        python: Annotated[str | None, Field(description="Interpreter to run the script with (default: "
                                            "the configured one, else an active virtualenv's, else "
                                            "backprop's own).", max_length=4096)] = None,
        resume_from: Annotated[str | None, Field(description="A checkpoint file to start from; the "
                                                 "script receives it as BACKPROP_RESUME_FROM.",
                                                 max_length=4096)] = None,
        max_run_minutes: Minutes = None,
        max_wall_minutes: WallMinutes = None,
        framework: Annotated[Literal[FRAMEWORK_CHOICES] | None,  # type: ignore[valid-type]
                             Field(description=_help("framework"))] = None,
        checkpoint_every_minutes: CheckpointEvery = None,
        gpu_memory_limit: GpuMemory = None,
        max_parallel: Annotated[int | None, Field(description=_help("max_parallel"), ge=1, le=1024)] = None,
        min_free_ram_gb: Annotated[float | None, Field(description=_help("min_free_ram_gb"), ge=0)] = None,
        max_cpu_percent: Annotated[float | None, Field(description=_help("max_cpu_percent"), gt=0,
                                                       le=100)] = None,
        gpu_min_free_vram_mb: Annotated[float | None, Field(description=_help("gpu_min_free_vram_mb"),
                                                            ge=0)] = None,
        gpu_max_temp_c: Annotated[float | None, Field(description=_help("gpu_max_temp_c"), gt=0,
                                                      le=150)] = None,
        gpus: Gpus = None,
        use_gpu: UseGpu = None,
        grace_seconds: Grace = None,
        stop_signal: StopSignal = None,
        queue: Queue = None,
        queue_timeout_minutes: QueueTimeout = None,
        argv_compat: Annotated[bool | None, Field(description=_help("argv_compat"))] = None,
        dry_run: Annotated[bool, Field(description="Only show what would happen: the exact command, the "
                                       "environment, and the governor's verdict now. Starts nothing.")] = False,
    ) -> RunRecord | DryRun:
        """Start a training run of a Python script, time-boxed and admitted by the resource governor.

        Returns the run's record at once, without waiting for the run: status is "queued" (waiting
        for resources; status_detail says why) or "running", or "rejected" when queue=false and the
        machine is busy. Next, call wait_for_run(run_id) or get_status(run_id). With dry_run=true
        nothing starts: it returns the command, environment and the governor's verdict instead.
        Omitted options come from the configuration (10-minute time box by default).
        """
        from backprop_mcp.service import RunRequest

        roots = app.roots_for(client_roots)
        script_path, workdir = locate_script(script, cwd, roots, app.cwd)
        request = RunRequest(
            script=script_path, args=list(args or []), name=name, run_id=run_id, cwd=workdir,
            python=python, resume_from=resume_from, source="argument", options=_options(
                max_run_minutes=max_run_minutes, max_wall_minutes=max_wall_minutes, framework=framework,
                checkpoint_every_minutes=checkpoint_every_minutes, gpu_memory_limit=gpu_memory_limit,
                max_parallel=max_parallel, min_free_ram_gb=min_free_ram_gb,
                max_cpu_percent=max_cpu_percent, gpu_min_free_vram_mb=gpu_min_free_vram_mb,
                gpu_max_temp_c=gpu_max_temp_c, gpus=gpus, use_gpu=use_gpu, grace_seconds=grace_seconds,
                stop_signal=stop_signal, queue=queue, queue_timeout_minutes=queue_timeout_minutes,
                argv_compat=argv_compat))
        if dry_run:
            return await app.guarded(roots, app.service.dry_run, request, allowed_roots=roots.paths)
        return await app.guarded(roots, app.service.start, request, allowed_roots=roots.paths)

    async def resume_run(
        run_id: RunId,
        max_run_minutes: Minutes = None,
        from_scratch: Annotated[bool, Field(description="Start the next attempt from the beginning "
                                            "instead of the latest checkpoint.")] = False,
        args: Annotated[list[Annotated[str, Field(max_length=4096)]] | None, Field(
            description="Replace the script's extra arguments (default: keep the previous ones).",
            max_length=256)] = None,
        max_wall_minutes: WallMinutes = None,
        checkpoint_every_minutes: CheckpointEvery = None,
        grace_seconds: Grace = None,
        stop_signal: StopSignal = None,
        use_gpu: UseGpu = None,
        gpus: Gpus = None,
        gpu_memory_limit: GpuMemory = None,
        queue: Queue = None,
        queue_timeout_minutes: QueueTimeout = None,
    ) -> RunRecord:
        """Start the next attempt of a finished run (timed_out, stopped, lost, failed or completed)
        from its latest checkpoint, under the same run id; the script receives the checkpoint as
        BACKPROP_RESUME_FROM. Returns the record at once (attempt increased, status queued or
        running); follow it with wait_for_run. Options not given keep the run's previous values.
        """
        return await app.call(
            app.service.resume, run_id, from_scratch=from_scratch, args=args, source="argument",
            options=_options(max_run_minutes=max_run_minutes, max_wall_minutes=max_wall_minutes,
                             checkpoint_every_minutes=checkpoint_every_minutes, grace_seconds=grace_seconds,
                             stop_signal=stop_signal, use_gpu=use_gpu, gpus=gpus,
                             gpu_memory_limit=gpu_memory_limit, queue=queue,
                             queue_timeout_minutes=queue_timeout_minutes))

    async def get_status(
        run_id: Annotated[str | None, Field(
            description="A run id for that run's status; omit it for the machine's status.",
            max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] = None,
    ) -> RunStatus | SystemStatus:
        """With run_id: the run now (state, step/total, loss, metrics, ETA, time left, latest checkpoint,
        termination reason), the last lines of its log, and the next step to take.
        Without run_id: the machine (CPU, RAM, GPUs), live and queued runs, and whether a new run
        would be admitted now, with every reason it would not.
        """
        if run_id is None:
            return await app.call(app.service.system_status)
        return await app.status(run_id)

    async def list_experiments(
        status: Status = None,
        name: Annotated[str | None, Field(description="Only runs whose name matches this glob, e.g. "
                                          "\"lr-*\".", max_length=200)] = None,
        limit: Annotated[int, Field(description="Runs per page.", ge=1, le=100)] = 20,
        cursor: Annotated[str | None, Field(description="The next_cursor of the previous page.",
                                            max_length=32)] = None,
    ) -> RunPage:
        """List runs newest first, as compact rows (id, name, state, step, loss, end reason), a page
        at a time; pass next_cursor back as cursor for the next page. Use get_status(run_id) for one
        run's details, compare_runs to rank several.
        """
        return await app.call(app.service.list_runs, status=status, name=name, limit=limit, cursor=cursor)

    async def stop_run(
        run_id: RunId,
        force: Annotated[bool, Field(description="Kill the run's processes at once instead of sending "
                                     "the stop signal and waiting the grace period for a checkpoint.")] = False,
    ) -> RunRecord:
        """Stop a live run: by default gracefully (the stop signal, then the grace period so the script
        can save a checkpoint, then termination), or at once with force=true. Returns the record;
        the run reaches "stopped" shortly after (see wait_for_run). It can be continued with resume_run.
        """
        return await app.call(app.service.stop, run_id, force=force)

    async def get_logs(
        run_id: RunId,
        tail: Annotated[int, Field(description="How many of the last lines to return.", ge=1,
                                   le=MAX_LOG_TAIL)] = 50,
        attempt: Annotated[int | None, Field(description="Which attempt's log (default: the current "
                                             "one).", ge=1, le=100_000)] = None,
    ) -> LogTail:
        """The last lines of a run's combined stdout and stderr (each line cut to 2000 characters).
        Use it to see why a run failed or what it printed.
        """
        return await app.call(app.service.logs, run_id, tail=tail, attempt=attempt)

    async def wait_for_run(
        run_id: RunId,
        ctx: Context[Any, Any],
        timeout_seconds: Annotated[int, Field(description="Longest wait, seconds.", ge=1,
                                              le=MAX_WAIT_SECONDS)] = 60,
        until: Annotated[Literal["change", "end"], Field(
            description="\"change\": return when the run's state changes (queued to running, running "
            "to an end); \"end\": return only when it ends.")] = "change",
    ) -> RunWait:
        """Wait for a run, sending progress notifications meanwhile; returns early when its state
        changes (or, with until="end", when it ends), else after timeout_seconds. Returns the run,
        its log tail, whether it changed or ended, and the next step. Call again to keep waiting.
        """
        return await app.wait(run_id, timeout_seconds, until, ctx.report_progress)

    async def compare_runs(
        run_ids: Annotated[list[RunId], Field(description="The runs to compare (1 to 50).",
                                              min_length=1, max_length=50)],
        metric: Annotated[str, Field(description="The metric to rank by: \"loss\" or any metric the "
                                     "scripts reported (lower is better for names like loss, error, "
                                     "perplexity; higher otherwise).", min_length=1,
                                     max_length=200)] = "loss",
    ) -> Comparison:
        """Compare runs side by side on one metric, best first, using each run's latest and best
        value seen; names the best run. Use list_experiments to find run ids.
        """
        return await app.call(app.service.compare, run_ids, metric=metric)

    writes = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                             open_world_hint=False)
    stops = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True,
                            open_world_hint=False)
    return [
        _tool(run_training, "Start a training run", writes, outputs=(RunRecord, DryRun)),
        _tool(resume_run, "Resume a run from its checkpoint", writes),
        _tool(get_status, "Status of a run or of the machine", READ_ONLY, outputs=(RunStatus, SystemStatus)),
        _tool(list_experiments, "List runs", READ_ONLY),
        _tool(stop_run, "Stop a run", stops),
        _tool(get_logs, "Read a run's log", READ_ONLY),
        _tool(wait_for_run, "Wait for a run", READ_ONLY),
        _tool(compare_runs, "Compare runs on a metric", READ_ONLY),
    ]


def add_resources(server: MCPServer[Any], app: App) -> None:
    """The run record, its log tail and the machine's status as readable resources."""

    async def read(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await app.call(fn, *args, **kwargs)
        except RunNotFound as exc:
            raise ResourceNotFoundError(render_error(exc)) from None
        except BackpropError as exc:
            raise ResourceError(render_error(exc)) from None

    @server.resource("backprop://runs/{run_id}", name="run", title="A run's record",
                     description="The full record of one run, as JSON.", mime_type="application/json")
    async def run_record(run_id: str) -> str:
        return json.dumps(await read(app.service.get, run_id), indent=1)

    @server.resource("backprop://runs/{run_id}/log", name="run-log", title="A run's log",
                     description=f"The last {RESOURCE_LOG_LINES} lines of a run's current log.",
                     mime_type="text/plain")
    async def run_log(run_id: str) -> str:
        tail = await read(app.service.logs, run_id, tail=RESOURCE_LOG_LINES)
        return "\n".join(tail["lines"]) + ("\n" if tail["lines"] else "")

    @server.resource("backprop://system", name="system", title="The machine",
                     description="CPU, RAM, GPUs, live and queued runs, and the verdict for a new run, "
                     "as JSON.", mime_type="application/json")
    async def system() -> str:
        return json.dumps(await read(app.service.system_status), indent=1)


def build_server(
    *,
    service: Service | None = None,
    home: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    roots: Roots,
    poll_seconds: float = WAIT_POLL_SECONDS,
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "WARNING",
) -> BackpropServer:
    """The server: a given service (tests), or one over `home` created on the first tool call."""
    workdir = cwd or Path.cwd()

    def make_service() -> Service:
        if service is not None:
            return service
        from backprop_mcp.service import Service

        return Service(home, env=env, cwd=workdir)

    app = App(make_service, roots, workdir, poll_seconds)
    server = BackpropServer(functools.partial(build_tools, app), name="backprop-mcp", title="backprop",
                            version=__version__, instructions=INSTRUCTIONS, log_level=log_level)
    add_resources(server, app)
    return server
