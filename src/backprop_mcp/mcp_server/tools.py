"""The MCP tools of backprop-mcp: each one service call plus rendering, with typed and described
inputs, structured outputs, and annotations an agent can trust."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools import Tool
from mcp_types import ToolAnnotations
from pydantic import Field

from backprop_mcp import __version__
from backprop_mcp.core.answers import Comparison, DryRun, LogTail, RunPage, SystemStatus
from backprop_mcp.core.records import RunRecord, RunState
from backprop_mcp.mcp_server.app import (
    WAIT_POLL_SECONDS,
    App,
    BackpropServer,
    ClientRoots,
    add_resources,
    given_options,
    tool,
)
from backprop_mcp.mcp_server.roots import Roots, locate_script
from backprop_mcp.mcp_server.shapes import INSTRUCTIONS, RunStatus, RunWait

if TYPE_CHECKING:
    from backprop_mcp.runs.service import Service

from backprop_mcp.mcp_server.arguments import (
    MAX_LOG_TAIL,
    MAX_WAIT_SECONDS,
    Args,
    CheckpointEvery,
    FrameworkName,
    GpuMemory,
    Gpus,
    Grace,
    Minutes,
    Queue,
    QueueTimeout,
    RunId,
    Status,
    StopSignal,
    UseGpu,
    WallMinutes,
    setting_field,
    setting_help,
)

READ_ONLY = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)


def build_tools(app: App) -> list[Tool]:
    """The tools, bound to the app."""

    async def run_training(
        script: Annotated[
            str,
            Field(
                description="Path of the Python training script: absolute (best), or relative to cwd when "
                "given, else to the first allowed root. It must lie inside the allowed roots.",
                min_length=1,
                max_length=4096,
            ),
        ],
        client_roots: ClientRoots,
        args: Args = None,
        name: Annotated[
            str | None,
            Field(
                description="A human-readable name for the run (also the prefix of a generated run id).",
                max_length=200,
            ),
        ] = None,
        run_id: Annotated[
            str | None,
            Field(
                description="Choose the run id (default: generated from the name and time).",
                max_length=128,
                pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
            ),
        ] = None,
        cwd: Annotated[
            str | None,
            Field(
                description="Working directory of the script (default: the "
                "script's folder); relative checkpoint paths resolve here. It must lie inside "
                "the allowed roots.",
                max_length=4096,
            ),
        ] = None,
        python: Annotated[
            str | None,
            Field(
                description="Interpreter to run the script with (default: "
                "the configured one, else an active virtualenv's, else "
                "backprop's own). Given here, it must lie inside the allowed roots (a virtualenv "
                "there, e.g. .venv/bin/python, is fine) or be the configured one.",
                max_length=4096,
            ),
        ] = None,
        resume_from: Annotated[
            str | None,
            Field(
                description="A checkpoint file to start from; the "
                "script receives it as BACKPROP_RESUME_FROM. It must lie inside the allowed roots.",
                max_length=4096,
            ),
        ] = None,
        max_run_minutes: Minutes = None,
        max_wall_minutes: WallMinutes = None,
        framework: Annotated[FrameworkName | None, Field(description=setting_help("framework"))] = None,
        checkpoint_every_minutes: CheckpointEvery = None,
        gpu_memory_limit: GpuMemory = None,
        max_parallel: Annotated[int | None, setting_field("max_parallel")] = None,
        min_free_ram_gb: Annotated[float | None, setting_field("min_free_ram_gb")] = None,
        max_cpu_percent: Annotated[float | None, setting_field("max_cpu_percent")] = None,
        gpu_min_free_vram_mb: Annotated[float | None, setting_field("gpu_min_free_vram_mb")] = None,
        gpu_max_temp_c: Annotated[float | None, setting_field("gpu_max_temp_c")] = None,
        gpus: Gpus = None,
        use_gpu: UseGpu = None,
        grace_seconds: Grace = None,
        stop_signal: StopSignal = None,
        queue: Queue = None,
        queue_timeout_minutes: QueueTimeout = None,
        argv_compat: Annotated[bool | None, Field(description=setting_help("argv_compat"))] = None,
        dry_run: Annotated[
            bool,
            Field(
                description="Only show what would happen: the exact command, the "
                "environment, and the governor's verdict now. Starts nothing."
            ),
        ] = False,
    ) -> RunRecord | DryRun:
        """Start a training run of a Python script, time-boxed and admitted by the resource governor.

        Returns the run's record at once, without waiting for the run: status is "queued" (waiting
        for resources; status_detail says why) or "running", or "rejected" when queue=false and the
        machine is busy. Next, call wait_for_run(run_id) or get_status(run_id). With dry_run=true
        nothing starts: it returns the command, environment and the governor's verdict instead.
        Omitted options come from the configuration (10-minute time box by default).
        """
        from backprop_mcp.runs.requests import RunRequest

        roots = app.roots_for(client_roots)
        script_path, workdir = locate_script(script, cwd, roots, app.cwd)
        request = RunRequest(
            script=script_path,
            args=list(args or []),
            name=name,
            run_id=run_id,
            cwd=workdir,
            python=python,
            resume_from=resume_from,
            source="argument",
            options=given_options(
                max_run_minutes=max_run_minutes,
                max_wall_minutes=max_wall_minutes,
                framework=framework,
                checkpoint_every_minutes=checkpoint_every_minutes,
                gpu_memory_limit=gpu_memory_limit,
                max_parallel=max_parallel,
                min_free_ram_gb=min_free_ram_gb,
                max_cpu_percent=max_cpu_percent,
                gpu_min_free_vram_mb=gpu_min_free_vram_mb,
                gpu_max_temp_c=gpu_max_temp_c,
                gpus=gpus,
                use_gpu=use_gpu,
                grace_seconds=grace_seconds,
                stop_signal=stop_signal,
                queue=queue,
                queue_timeout_minutes=queue_timeout_minutes,
                argv_compat=argv_compat,
            ),
        )
        if dry_run:
            return await app.guarded(roots, app.service.dry_run, request, allowed_roots=roots.paths)
        return await app.guarded(roots, app.service.start, request, allowed_roots=roots.paths)

    async def resume_run(
        run_id: RunId,
        client_roots: ClientRoots,
        max_run_minutes: Minutes = None,
        from_scratch: Annotated[
            bool,
            Field(description="Start the next attempt from the beginning instead of the latest checkpoint."),
        ] = False,
        args: Annotated[
            list[Annotated[str, Field(max_length=4096)]] | None,
            Field(
                description="Replace the script's extra arguments (default: keep the previous ones).",
                max_length=256,
            ),
        ] = None,
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
        roots = app.roots_for(client_roots)
        return await app.guarded(
            roots,
            app.service.resume,
            run_id,
            allowed_roots=roots.paths,
            from_scratch=from_scratch,
            args=args,
            source="argument",
            options=given_options(
                max_run_minutes=max_run_minutes,
                max_wall_minutes=max_wall_minutes,
                checkpoint_every_minutes=checkpoint_every_minutes,
                grace_seconds=grace_seconds,
                stop_signal=stop_signal,
                use_gpu=use_gpu,
                gpus=gpus,
                gpu_memory_limit=gpu_memory_limit,
                queue=queue,
                queue_timeout_minutes=queue_timeout_minutes,
            ),
        )

    async def get_status(
        run_id: Annotated[
            str | None,
            Field(
                description="A run id for that run's status; omit it for the machine's status.",
                max_length=128,
                pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
            ),
        ] = None,
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
        name: Annotated[
            str | None,
            Field(description='Only runs whose name matches this glob, e.g. "lr-*".', max_length=200),
        ] = None,
        limit: Annotated[int, Field(description="Runs per page.", ge=1, le=100)] = 20,
        cursor: Annotated[
            str | None, Field(description="The next_cursor of the previous page.", max_length=32)
        ] = None,
    ) -> RunPage:
        """List runs newest first, as compact rows (id, name, state, step, loss, end reason), a page
        at a time; pass next_cursor back as cursor for the next page. Use get_status(run_id) for one
        run's details, compare_runs to rank several.
        """
        return await app.call(app.service.list_runs, status=status, name=name, limit=limit, cursor=cursor)

    async def stop_run(
        run_id: RunId,
        force: Annotated[
            bool,
            Field(
                description="Kill the run's processes at once instead of sending "
                "the stop signal and waiting the grace period for a checkpoint."
            ),
        ] = False,
    ) -> RunRecord:
        """Stop a live run: by default gracefully (the stop signal, then the grace period so the script
        can save a checkpoint, then termination), or at once with force=true. Returns the record;
        the run reaches "stopped" shortly after (see wait_for_run). It can be continued with resume_run.
        """
        return await app.call(app.service.stop, run_id, force=force)

    async def get_logs(
        run_id: RunId,
        tail: Annotated[
            int, Field(description="How many of the last lines to return.", ge=1, le=MAX_LOG_TAIL)
        ] = 50,
        attempt: Annotated[
            int | None, Field(description="Which attempt's log (default: the current one).", ge=1, le=100_000)
        ] = None,
    ) -> LogTail:
        """The last lines of a run's combined stdout and stderr (each line cut to 2000 characters).
        Use it to see why a run failed or what it printed.
        """
        return await app.call(app.service.logs, run_id, tail=tail, attempt=attempt)

    async def wait_for_run(
        run_id: RunId,
        ctx: Context[Any, Any],
        timeout_seconds: Annotated[
            int, Field(description="Longest wait, seconds.", ge=1, le=MAX_WAIT_SECONDS)
        ] = 60,
        until: Annotated[
            Literal["change", "end"],
            Field(
                description='"change": return when the run\'s state changes (queued to running, running '
                'to an end); "end": return only when it ends.'
            ),
        ] = "change",
        since: Annotated[
            RunState | None,
            Field(
                description="The state you last saw, e.g. the status run_training returned (default: its "
                "state when this call starts); if the run has already moved on, the call returns at once."
            ),
        ] = None,
    ) -> RunWait:
        """Wait for a run, sending progress notifications meanwhile; returns early when its state
        differs from `since` (pass the status you last saw, e.g. "queued" from run_training) or,
        with until="end", when it ends; else after timeout_seconds. Returns the run, its log tail,
        whether it changed or ended, and the next step. Call again to keep waiting.
        """
        return await app.wait(run_id, timeout_seconds, until, since, ctx.report_progress)

    async def compare_runs(
        run_ids: Annotated[
            list[RunId], Field(description="The runs to compare (1 to 50).", min_length=1, max_length=50)
        ],
        metric: Annotated[
            str,
            Field(
                description='The metric to rank by: "loss" or any metric the '
                "scripts reported (lower is better for names like loss, error, "
                "perplexity; higher otherwise).",
                min_length=1,
                max_length=200,
            ),
        ] = "loss",
    ) -> Comparison:
        """Compare runs side by side on one metric, ranked by each run's last reported value of it
        (an ended run's final value; not the best value seen during training, which is not kept),
        and name the top run. Use list_experiments to find run ids.
        """
        return await app.call(app.service.compare, run_ids, metric=metric)

    writes = ToolAnnotations(
        read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False
    )
    stops = ToolAnnotations(
        read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
    )
    return [
        tool(run_training, "Start a training run", writes, outputs=(RunRecord, DryRun)),
        tool(resume_run, "Resume a run from its checkpoint", writes),
        tool(get_status, "Status of a run or of the machine", READ_ONLY, outputs=(RunStatus, SystemStatus)),
        tool(list_experiments, "List runs", READ_ONLY),
        tool(stop_run, "Stop a run", stops),
        tool(get_logs, "Read a run's log", READ_ONLY),
        tool(wait_for_run, "Wait for a run", READ_ONLY),
        tool(compare_runs, "Compare runs on a metric", READ_ONLY),
    ]


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
        from backprop_mcp.runs.service import Service

        return Service(home, env=env, cwd=workdir)

    app = App(make_service, roots, workdir, poll_seconds)
    server = BackpropServer(
        functools.partial(build_tools, app),
        name="backprop-mcp",
        title="backprop",
        version=__version__,
        instructions=INSTRUCTIONS,
        log_level=log_level,
    )
    add_resources(server, app)
    return server
