"""The MCP tools of sweeps (issue 12): run_sweep, get_sweep, stop_sweep. Each is one call of
`sweeps.service.Sweeps` plus one compact answer (`view`): the counts by state, the trials (all of
them when few, else the best and the live ones), the best trial with its parameters and the
arguments to resume it with, the spread and a line per parameter, within ANSWER_BYTES whatever
the sweep's size. A trial is an ordinary run: resume_run, wait_for_run and get_logs take its id."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import anyio
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools import Tool
from mcp_types import ToolAnnotations
from pydantic import Field

from backprop_mcp.core.errors import BackpropError, RunNotFound
from backprop_mcp.core.records import ACTIVE_STATES
from backprop_mcp.mcp_server.app import App, ClientRoots
from backprop_mcp.mcp_server.arguments import (
    MAX_WAIT_SECONDS,
    SWEEP_ONLY_OPTIONS,
    RunOptions,
    SweepOptions,
    setting_field,
)
from backprop_mcp.mcp_server.roots import locate_script
from backprop_mcp.mcp_server.run_tools import STOPS, WRITES, given, noted
from backprop_mcp.mcp_server.schema import output, tool
from backprop_mcp.mcp_server.summary import compact, rounded, short_args, size
from backprop_mcp.sweeps.answers import failed_trial
from backprop_mcp.sweeps.objective import UNSCORED_STATES
from backprop_mcp.sweeps.shapes import MAX_TRIALS, STARTING
from backprop_mcp.sweeps.space import MAX_PARAMS

if TYPE_CHECKING:
    from backprop_mcp.sweeps.service import Sweeps

READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)

# The most bytes of a sweep answer (issue 12: "every answer <= 4 KB"): past it, fewer trials, then
# no per-value tables, then no parameter summary. list_experiments(sweep=...) pages through them all.
ANSWER_BYTES = 4000
# A parameter's value in an answer is cut to this many characters (a choice may be a long string;
# the trial's run has it whole).
VALUE_CHARS = 60
# A progress notification goes out at least this often while get_sweep waits (and at every trial
# that ends), so that clients see the call is alive.
PROGRESS_EVERY_SECONDS = 5.0

SWEEP_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
SweepId = Annotated[
    str, Field(description="A sweep id.", min_length=1, max_length=128, pattern=SWEEP_ID_PATTERN)
]
Param = Annotated[
    list[str | int | float | bool] | Annotated[str, Field(max_length=4096)],
    Field(description="Values (a grid axis) or a distribution string."),
]
# A trial in these states has not ended: it is shown as long as the answer has room for any.
_LIVE = ACTIVE_STATES | {STARTING}
VIEW = "sweep_id, status, counts, trials, best {run_id, params, objective, args}, param_summary, next_step."


def build(app: App) -> list[Tool]:
    """The tools, bound to the app."""
    made: list[Sweeps] = []

    def sweeps() -> Sweeps:
        if not made:
            from backprop_mcp.sweeps.service import Sweeps

            made.append(Sweeps(app.service))
        return made[0]

    async def run_sweep(
        script: Annotated[str, Field(description="The Python script.", min_length=1, max_length=4096)],
        params: Annotated[
            dict[Annotated[str, Field(max_length=64)], Param],
            Field(
                description='name: [values] or "uniform(a,b)", "loguniform(a,b)", "int(a,b)", "choice(a,..)"',
                min_length=1,
                max_length=MAX_PARAMS,
            ),
        ],
        metric: Annotated[str, Field(description="E.g. val_loss.", min_length=1, max_length=200)],
        client_roots: ClientRoots,
        mode: Annotated[Literal["min", "max"], Field(description="Lower or higher is better.")] = "min",
        method: Annotated[
            Literal["grid", "random", "tpe"] | None,
            Field(description="Default: grid if every param is a list, else random."),
        ] = None,
        max_trials: Annotated[
            int | None, Field(description="Default: the grid's size, else 10.", ge=1, le=MAX_TRIALS)
        ] = None,
        args: Annotated[
            list[Annotated[str, Field(max_length=4096)]] | None,
            Field(description="Fixed script arguments.", max_length=256),
        ] = None,
        max_run_minutes: Annotated[
            float | None,
            setting_field("max_run_minutes", described=False),
            Field(description="Each trial's time box."),
        ] = None,
        options: Annotated[
            SweepOptions | None,
            Field(
                description="Run options as in run_training, and parallel, budget_minutes, objective "
                "(final|best), prune, seed, name."
            ),
        ] = None,
        cwd: Annotated[str | None, Field(description="Working directory.", max_length=4096)] = None,
        python: Annotated[str | None, Field(description="Interpreter.", max_length=4096)] = None,
    ) -> dict[str, Any]:
        from backprop_mcp.sweeps.service import SweepRequest

        roots = app.roots_for(client_roots)
        script_path, workdir = locate_script(script, cwd, roots, app.cwd)
        given_options: dict[str, Any] = {k: v for k, v in (options or {}).items() if v is not None}
        sweep = {k: given_options.pop(k) for k in SWEEP_ONLY_OPTIONS if k in given_options}
        run_options = cast(RunOptions, given_options)
        request = SweepRequest(
            script=script_path,
            params=params,
            metric=metric,
            mode=mode,
            method=method,
            max_trials=max_trials,
            args=list(args or []),
            cwd=workdir,
            python=python,
            options={**app.defaults, **given(run_options, max_run_minutes)},
            source="argument",
            **sweep,
            **noted(options),
        )
        started = await app.guarded(roots, sweeps().start, request, allowed_roots=roots.paths)
        return await view(app, started)

    async def get_sweep(
        sweep_id: SweepId,
        ctx: Context[Any, Any],
        wait_seconds: Annotated[int, Field(description="Wait for its end.", ge=0, le=MAX_WAIT_SECONDS)] = 0,
    ) -> dict[str, Any]:
        with named(sweep_id):
            if wait_seconds:
                await wait(app, sweeps(), sweep_id, wait_seconds, ctx)
            return await view(app, await app.call(sweeps().get, sweep_id))

    async def stop_sweep(sweep_id: SweepId) -> dict[str, Any]:
        with named(sweep_id):
            return await view(app, await app.call(sweeps().stop, sweep_id))

    return [
        tool(
            run_sweep,
            title="Start a sweep",
            description="Start a hyperparameter sweep: governed runs of one script, given each point as "
            "--name value. Returns at once.",
            annotations=WRITES,
            returns=output(VIEW),
            plain=("params", "options"),
        ),
        tool(
            get_sweep,
            title="Sweep results",
            description="A sweep's trials, its best trial and how each parameter related to the metric; "
            "wait_seconds waits for its end.",
            annotations=READ_ONLY,
            returns=output("As run_sweep's."),
        ),
        tool(
            stop_sweep,
            title="Stop a sweep",
            description="Stop a sweep as a whole: no new trials start, and running ones stop gracefully "
            "(resumable).",
            annotations=STOPS,
            returns=output("As run_sweep's."),
        ),
    ]


@contextlib.contextmanager
def named(sweep_id: str) -> Iterator[None]:
    """An unknown sweep id's refusal says where an agent finds sweep ids (the service's hint names
    a CLI command)."""
    try:
        yield
    except RunNotFound as exc:
        raise RunNotFound(
            exc.message,
            hint="run_sweep returned its sweep_id; a trial's summary (list_experiments) names its sweep",
        ) from None


async def wait(app: App, sweeps: Sweeps, sweep_id: str, seconds: float, ctx: Context[Any, Any]) -> None:
    """Until the sweep ends or `seconds` pass, a progress notification at each trial that ends."""
    started = time.monotonic()
    reported, seen = -PROGRESS_EVERY_SECONDS, None
    with anyio.move_on_after(seconds):
        while True:
            record = await app.call(sweeps.record, sweep_id)
            if record["status"] != "running":
                return
            ended = sum(1 for t in record["trials"] if t["status"] not in _LIVE)
            waited = time.monotonic() - started
            if ended != seen or waited - reported >= PROGRESS_EVERY_SECONDS:
                line = f"{ended} of {record['max_trials']} trials ended; {len(record['trials'])} started"
                await ctx.report_progress(ended, record["max_trials"], line)
                reported, seen = waited, ended
            await anyio.sleep(app.poll_seconds)


async def view(app: App, answer: Mapping[str, Any]) -> dict[str, Any]:
    """The compact answer of a sweep (`shaped`), its best trial with the arguments its run got."""
    args: list[str] | None = None
    if answer.get("best") is not None:
        # To resume it with more steps; an unreadable record leaves the params to say what it ran.
        with contextlib.suppress(BackpropError):
            args = (await app.call(app.service.get, answer["best"]["run_id"]))["args"]
    return shaped(answer, args)


def shaped(answer: Mapping[str, Any], best_args: list[str] | None) -> dict[str, Any]:
    """A sweep's answer (`sweeps.shapes.SweepAnswer`) as the tools give it: compact, rounded, long
    values cut, and within ANSWER_BYTES."""
    best = answer.get("best")
    shown_best: dict[str, Any] | None = None
    if best is not None:
        shown_best = {**best, "params": _params(best["params"]), "objective": rounded(best["objective"])}
        if best_args is not None:
            shown_best["args"] = short_args(best_args)
    spread = answer.get("spread")
    out: dict[str, Any] = {
        "sweep_id": answer["sweep_id"],
        "name": answer.get("name"),
        "status": answer["status"],
        "status_detail": answer.get("status_detail"),
        "metric": answer["metric"],
        "mode": answer["mode"],
        "method": answer["method"],
        "counts": answer["counts"],
        "trials": [_trial(t) for t in answer["trials"]],
        "trials_left_out": answer["trials_left_out"] or None,
        "best": shown_best,
        "spread": {k: rounded(v) for k, v in spread.items()} if spread else None,
        "param_summary": {name: _summary(s) for name, s in answer["param_summary"].items()} or None,
        "budget": answer["budget"],
        "next_step": next_step(answer, shown_best, left_out=True),  # the longer one, while it is cut
    }
    out = within(compact(out))
    out["next_step"] = next_step(answer, shown_best, left_out=bool(out.get("trials_left_out")))
    return out


def within(out: dict[str, Any]) -> dict[str, Any]:
    """The answer cut to ANSWER_BYTES: the worst trials shown go first (the best and the live ones
    stay longest), then the per-value tables, then the parameter summary."""
    trials: list[dict[str, Any]] = out.get("trials", [])
    while size(out) > ANSWER_BYTES and trials:
        best = out.get("best", {}).get("number")
        cut = next((i for i in range(len(trials) - 1, -1, -1) if _droppable(trials[i], best)), None)
        if cut is None:
            break
        trials.pop(cut)
        out["trials_left_out"] = out.get("trials_left_out", 0) + 1
    for summary in out.get("param_summary", {}).values():
        if size(out) <= ANSWER_BYTES:
            break
        summary.pop("by_value", None)
    if size(out) > ANSWER_BYTES:
        out.pop("param_summary", None)
    while size(out) > ANSWER_BYTES and trials:
        trials.pop()
        out["trials_left_out"] = out.get("trials_left_out", 0) + 1
    return out


def _summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    shown = {**summary, "best": _value(summary["best"])}
    if "by_value" in summary:
        shown["by_value"] = {_value(k): rounded(v) for k, v in summary["by_value"].items()}
    return shown


def _droppable(trial: Mapping[str, Any], best: object) -> bool:
    return trial.get("number") != best and trial.get("status") not in _LIVE


def _trial(trial: Mapping[str, Any]) -> dict[str, Any]:
    return {**trial, "params": _params(trial["params"]), "objective": rounded(trial.get("objective"))}


def _params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {name: _value(value) for name, value in params.items()}


def _value(value: Any) -> Any:
    if isinstance(value, str) and len(value) > VALUE_CHARS:
        return value[: VALUE_CHARS - 3] + "..."
    return rounded(value)


def next_step(answer: Mapping[str, Any], best: Mapping[str, Any] | None, *, left_out: bool) -> str:
    """One line for the sweep's state, in the tools' terms (`left_out`: the answer does not show
    every trial)."""
    sweep_id, metric, status = answer["sweep_id"], answer["metric"], answer["status"]
    if status == "running":
        return (
            "Running: get_sweep(sweep_id, wait_seconds=300) waits for its end (call again to keep "
            "waiting); stop_sweep stops it."
        )
    if status == "lost":
        return (
            f"Its runner died; its trials are ordinary runs: resume_run the unfinished ones, or run "
            f"`backprop sweep-resume {sweep_id}` to continue the sweep."
        )
    if best is None:
        failed = failed_trial(answer["trials"])
        if failed is not None:
            tool = "get_logs" if failed["status"] == "failed" else "get_status"
            return f"No trial ran to a result: {tool}({failed['run_id']!r}) shows why."
        if answer["trials"] and all(t["status"] in UNSCORED_STATES for t in answer["trials"]):
            return "No trial started: fix what status_detail says and run the sweep again."
        return f"No trial reported {metric!r}: get_logs(run_id) of a trial shows what it printed."
    where = f"Best: trial {best['number']} ({best['run_id']}), {metric} {best['objective']:g}"
    if left_out:
        # The list's sort is ascending unless the key starts with "-": the best trial comes first.
        order = metric if answer["mode"] == "min" else f"-{metric}"
        where += f"; list_experiments(sweep=sweep_id, sort={order!r}) lists every trial"
    if best.get("status") in ("timed_out", "stopped"):
        return f"{where}. Unfinished: resume_run(run_id) continues it from its checkpoint."
    return (
        f"{where}. To train it longer: resume_run(run_id, args=best.args with more steps, or "
        "max_run_minutes); or sweep again around its params."
    )
