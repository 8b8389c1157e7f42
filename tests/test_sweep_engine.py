"""The sweep engine without processes: the space and its errors, the samplers (grid, seeded
random, TPE against random on a known function), scoring, the summary and the median rule."""

from __future__ import annotations

import statistics
import sys
from typing import Any

import pytest

from backprop_mcp.core.errors import UsageError
from backprop_mcp.core.records import new_record
from backprop_mcp.sweeps import objective, pruning
from backprop_mcp.sweeps.samplers import check_method, grid_points, suggest
from backprop_mcp.sweeps.shapes import Trial
from backprop_mcp.sweeps.space import Params, parse_cli_param, parse_space, trial_args


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({}, "params must map"),
        ([1, 2], "params must map"),
        ({"lr": "0.1"}, "is not a distribution"),
        ({"lr": "normal(0,1)"}, "is not a distribution"),
        ({"lr": "uniform(1)"}, "takes two bounds"),
        ({"lr": "uniform(2,1)"}, "a < b"),
        ({"lr": "loguniform(0,1)"}, "above 0"),
        ({"n": "int(1.5,3)"}, "whole numbers"),
        ({"n": "intlog(0,8)"}, "at least 1"),
        ({"lr": []}, "has no values"),
        ({"lr": [float("nan")]}, "not a finite number"),
        ({"lr": [{"a": 1}]}, "is not a value"),
        ({"bad name": [1]}, "is not allowed"),
        ({"--lr": [1]}, "is not allowed"),
        ({"lr": 3}, "is not a list of values"),
    ],
)
def test_a_bad_space_is_a_clear_error_naming_what_is_allowed(params: object, says: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_space(params)
    assert says in caught.value.message


def test_spaces_parse_lists_and_each_distribution() -> None:
    space = parse_space(
        {
            "lr": "loguniform(1e-4, 1e-1)",
            "x": "uniform(-1,1)",
            "n": "int(1,4)",
            "w": "intlog(1,1024)",
            "act": "choice(relu, tanh)",
            "layers": [1, 2, 3],
        }
    )
    assert [d.kind for d in space] == ["loguniform", "uniform", "int", "intlog", "choice", "list"]
    assert space[4].values == ("relu", "tanh")
    assert [d.numeric for d in space] == [True, True, True, True, False, True]


def test_cli_params_read_values_distributions_and_json_lists() -> None:
    assert parse_cli_param("layers=1,2,3") == ("layers", [1, 2, 3])
    assert parse_cli_param("lr=loguniform(1e-4,1e-1)") == ("lr", "loguniform(1e-4,1e-1)")
    assert parse_cli_param("act=relu,tanh") == ("act", ["relu", "tanh"])
    assert parse_cli_param('x=[0.5, "a", true]') == ("x", [0.5, "a", True])
    assert parse_cli_param("flag=true,false") == ("flag", [True, False])
    with pytest.raises(UsageError, match="NAME=VALUES"):
        parse_cli_param("lr")


def test_params_reach_the_script_as_flags_or_through_a_template() -> None:
    params: Params = {"lr": 0.001, "layers": 3, "act": "relu"}
    assert trial_args(["--epochs", "2"], params) == [
        "--epochs",
        "2",
        "--lr",
        "0.001",
        "--layers",
        "3",
        "--act",
        "relu",
    ]
    assert trial_args(["--lr={lr}", "-n", "{layers}"], params) == ["--lr=0.001", "-n", "3"]


def test_a_grid_gives_every_point_once_then_none() -> None:
    space = parse_space({"a": [1, 2], "b": ["x", "y", "z"]})
    got = [suggest("grid", space, 0, n, [], budget=6) for n in range(1, 7)]
    assert got == grid_points(space)
    assert suggest("grid", space, 0, 7, [], budget=6) is None
    partial = [suggest("grid", space, 5, n, [], budget=3) for n in range(1, 4)]
    assert len({tuple(p.items()) for p in partial if p}) == 3


def test_a_grid_of_distributions_and_an_unknown_method_are_refused() -> None:
    with pytest.raises(UsageError, match="use method random or tpe"):
        check_method("grid", parse_space({"lr": "uniform(0,1)"}))
    with pytest.raises(UsageError, match="choose grid, random or tpe"):
        check_method("bayes", parse_space({"lr": [1]}))


def test_tpe_without_optuna_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    with pytest.raises(UsageError, match=r'pip install "backprop-mcp\[optuna\]"'):
        check_method("tpe", parse_space({"lr": "uniform(0,1)"}))


def test_random_sampling_is_reproducible_by_seed_and_stays_in_bounds() -> None:
    space = parse_space(
        {"lr": "loguniform(1e-4,1e-1)", "n": "intlog(1,64)", "k": "int(2,5)", "c": "choice(a,b)"}
    )
    first = [suggest("random", space, 42, n, [], budget=50) for n in range(1, 51)]
    assert first == [suggest("random", space, 42, n, [], budget=50) for n in range(1, 51)]
    assert first != [suggest("random", space, 43, n, [], budget=50) for n in range(1, 51)]
    for params in first:
        assert params is not None
        assert 1e-4 <= float(params["lr"]) <= 1e-1
        assert 1 <= int(params["n"]) <= 64
        assert 2 <= int(params["k"]) <= 5
        assert params["c"] in ("a", "b")
        assert len(repr(params["lr"])) <= 12  # six significant digits, as the script gets it


def _known(params: dict[str, object]) -> float:
    """A smooth bowl with its minimum at lr=1e-2.5, width=48 (the held-in function)."""
    import math

    lr, width = float(params["lr"]), float(params["width"])  # type: ignore[arg-type]
    return (math.log10(lr) + 2.5) ** 2 + ((width - 48) / 32) ** 2


def _best_after(method: str, seed: int, budget: int) -> float:
    space = parse_space({"lr": "loguniform(1e-5,1e-1)", "width": "int(1,128)"})
    history: list[tuple[dict[str, object], float | None]] = []
    for number in range(1, budget + 1):
        params = suggest(method, space, seed, number, history, budget=budget)  # type: ignore[arg-type]
        assert params is not None
        history.append((params, _known(params)))  # type: ignore[arg-type]
    return min(v for _, v in history if v is not None)


def test_tpe_with_a_seed_beats_random_on_the_same_budget_over_several_seeds() -> None:
    pytest.importorskip("optuna")
    seeds = range(5)
    tpe = [_best_after("tpe", seed, 30) for seed in seeds]
    rnd = [_best_after("random", seed, 30) for seed in seeds]
    assert statistics.median(tpe) < statistics.median(rnd)
    assert sum(t < r for t, r in zip(tpe, rnd, strict=True)) >= 4
    assert tpe == [_best_after("tpe", seed, 30) for seed in seeds]  # a seed makes it reproducible


def _record(status: str, *, reason: str | None = None, loss: float | None = None, **metrics: float) -> object:
    record = new_record(run_id="r", script="s", created_at="t", status=status, termination_reason=reason)
    record["loss"], record["metrics"] = loss, dict(metrics)
    return record


@pytest.mark.parametrize(
    ("status", "reason", "kind", "expected", "unfinished"),
    [
        ("completed", "exit_zero", "final", 0.5, False),
        ("completed", "exit_zero", "best", 0.2, False),
        ("timed_out", "deadline", "final", 0.5, True),
        ("stopped", "stop_requested", "best", 0.2, True),
        ("stopped", "pruned", "final", 0.5, False),
        ("failed", "exit_nonzero", "final", None, False),
        ("lost", "supervisor_lost", "best", None, False),
    ],
)
def test_a_trial_is_scored_by_its_state(
    status: str, reason: str, kind: str, expected: float | None, unfinished: bool
) -> None:
    record = _record(status, reason=reason, val_loss=0.5)
    points = [(1.0, 0.9), (2.0, 0.2), (3.0, 0.5)]
    got = objective_score(record, kind, points)
    assert got == objective.Score(expected, unfinished)


def objective_score(record: object, kind: str, points: list[tuple[float, float]]) -> objective.Score:
    return objective.score(record, "val_loss", "min", kind, lambda r, m: points)  # type: ignore[arg-type]


def _trial(number: int, value: float | None, status: str = "completed", **params: object) -> Trial:
    return Trial(number=number, run_id=f"t{number}", params=params, status=status, objective=value)  # type: ignore[typeddict-item]


def test_the_summary_names_the_best_the_spread_and_how_each_parameter_related() -> None:
    space = parse_space({"lr": "uniform(0,1)", "act": "choice(relu,tanh)"})
    trials = [
        _trial(1, 0.9, lr=0.9, act="tanh"),
        _trial(2, 0.5, lr=0.5, act="relu"),
        _trial(3, 0.1, lr=0.1, act="relu"),
        _trial(4, None, "failed", lr=0.05, act="relu"),
        _trial(5, 0.01, "running", lr=0.01, act="relu"),
    ]
    best = objective.best_trial(trials, "min")
    assert best is not None and best["run_id"] == "t3"
    assert objective.spread(trials) == {"min": 0.1, "median": 0.5, "max": 0.9, "scored": 3}
    summary = objective.param_summary(space, trials, best, "min")
    assert summary["lr"] == {"best": 0.1, "rho": 1.0}
    assert summary["act"] == {"best": "relu", "by_value": {"tanh": 0.9, "relu": 0.1}}
    assert objective.best_trial(trials, "max")["run_id"] == "t1"  # type: ignore[index]


def test_spearman_handles_ties_and_constant_sides() -> None:
    assert objective.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert objective.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert objective.spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)
    assert objective.spearman([1, 1, 1], [1, 2, 3]) is None


def _curve(base: float, steps: int) -> list[tuple[float, float]]:
    return [(float(s), base + 1 / s) for s in range(1, steps + 1)]


def test_a_live_trial_is_judged_by_its_records_latest_value_when_the_history_lags() -> None:
    record: Any = _record("running", val_loss=0.4)
    history = [(1.0, 0.9), (2.0, 0.6)]
    record["step"] = 5
    assert objective.with_latest(history, record, "val_loss") == [*history, (5.0, 0.4)]
    record["step"] = 2  # the history has caught up: nothing is added twice
    assert objective.with_latest(history, record, "val_loss") == history
    fresh: Any = _record("running")
    assert objective.with_latest([], fresh, "val_loss") == []  # nothing reported yet


def _ended(*curves: list[tuple[float, float]], status: str = "completed") -> list[pruning.Earlier]:
    reason = "pruned" if status == "pruned" else None
    return [pruning.Earlier(c, "stopped" if reason else status, reason, c[-1][1]) for c in curves]


def test_the_median_rule_stops_a_trial_worse_than_the_earlier_ones_at_its_step() -> None:
    curves = [_curve(0.1, 10), _curve(0.2, 10), _curve(0.3, 10)]
    earlier = _ended(*curves)
    why = pruning.verdict("random", _curve(2.0, 3), earlier, "min", "val_loss")
    assert why is not None and "median" in why and "step 3" in why and "Optuna" not in why
    assert pruning.verdict("grid", _curve(0.15, 3), earlier, "min", "val_loss") is None  # better
    assert pruning.verdict("random", _curve(2.0, 1), earlier, "min", "val_loss") is None  # too early to judge
    assert pruning.verdict("random", _curve(2.0, 3), earlier[:2], "min", "val_loss") is None  # too few
    short = _ended(_curve(0.1, 2), _curve(0.2, 2), _curve(0.3, 2))
    assert pruning.verdict("random", _curve(2.0, 3), short, "min", "val_loss") is None  # none reached step 3
    flipped = _ended(*[[(s, -v) for s, v in c] for c in curves])
    assert pruning.verdict("grid", [(s, -v) for s, v in _curve(2.0, 3)], flipped, "max", "acc") is not None


def test_a_tpe_sweep_prunes_by_optunas_median_pruner() -> None:
    pytest.importorskip("optuna")
    curves = [_curve(0.1, 10), _curve(0.2, 10), _curve(0.3, 10)]
    why = pruning.verdict("tpe", _curve(2.0, 3), _ended(*curves), "min", "val_loss")
    assert why is not None and "Optuna's MedianPruner" in why and "step 3" in why, why
    assert "median 0.5333 of 3 completed trials" in why  # 0.2 + 1/3 at step 3
    assert pruning.verdict("tpe", _curve(0.15, 3), _ended(*curves), "min", "val_loss") is None
    assert pruning.verdict("tpe", _curve(2.0, 1), _ended(*curves), "min", "val_loss") is None  # too early
    flipped = _ended(*[[(s, -v) for s, v in c] for c in curves])
    assert pruning.verdict("tpe", [(s, -v) for s, v in _curve(2.0, 3)], flipped, "max", "acc") is not None
    # The earlier trials' histories kept every other step only: each is judged by the value it
    # had reached at the live trial's step.
    sparse = _ended(*[[p for p in c if p[0] % 2 == 0] for c in curves])
    assert pruning.verdict("tpe", _curve(2.0, 3), sparse, "min", "val_loss") is not None


def test_optunas_pruner_counts_only_completed_trials_and_their_values_at_the_step() -> None:
    """Where Optuna's MedianPruner and the median rule disagree, a TPE sweep follows Optuna."""
    pytest.importorskip("optuna")
    bad = _curve(2.0, 3)
    curves = [_curve(0.1, 10), _curve(0.2, 10), _curve(0.3, 10)]
    # Still running, or pruned themselves: the median rule judges by them, Optuna waits for
    # completed trials (its n_startup_trials).
    for earlier in (_ended(*curves, status="running"), _ended(*curves, status="pruned")):
        assert pruning.verdict("random", bad, earlier, "min", "val_loss") is not None
        assert pruning.verdict("tpe", bad, earlier, "min", "val_loss") is None
    # Curves that dipped to 0.1 and rose to 5 by step 3: the median rule compares with their best
    # so far (0.1), Optuna with their values at step 3 (5), and 2.5 is better than that.
    risen = _ended(*[[(1.0, 0.1), (2.0, 0.1), (3.0, 5.0), (4.0, 5.0)] for _ in range(3)])
    assert pruning.verdict("random", _curve(2.0, 3), risen, "min", "val_loss") is not None
    assert pruning.verdict("tpe", _curve(2.0, 3), risen, "min", "val_loss") is None


def test_a_tpe_verdict_is_optunas_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    optuna = pytest.importorskip("optuna")
    curves = _ended(_curve(0.1, 10), _curve(0.2, 10), _curve(0.3, 10))
    monkeypatch.setattr(optuna.pruners.MedianPruner, "prune", lambda self, study, trial: False)
    assert pruning.verdict("tpe", _curve(2.0, 3), curves, "min", "val_loss") is None
    monkeypatch.setattr(optuna.pruners.MedianPruner, "prune", lambda self, study, trial: True)
    assert pruning.verdict("tpe", _curve(0.15, 3), curves, "min", "val_loss") is not None
