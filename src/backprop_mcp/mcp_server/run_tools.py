"""The MCP tools that start and stop runs: run_training, resume_run, stop_run. Each is one service
call (per run) plus its summary; the rare run options come in one `options` object."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from mcp.server.mcpserver.tools import Tool
from mcp_types import ToolAnnotations
from pydantic import Field

from backprop_mcp.core.errors import UsageError
from backprop_mcp.core.notebook import MAX_NOTE_CHARS, MAX_TAGS, split_tags
from backprop_mcp.core.records import RunRecord
from backprop_mcp.mcp_server.app import App, ClientRoots
from backprop_mcp.mcp_server.arguments import (
    MAX_RUN_IDS,
    NOTEBOOK_OPTIONS,
    Args,
    Minutes,
    OneOrMoreRuns,
    Options,
    ResumeOptions,
    RunId,
    RunOptions,
    setting_field,
)
from backprop_mcp.mcp_server.roots import locate_script
from backprop_mcp.mcp_server.schema import ROWS, SUMMARY_REF, SUMMARY_TEXT, output, tool
from backprop_mcp.mcp_server.summary import counts, summaries, summary

# Hints at their default values (not read-only, not idempotent) are left out: tools/list is paid for.
WRITES = ToolAnnotations(destructive_hint=False, open_world_hint=False)
STOPS = ToolAnnotations(destructive_hint=True, idempotent_hint=True, open_world_hint=False)


def run_ids_of(given: str | list[str]) -> list[str]:
    """One run id or several, as a list without repeats."""
    ids = [given] if isinstance(given, str) else list(given)
    if not ids or len(ids) > MAX_RUN_IDS:
        raise UsageError(f"give 1 to {MAX_RUN_IDS} run ids, got {len(ids)}")
    return list(dict.fromkeys(ids))


def build(app: App) -> list[Tool]:
    """The tools, bound to the app."""

    async def run_training(
        script: Annotated[
            str,
            Field(
                description="The Python script (absolute, or relative to cwd or the first allowed root).",
                min_length=1,
                max_length=4096,
            ),
        ],
        client_roots: ClientRoots,
        args: Args = None,
        name: Annotated[
            str | None, Field(description="A label, also the generated run id's prefix.", max_length=200)
        ] = None,
        run_id: Annotated[
            str | None,
            Field(
                description="Choose the id: letters, digits, . _ -",
                max_length=128,
                pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
            ),
        ] = None,
        cwd: Annotated[
            str | None,
            Field(description="Working directory (default: the script's folder).", max_length=4096),
        ] = None,
        python: Annotated[
            str | None,
            Field(
                description="Interpreter (default: configured, else the active venv's).",
                max_length=4096,
            ),
        ] = None,
        resume_from: Annotated[
            str | None,
            Field(description="A checkpoint to start from.", max_length=4096),
        ] = None,
        max_run_minutes: Minutes = None,
        options: Options = None,
        dry_run: Annotated[
            bool, Field(description="Only show the command and the governor's verdict.")
        ] = False,
    ) -> dict[str, Any]:
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
            options={**app.defaults, **given(options, max_run_minutes)},
            **noted(options),
        )
        if dry_run:
            return dict(await app.guarded(roots, app.service.dry_run, request, allowed_roots=roots.paths))
        return started(await app.guarded(roots, app.service.start, request, allowed_roots=roots.paths))

    async def resume_run(
        run_id: RunId,
        client_roots: ClientRoots,
        args: Annotated[
            list[Annotated[str, Field(max_length=4096)]] | None,
            Field(description="New script arguments (default: the previous ones).", max_length=256),
        ] = None,
        max_run_minutes: Annotated[
            float | None,
            setting_field("max_run_minutes", described=False),
            Field(description="Time box in minutes (default: the run's)."),
        ] = None,
        from_scratch: Annotated[bool, Field(description="Start over, not from the checkpoint.")] = False,
        options: ResumeOptions = None,
    ) -> dict[str, Any]:
        if options and "framework" in options:
            raise UsageError(
                "a run keeps the framework it started with; framework is not a resume option",
                hint='start a new run with run_training(..., options={"framework": ...}) to change it',
            )
        roots = app.roots_for(client_roots)
        record = await app.guarded(
            roots,
            app.service.resume,
            run_id,
            allowed_roots=roots.paths,
            from_scratch=from_scratch,
            args=args,
            source="argument",
            options=given(options, max_run_minutes),
        )
        return started(record)

    async def stop_run(
        run_id: OneOrMoreRuns,
        force: Annotated[bool, Field(description="Kill at once, without the grace period.")] = False,
    ) -> dict[str, Any]:
        if isinstance(run_id, str):
            # One run: its refusal (ended already, no such run) is the call's error.
            rows = [summary(await app.call(app.service.stop, run_id, force=force), advice=False)]
            errors: dict[str, str] = {}
        else:
            report = await app.call(app.service.stop_runs, run_ids_of(run_id), force=force)
            rows = summaries(r["record"] for r in report["runs"] if r["stopped"] and r["record"] is not None)
            errors = {r["run_id"]: r["error"] or "" for r in report["runs"] if not r["stopped"]}
            if not rows:
                raise UsageError(
                    "none of the runs could be stopped: " + "; ".join(f"{k}: {v}" for k, v in errors.items())
                )
        return {
            "runs": rows,
            "errors": errors,
            "next_step": f"Stopping ({counts(rows)}): each ends within its grace period, saving a checkpoint "
            'if the script does. wait_for_run with the same run_id and until="end" confirms it; resume_run '
            "continues one later.",
        }

    async def annotate_run(
        run_id: RunId,
        note: Annotated[
            str | None, Field(description="Kept with its time.", max_length=MAX_NOTE_CHARS)
        ] = None,
        tags: Annotated[
            list[Annotated[str, Field(max_length=65)]] | None,
            Field(description="32 at most; -t removes t.", max_length=MAX_TAGS),
        ] = None,
    ) -> dict[str, Any]:
        add, remove = split_tags(tags or [])
        notes = await app.call(app.service.annotate, run_id, note=note, tags=add, untag=remove, source="mcp")
        return {"run_id": run_id, "tags": notes["tags"], "notes": len(notes["notes"])}

    return [
        tool(
            run_training,
            title="Start a run",
            description="Start a time-boxed run of a Python training script, admitted by the resource "
            "governor; paths must lie in the allowed roots. Returns at once.",
            annotations=WRITES,
            returns=output(SUMMARY_TEXT + " With dry_run: command, cwd, environment, decision, options."),
            plain=("options",),
        ),
        tool(
            resume_run,
            title="Resume a run",
            description="Start the next attempt of an ended run from its latest checkpoint (given to "
            "the script as BACKPROP_RESUME_FROM).",
            annotations=WRITES,
            returns=output(SUMMARY_REF),
            plain=("options",),
        ),
        tool(
            stop_run,
            title="Stop runs",
            description="Stop one live run or several: the stop signal, a grace period to checkpoint, "
            "then termination.",
            annotations=STOPS,
            returns=output(f"{ROWS}, errors (why one was not stopped), next_step."),
        ),
        tool(
            annotate_run,
            title="Annotate",
            description="Note why you started a run or what it showed, and tag it; notes outlive this chat.",
            annotations=WRITES,
            returns=output("run_id, tags, notes (count)."),
        ),
    ]


def started(record: RunRecord) -> dict[str, Any]:
    """The answer of a start or resume: the run's summary, with the time box it got and the config
    files that applied (a backprop.config.json near the script can change the box)."""
    answer = summary(record)
    answer["max_run_minutes"] = record["max_run_minutes"]
    if record.get("config_files"):
        answer["config_files"] = record.get("config_files")
    return answer


def given(options: RunOptions | None, max_run_minutes: float | None) -> dict[str, object]:
    """A call's run options: the `options` object (less the notebook's entries) and the top-level
    time box."""
    values: dict[str, object] = {
        k: v for k, v in (options or {}).items() if v is not None and k not in NOTEBOOK_OPTIONS
    }
    if max_run_minutes is not None:
        values["max_run_minutes"] = max_run_minutes
    return values


def noted(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The notebook's first entry among a call's `options` (tags, note), as request fields."""
    return {k: v for k, v in (options or {}).items() if k in NOTEBOOK_OPTIONS and v is not None}
