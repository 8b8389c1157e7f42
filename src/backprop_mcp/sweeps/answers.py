"""A sweep's answer from its record (`answer`): counts, the trials shown (bounded), the best, the
spread, the parameter summary, the budget and the one-line `next_step`. Pure functions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from backprop_mcp.core.records import ACTIVE_STATES
from backprop_mcp.sweeps import objective
from backprop_mcp.sweeps.shapes import STARTING, Best, SweepAnswer, SweepBudget, SweepRecord
from backprop_mcp.sweeps.space import parse_space

# An answer lists every trial up to this many; past it, the best few and the active ones.
MAX_SHOWN_TRIALS = 12
SHOWN_BEST = 8


def answer(record: SweepRecord, *, all_trials: bool = False) -> SweepAnswer:
    """The answer for a sweep record: bounded whatever its number of trials."""
    trials = record["trials"]
    mode = record["mode"]
    best = objective.best_trial(trials, mode)
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial["status"]] = counts.get(trial["status"], 0) + 1
    shown = list(trials)
    if not all_trials and len(trials) > MAX_SHOWN_TRIALS:
        ranked = sorted(objective.scored(trials), key=lambda t: objective.signed_key(t["objective"], mode))[
            :SHOWN_BEST
        ]
        keep = {t["number"] for t in ranked} | {
            t["number"] for t in trials if t["status"] in ACTIVE_STATES or t["status"] == STARTING
        }
        shown = [t for t in trials if t["number"] in keep]
    shown = [{k: v for k, v in t.items() if k != "resume"} for t in shown]  # type: ignore[misc]
    return SweepAnswer(
        sweep_id=record["sweep_id"],
        name=record["name"],
        status=record["status"],
        status_detail=record["status_detail"],
        metric=record["metric"],
        mode=mode,
        method=record["method"],
        counts=counts,
        trials=shown,
        trials_left_out=len(trials) - len(shown),
        best=best,
        spread=objective.spread(trials),
        param_summary=objective.param_summary(parse_space(record["params"]), trials, best, mode),
        budget=SweepBudget(
            max_trials=record["max_trials"],
            started=len(trials),
            parallel=record["parallel"],
            budget_minutes=record["budget_minutes"],
            elapsed_minutes=round(record["elapsed_seconds"] / 60, 2),
        ),
        next_step=next_step(record, best),
    )


def next_step(record: SweepRecord, best: Best | None) -> str:
    sweep_id, metric = record["sweep_id"], record["metric"]
    status = record["status"]
    if status == "running":
        started = len(record["trials"])
        return f"running ({started} of {record['max_trials']} trials started); ask again later or wait for it"
    if status == "lost":
        return f"its runner died; resume the sweep ({sweep_id}) to continue its trials"
    if best is None:
        failed = failed_trial(record["trials"])
        if failed is not None:
            command = "logs" if failed["status"] == "failed" else "status"
            return f"no trial ran to a result; see why: backprop {command} {failed['run_id']}"
        if record["trials"] and all(t["status"] in objective.UNSCORED_STATES for t in record["trials"]):
            return "no trial started; fix what status_detail says and start the sweep again"
        return f"no trial reported {metric!r}; read a trial's logs to see what it printed"
    where = f"best: trial {best['number']} ({best['run_id']}), {metric} {best['objective']:g}"
    if best["status"] in ("timed_out", "stopped"):
        return f"{where}, unfinished: resume its run to continue it"
    return f"{where}; resume its run for longer, or sweep again around its params"


def failed_trial(trials: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """When no trial ran to a result (each failed, was rejected or lost): the first one whose run
    exists, a failed one first (its logs say why), else None."""
    if not trials or any(t["status"] not in objective.UNSCORED_STATES for t in trials):
        return None
    runs = [t for t in trials if t.get("reason") != "start_failed"]
    return next((t for t in runs if t["status"] == "failed"), runs[0] if runs else None)
