"""Early stopping of TPE sweeps by Optuna's own pruner (`MedianPruner`). The runner keeps no
Optuna state, as with the sampler: each judgement builds an in-memory study from the sweep's
earlier trials (each a created trial in its state, its metric history as intermediate values) and
asks the pruner about the live trial. Optuna is imported only here and in `samplers`, only when a
TPE sweep runs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from backprop_mcp.core.records import ACTIVE_STATES
from backprop_mcp.sweeps.samplers import optuna_module
from backprop_mcp.sweeps.shapes import STARTING

Points = Sequence[tuple[float, float]]
Other = tuple[Points, str, "str | None", "float | None"]
"""An earlier trial: its metric history, its run's state, why it ended, its objective
(`pruning.Earlier`)."""

# States whose trial ended with a result Optuna can count (Optuna counts only COMPLETE trials).
SCORED_STATES = frozenset({"completed", "timed_out", "stopped"})


def verdict(mine: Points, earlier: Sequence[Other], mode: str, metric: str, *, min_trials: int) -> str | None:
    """Why the live trial should be pruned now (in words), as Optuna's MedianPruner decides, or
    None. `min_trials`: completed trials the pruner waits for (its n_startup_trials), and trials
    with a value at the step it needs (its n_min_trials)."""
    optuna = optuna_module()
    step = int(mine[-1][0])
    study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
    at_step: list[float] = []
    for points, status, reason, objective in earlier:
        values = _intermediate(points, step)
        state = _state(optuna, status, reason)
        value = None
        if state == optuna.trial.TrialState.COMPLETE:
            value = objective if objective is not None else (points[-1][1] if points else None)
            if value is None or not math.isfinite(value):
                state, value = optuna.trial.TrialState.FAIL, None
            elif step in values:
                at_step.append(values[step])
        study.add_trial(optuna.trial.create_trial(state=state, value=value, intermediate_values=values))
    live = _intermediate(mine, step)
    running = optuna.trial.TrialState.RUNNING
    study.add_trial(optuna.trial.create_trial(state=running, intermediate_values=live))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=min_trials, n_min_trials=min_trials)
    if not pruner.prune(study, study.trials[-1]):
        return None
    best = min(live.values()) if mode == "min" else max(live.values())
    median = f"the median {statistics.median(at_step):.4g}" if at_step else "the median"
    return (
        f"pruned at step {step} by Optuna's MedianPruner: best {metric} {best:.4g} so far is worse than "
        f"{median} of {len(at_step)} completed trials at that step"
    )


def _intermediate(points: Points, step: int) -> dict[int, float]:
    """A trial's values by whole step up to its end, finite only (Optuna prunes a NaN at once).
    The history keeps a sample of a long run's points, so another trial's steps need not line up
    with the live one's: a trial that got past `step` without a point there is given its latest
    value before it, the value it had reached at that step."""
    values = {int(s): v for s, v in points if math.isfinite(v)}
    if step not in values and points and points[-1][0] >= step:
        before = [v for s, v in points if s <= step and math.isfinite(v)]
        if before:
            values[step] = before[-1]
    return values


def _state(optuna: Any, status: str, reason: str | None) -> Any:
    states = optuna.trial.TrialState
    if status in ACTIVE_STATES or status == STARTING:
        return states.RUNNING
    if reason == "pruned":
        return states.PRUNED
    if status in SCORED_STATES:
        return states.COMPLETE
    return states.FAIL  # failed, lost, rejected: reported, never scored
