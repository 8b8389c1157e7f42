"""The MCP tools that read: get_status, wait_for_run, list_experiments, compare_runs, get_metrics
and get_logs. Each is one service call plus a compact answer that stays within ANSWER_BYTES unless
the agent asked for more (detail=true, more points, a longer tail)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools import Tool
from mcp_types import ToolAnnotations
from pydantic import Field

from backprop_mcp.core.notebook import Note
from backprop_mcp.core.records import RunRecord, RunState
from backprop_mcp.mcp_server.app import App
from backprop_mcp.mcp_server.arguments import (
    MAX_LOG_TAIL,
    MAX_WAIT_SECONDS,
    OneOrMoreRuns,
    OneRun,
    RunId,
    RunIds,
    Status,
)
from backprop_mcp.mcp_server.run_tools import run_ids_of
from backprop_mcp.mcp_server.schema import ROWS, SUMMARY_REF, output, tool
from backprop_mcp.mcp_server.summary import fit, rounded, size, summaries, summary
from backprop_mcp.mcp_server.waiting import Until, wait
from backprop_mcp.runs.history import MAX_POINTS
from backprop_mcp.runs.metrics import MAX_ASKED_METRICS, MAX_METRIC_RUNS

READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)

# The most bytes of one answer an agent did not ask to be larger (issue 11: "no answer over 4 KB").
ANSWER_BYTES = 4000
# Log lines in the status of a failed run: the error is usually in the last few; get_logs has more.
STATUS_LOG_LINES = 5
# Each of those lines is cut to this many characters (get_logs gives them whole): five lines of a
# traceback fit beside a summary within ANSWER_BYTES.
LOG_TAIL_LINE_CHARS = 400
# get_logs without `tail`: this many lines, fewer when they would pass ANSWER_BYTES.
DEFAULT_LOG_TAIL = 50
# get_metrics without `points`: this many per series, halved until the answer fits in ANSWER_BYTES
# but never below MIN_POINTS (a curve needs a few points to have a shape).
DEFAULT_POINTS = 50
MIN_POINTS = 5
# get_status(detail=true) shows at most this many of a run's newest notes, and only as many as fit
# in DETAIL_NOTES_BYTES (20 notes of 2,000 characters would be 40 KB); `backprop note RUN_ID` all.
DETAIL_NOTES = 20
DETAIL_NOTES_BYTES = 4000


def build(app: App) -> list[Tool]:
    """The tools, bound to the app."""

    async def get_status(
        run_id: Annotated[
            str | None,
            Field(
                description="A run id; omit it for the machine's status.",
                max_length=128,
                pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
            ),
        ] = None,
        detail: Annotated[bool, Field(description="Add its full record.")] = False,
    ) -> dict[str, Any]:
        if run_id is None:
            return await machine(app)
        record = await app.call(app.service.get, run_id)
        notes, unreadable = await app.call(app.service.notebook_beside, run_id)
        answer = summary({**record, "tags": notes["tags"]})
        if unreadable:
            answer["notes_error"] = unreadable
        if record["status"] in ("failed", "lost"):
            tail = await app.call(app.service.logs, run_id, tail=STATUS_LOG_LINES)
            if tail.get("note"):
                answer["log_note"] = tail.get("note")
            with_log_tail(answer, tail["lines"])
        if detail:
            answer["record"] = dict(record)
            answer["notes"] = newest_notes(notes["notes"])
            if len(answer["notes"]) < len(notes["notes"]):
                answer["notes_left_out"] = len(notes["notes"]) - len(answer["notes"])
        return answer

    async def wait_for_run(
        run_id: OneOrMoreRuns,
        ctx: Context[Any, Any],
        timeout_seconds: Annotated[
            int, Field(description="Longest wait, seconds.", ge=1, le=MAX_WAIT_SECONDS)
        ] = 60,
        until: Annotated[
            Until,
            Field(description="change: a state changes; any: one ends; end or all: all end."),
        ] = "change",
        since: Annotated[
            RunState | None,
            Field(description="The state you last saw (default: the state now)."),
        ] = None,
    ) -> dict[str, Any]:
        async def read(one: str) -> RunRecord:
            return await app.call(app.service.get, one)

        ids = run_ids_of(run_id)
        answer = await wait(
            read,
            ids,
            timeout=timeout_seconds,
            until=until,
            since=since,
            report=ctx.report_progress,
            poll_seconds=app.poll_seconds,
        )
        answer = shrink(answer)
        if len(ids) == 1 and answer["runs"][0]["status"] in ("failed", "lost"):
            lines = (await app.call(app.service.logs, ids[0], tail=STATUS_LOG_LINES))["lines"]
            with_log_tail(answer, lines)
        return answer

    async def list_experiments(
        status: Status = None,
        name: Annotated[
            str | None, Field(description="A glob over run names, e.g. lr-*", max_length=200)
        ] = None,
        sort: Annotated[
            str | None,
            Field(
                description="A metric: loss lowest first, -val_acc highest first (default: newest).",
                max_length=200,
            ),
        ] = None,
        limit: Annotated[int, Field(description="Runs per page.", ge=1, le=100)] = 20,
        cursor: Annotated[
            str | None, Field(description="The previous page's next_cursor.", max_length=32)
        ] = None,
        sweep: Annotated[str | None, Field(description="Only this sweep's trials.", max_length=128)] = None,
        tag: Annotated[str | None, Field(description="Runs with this tag.", max_length=64)] = None,
    ) -> dict[str, Any]:
        page = await app.call(
            app.service.list_runs,
            status=status,
            name=name,
            limit=limit,
            cursor=cursor,
            sort=sort,
            sweep=sweep,
            tags=[tag] if tag is not None else [],
        )
        metric = sort.lstrip("-+") if sort else None
        rows = summaries(page["runs"], keep=metric)
        answer: dict[str, Any] = {
            "runs": rows,
            "next_cursor": page["next_cursor"],
            "total": page["total_matching"],
            "next_step": "get_status(run_id) for one run; compare_runs or get_metrics to judge several.",
        }
        kept = fit(rows, ANSWER_BYTES - 40, answer)  # room for a longer next_cursor
        if kept < len(rows):
            # Fewer rows rather than more bytes: the rest come with the cursor.
            offset = int(cursor) if cursor else 0
            answer.update(runs=rows[:kept], next_cursor=str(offset + kept), total=None)
        return answer

    async def compare_runs(
        run_ids: RunIds,
        metric: Annotated[
            str,
            Field(
                description="loss or any metric the scripts reported.",
                min_length=1,
                max_length=200,
            ),
        ] = "loss",
        by: Annotated[
            Literal["last", "best"], Field(description="Rank by each run's last or best value.")
        ] = "last",
    ) -> dict[str, Any]:
        comparison = await app.call(app.service.compare, run_ids, metric=metric, by=by)
        records = {one: await app.call(app.service.get, one) for one in dict.fromkeys(run_ids)}
        rows = []
        for compared in comparison["runs"]:
            row = summary(records[compared["run_id"]], advice=False, keep=metric)
            row["value"] = rounded(compared.get("value"))
            if by == "last" and compared.get("best_value") != compared.get("value"):
                row["best"] = rounded(compared.get("best_value"))  # ranked by its last, its best beside
            if compared.get("ended_early"):
                row["ended_early"] = True
            rows.append(row)
        top = comparison["top_run_id"]
        shas = {r["attempts"][-1]["code"]["sha"] for r in records.values() if "code" in r["attempts"][-1]}
        return shrink(
            {
                "metric": metric,
                "by": by,
                "lower_is_better": comparison["lower_is_better"],
                "top_run_id": top,
                # Whether the runs' current attempts ran different scripts (rows: code.sha).
                "code_differs": len(shas) > 1 if shas else None,
                "runs": rows,
                "next_step": (
                    f'resume_run(run_id="{top}") trains the best longer (new args or max_run_minutes); '
                    f'get_metrics(run_ids=["{top}"]) shows its curve.'
                    if top
                    else f"No run reported {metric}; get_metrics(run_ids=...) lists the metrics they did."
                ),
            }
        )

    async def get_metrics(
        run_ids: Annotated[
            list[OneRun],
            Field(description=f"Run ids (1 to {MAX_METRIC_RUNS}).", min_length=1, max_length=MAX_METRIC_RUNS),
        ],
        metrics: Annotated[
            list[Annotated[str, Field(max_length=200)]] | None,
            Field(
                description=f"Names, {MAX_ASKED_METRICS} at most (default: loss and a few more).",
                max_length=MAX_ASKED_METRICS,
            ),
        ] = None,
        points: Annotated[
            int | None,
            Field(description="Points per series (default 50, fewer to fit 4 KB).", ge=1, le=MAX_POINTS),
        ] = None,
    ) -> dict[str, Any]:
        want = points or DEFAULT_POINTS
        while True:
            answer = dict(await app.call(app.service.metrics, run_ids, metrics=metrics, points=want))
            if points is not None or want <= MIN_POINTS or size(answer) <= ANSWER_BYTES:
                return answer
            want = max(MIN_POINTS, want // 2)

    async def get_logs(
        run_id: RunId,
        tail: Annotated[
            int | None,
            Field(description="Lines (default 50, fewer to fit 4 KB).", ge=1, le=MAX_LOG_TAIL),
        ] = None,
        attempt: Annotated[
            int | None, Field(description="Which attempt (default: the current one).", ge=1, le=100_000)
        ] = None,
    ) -> dict[str, Any]:
        logs = await app.call(app.service.logs, run_id, tail=tail or DEFAULT_LOG_TAIL, attempt=attempt)
        answer: dict[str, Any] = dict(logs)
        if tail is None:
            lines = logs["lines"]
            kept = fit([*reversed(lines)], ANSWER_BYTES, answer, key="lines")
            if kept < len(lines):
                answer.update(lines=lines[len(lines) - kept :], truncated=True)
        return answer

    return [
        tool(
            get_status,
            title="Status",
            description="With run_id: the run's summary (and a failed run's last log lines). Without: "
            "the machine, live and queued runs, and whether a new run would start now.",
            annotations=READ_ONLY,
            returns=output(
                f"{SUMMARY_REF}, log_tail, record, notes. "
                "Or: snapshot, limits, live_runs, queued_runs, verdict."
            ),
        ),
        tool(
            wait_for_run,
            title="Wait for runs",
            description="Wait for one run or a list, with progress notifications, until `until` holds or "
            "timeout_seconds pass; call again to keep waiting.",
            annotations=READ_ONLY,
            returns=output(f"{ROWS}, ended (all ended), changed, waited_s, next_step."),
            plain=("since",),
        ),
        tool(
            list_experiments,
            title="List runs",
            description="List runs (summaries with tags), newest first or sorted by a metric, "
            "a page at a time.",
            annotations=READ_ONLY,
            returns=output(f"{ROWS}, next_cursor, total, next_step."),
        ),
        tool(
            compare_runs,
            title="Compare runs",
            description="Rank runs on one metric by their last or best value, flag those that ended "
            "early, name the top run.",
            annotations=READ_ONLY,
            returns=output(
                "metric, by, lower_is_better, top_run_id, code_differs, runs (best first, with value, "
                "best, ended_early, code), next_step."
            ),
        ),
        tool(
            get_metrics,
            title="Metric curves",
            description="Metric curves of runs, downsampled, with the last and best values and where "
            "resumed attempts join.",
            annotations=READ_ONLY,
            returns=output(
                "runs: [{run_id, metrics: {name: {steps, values, last, last_step, best, best_step}}, joins}]."
            ),
        ),
        tool(
            get_logs,
            title="Read a log",
            description="The last lines of a run's stdout and stderr, each cut to 2000 characters: why it "
            "failed, or what it printed.",
            annotations=READ_ONLY,
            returns=output("run_id, attempt, lines (oldest first), truncated, note."),
        ),
    ]


async def machine(app: App) -> dict[str, Any]:
    """The machine's status with runs as summaries, under the server's own limits."""
    status = await app.call(app.service.system_status, app.defaults)
    queued = summaries(status["queued_runs"])
    for position, row in enumerate(queued, 1):
        # The rows are in queue order; a run's own record may not show its place yet.
        row["queue_position"] = position
    return {**status, "live_runs": summaries(status["live_runs"]), "queued_runs": queued}


def with_log_tail(answer: dict[str, Any], lines: list[str]) -> None:
    """`log_tail`: the newest of `lines` that fit the answer in ANSWER_BYTES, each cut to
    LOG_TAIL_LINE_CHARS (the newest, the one that usually says why, is kept, cut as needed)."""
    cut = [
        line if len(line) <= LOG_TAIL_LINE_CHARS else line[: LOG_TAIL_LINE_CHARS - 3] + "..."
        for line in lines
    ]
    kept = fit([*reversed(cut)], ANSWER_BYTES, answer, key="log_tail")
    if cut and kept == 0:
        room = max(0, ANSWER_BYTES - size({**answer, "log_tail": [""]}))
        cut[-1] = cut[-1].encode("utf-8")[: max(0, room - 3)].decode("utf-8", "ignore") + "..."
        kept = 1
    answer["log_tail"] = cut[len(cut) - kept :]


def shrink(answer: dict[str, Any]) -> dict[str, Any]:
    """A multi-run answer within ANSWER_BYTES: rows lose their args, metrics and checkpoint paths
    (get_status has them) before the answer passes the budget."""
    if size(answer) <= ANSWER_BYTES:
        return answer
    slim = ("args", "metrics", "checkpoint", "reason")
    answer["runs"] = [{k: v for k, v in row.items() if k not in slim} for row in answer["runs"]]
    return answer


def newest_notes(notes: list[Note]) -> list[Note]:
    """The newest notes, oldest first: at most DETAIL_NOTES of them and DETAIL_NOTES_BYTES of
    answer (the newest one always: a note is at most 2,000 characters)."""
    kept: list[Note] = []
    used = 0
    for note in reversed(notes[-DETAIL_NOTES:]):
        cost = size(note)
        if kept and used + cost > DETAIL_NOTES_BYTES:
            break
        kept.append(note)
        used += cost
    return kept[::-1]
