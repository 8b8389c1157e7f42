"""The samplers: which parameters trial N of a sweep gets. Each is a pure function of the space,
the seed, the trial number and the results so far (`suggest`), so a runner that dies and a resumed
sweep carry no sampler state: grid (every point, in order; shuffled by the seed when the budget
covers only part of it), random (seeded per trial), and TPE through Optuna, imported only here and
only when asked for."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from typing import Any, Literal

from backprop_mcp.core.errors import UsageError
from backprop_mcp.sweeps.space import Dimension, Params, Value, grid_size

Method = Literal["grid", "random", "tpe"]
METHODS: tuple[str, ...] = ("grid", "random", "tpe")
OPTUNA_EXTRA = 'pip install "backprop-mcp[optuna]"'
# TPE samples at random until this many trials have results (a third of a short sweep's budget):
# Optuna's default of 10 would leave a 6-trial sweep entirely random.
TPE_STARTUP_TRIALS = 10
# Sampled numbers keep this many significant digits: the value the script gets, the value stored
# and the value shown are then the same short number.
SIGNIFICANT_DIGITS = 6

History = Sequence[tuple[Params, float | None]]
"""The trials so far, in order: their parameters and objective (None while unscored or failed)."""


def check_method(method: str, space: list[Dimension]) -> None:
    """A method that can sample this space; UsageError otherwise."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose grid, random or tpe")
    if method == "grid" and grid_size(space) is None:
        continuous = next(d.name for d in space if not d.discrete)
        raise UsageError(
            f"a grid needs a list of values for every parameter, but {continuous!r} is a distribution; "
            "use method random or tpe, or give it a list"
        )
    if method == "tpe":
        optuna_module()


def optuna_module() -> Any:
    """Optuna, imported on first use; UsageError naming the extra when it is not installed."""
    try:
        import optuna
    except ImportError:
        raise UsageError(f"method tpe needs Optuna, which is not installed: {OPTUNA_EXTRA}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def suggest(
    method: str, space: list[Dimension], seed: int, number: int, history: History, *, budget: int
) -> Params | None:
    """The parameters of trial `number` (from 1); None when a grid has no point left."""
    if method == "grid":
        return _grid(space, seed, number, budget)
    if method == "tpe":
        return _tpe(space, seed, number, history, budget)
    rng = random.Random(f"{seed}/{number}")  # noqa: S311 - reproducible sampling, not secrecy
    return {dim.name: _draw(dim, rng) for dim in space}


def _grid(space: list[Dimension], seed: int, number: int, budget: int) -> Params | None:
    size = grid_size(space) or 0
    if number > size:
        return None
    order = list(range(size))
    if budget < size:
        # Part of the grid only: a spread of it, not its first corner.
        random.Random(seed).shuffle(order)  # noqa: S311 - reproducible sampling, not secrecy
    index = order[number - 1]
    params: Params = {}
    for dim in reversed(space):
        index, at = divmod(index, len(dim.values))
        params[dim.name] = dim.values[at]
    return {dim.name: params[dim.name] for dim in space}


def grid_points(space: list[Dimension]) -> list[Params]:
    """Every point of a grid, in the order `suggest` gives them when the budget covers it."""
    names = [dim.name for dim in space]
    return [dict(zip(names, point, strict=True)) for point in itertools.product(*(d.values for d in space))]


def _rounded(dim: Dimension, value: float) -> float:
    return min(max(float(f"{value:.{SIGNIFICANT_DIGITS}g}"), dim.low), dim.high)


def _draw(dim: Dimension, rng: random.Random) -> Value:
    if dim.discrete:
        return rng.choice(dim.values)
    if dim.kind == "uniform":
        return _rounded(dim, rng.uniform(dim.low, dim.high))
    if dim.kind == "loguniform":
        return _rounded(dim, math.exp(rng.uniform(math.log(dim.low), math.log(dim.high))))
    if dim.kind == "int":
        return rng.randint(int(dim.low), int(dim.high))
    # intlog: uniform in log space over [low, high + 1), floored, so each end is as likely as its width.
    value = math.exp(rng.uniform(math.log(dim.low), math.log(dim.high + 1)))
    return min(int(value), int(dim.high))


def _tpe(space: list[Dimension], seed: int, number: int, history: History, budget: int) -> Params:
    optuna = optuna_module()
    distributions = {dim.name: _distribution(optuna, dim) for dim in space}
    direction = "minimize"  # the runner passes objectives already signed so that lower is better
    startup = max(2, min(TPE_STARTUP_TRIALS, budget // 3))
    # A fresh sampler per trial, seeded by the trial number: the same history and seed give the
    # same suggestion, and no two start-up trials share a random draw.
    sampler = optuna.samplers.TPESampler(seed=(seed * 1_000_003 + number) % 2**31, n_startup_trials=startup)
    study = optuna.create_study(direction=direction, sampler=sampler)
    for params, value in history:
        if any(name not in params for name in distributions):
            continue
        state = optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL
        known = {name: params[name] for name in distributions}
        study.add_trial(
            optuna.trial.create_trial(params=known, distributions=distributions, value=value, state=state)
        )
    trial = study.ask(distributions)
    return {dim.name: _from_optuna(dim, trial.params[dim.name]) for dim in space}


def _distribution(optuna: Any, dim: Dimension) -> Any:
    dists = optuna.distributions
    if dim.discrete:
        return dists.CategoricalDistribution(list(dim.values))
    if dim.kind in ("uniform", "loguniform"):
        return dists.FloatDistribution(dim.low, dim.high, log=dim.kind == "loguniform")
    return dists.IntDistribution(int(dim.low), int(dim.high), log=dim.kind == "intlog")


def _from_optuna(dim: Dimension, value: Any) -> Value:
    if dim.discrete:
        return value  # type: ignore[no-any-return]  # one of dim.values, given to Optuna above
    if dim.kind in ("int", "intlog"):
        return int(value)
    return _rounded(dim, float(value))
