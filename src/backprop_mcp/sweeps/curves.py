"""Curves of runs and of a sweep's trials in one picture (`plot`), for `backprop plot --sweep` and
the plot_metrics tool: a sweep's trials are ordinary runs, drawn by `runs.plots` with each line
named by its trial's number and parameters. A sweep of more trials than a plot holds draws its
best ones and says so."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from backprop_mcp.core.answers import Plot
from backprop_mcp.core.errors import UsageError
from backprop_mcp.runs.plots import MAX_PLOT_RUNS
from backprop_mcp.runs.service import Service
from backprop_mcp.sweeps import objective
from backprop_mcp.sweeps.shapes import STARTING, SweepRecord


class Trials(NamedTuple):
    """The trials of a sweep to draw: their runs, their legend labels, the title and what was
    left out."""

    run_ids: list[str]
    labels: dict[str, str]
    title: str
    notes: list[str]


def plot(
    service: Service,
    run_ids: Sequence[str],
    *,
    sweep_id: str | None = None,
    metrics: Sequence[str] | None = None,
) -> Plot:
    """The curves of `run_ids` and of the trials of `sweep_id` (when given), as one PNG."""
    ids = list(dict.fromkeys(run_ids))
    if sweep_id is None:
        return service.plot(ids, metrics=metrics)
    if len(ids) >= MAX_PLOT_RUNS:
        raise UsageError(
            f"a plot holds {MAX_PLOT_RUNS} runs: with a sweep, give at most {MAX_PLOT_RUNS - 1} run ids"
        )
    from backprop_mcp.sweeps.service import Sweeps

    record = Sweeps(service).record(sweep_id)
    trials = trials_to_plot(record, MAX_PLOT_RUNS - len(ids), skip=ids)
    drawn = service.plot(
        [*ids, *trials.run_ids],
        metrics=metrics,
        labels=trials.labels,
        title=trials.title,
        lead=record["metric"],
    )
    drawn["notes"] = trials.notes + drawn["notes"]
    return drawn


def trials_to_plot(record: SweepRecord, room: int, *, skip: Sequence[str] = ()) -> Trials:
    """The sweep's trials that have a run, all of them when `room` holds them, else the best
    `room` by the sweep's objective (then the unscored, by number); in trial order."""
    sweep_id, metric, mode = record["sweep_id"], record["metric"], record["mode"]
    started = [t for t in record["trials"] if t["status"] != STARTING and t["run_id"] not in skip]
    if not started:
        raise UsageError(f"sweep {sweep_id} has no trial to draw yet", hint="plot it again once one runs")
    scored = {t["number"] for t in objective.scored(started)}
    ranked = sorted(
        started,
        key=lambda t: (
            t["number"] not in scored,
            objective.signed_key(t["objective"] if t["number"] in scored else None, mode),
            t["number"],
        ),
    )
    chosen = sorted(ranked[:room], key=lambda t: t["number"])
    best = objective.best_trial(record["trials"], mode)
    labels = {}
    for trial in chosen:
        params = " ".join(f"{name}={_value(value)}" for name, value in trial["params"].items())
        mark = " (best)" if best is not None and best["number"] == trial["number"] else ""
        labels[trial["run_id"]] = f"#{trial['number']}{mark} {params}"
    title = (
        f"sweep {record['name'] or sweep_id}: {metric}, {'lower' if mode == 'min' else 'higher'} is better"
    )
    notes = []
    if len(started) > room:
        title += f" (best {room} of {len(started)} trials)"
        notes.append(f"sweep {sweep_id}: drew the best {room} of its {len(started)} trials by {metric}")
    return Trials([t["run_id"] for t in chosen], labels, title, notes)


def _value(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
