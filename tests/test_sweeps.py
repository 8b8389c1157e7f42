"""Sweeps end to end: real runner processes starting real trial runs of a script whose metric is
a known function of its parameters (`scores_its_params.py`). Each test keeps its trials to a few
short steps; waits are bounded and wait for states in the store, never for time to pass."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from backprop_mcp.core.clock import parse_iso
from backprop_mcp.core.errors import RunNotFound, RunStateError, StoreCorrupt, UsageError
from backprop_mcp.governor import proctree
from backprop_mcp.runs.service import Service
from backprop_mcp.sweeps.samplers import suggest
from backprop_mcp.sweeps.service import SweepRequest, Sweeps
from backprop_mcp.sweeps.shapes import SweepAnswer
from backprop_mcp.sweeps.space import parse_space
from tests.fault_helpers import modes
from tests.helpers import FIXTURES, WAIT_SECONDS, cli, cli_json, wait_until

SCRIPT = str(FIXTURES / "scores_its_params.py")


@pytest.fixture
def sweeps(env: dict[str, str], service: Service) -> Sweeps:
    # The runner looks at its trials often, so each test's sweep ends soon after its last trial.
    env["BACKPROP_SWEEP_POLL_SECONDS"] = "0.05"
    return Sweeps(service)


def known(params: dict[str, Any]) -> float:
    """The fixture's final val_loss for `steps` steps, as the script computes it."""
    act = 0.0 if params.get("act", "relu") == "relu" else 0.05
    return (float(params["x"]) - 0.3) ** 2 + 0.1 * (int(params["layers"]) - 2) ** 2 + act


def wait_for_sweep(sweeps: Sweeps, sweep_id: str, timeout: float = WAIT_SECONDS) -> SweepAnswer:
    def ended() -> SweepAnswer | None:
        answer = sweeps.get(sweep_id, all_trials=True)
        return answer if answer["status"] != "running" else None

    return wait_until(ended, timeout=timeout, what=f"sweep {sweep_id} to end")


def max_overlap(service: Service, run_ids: list[str]) -> int:
    """The most trials whose scripts ran at the same moment, from their records' start and end."""
    edges: list[tuple[float, int]] = []
    for run_id in run_ids:
        record = service.get(run_id)
        for attempt in record["attempts"]:
            start, end = parse_iso(attempt["started_at"]), parse_iso(attempt["ended_at"])
            if start is not None and end is not None:
                edges += [(start, 1), (end, -1)]
    running = most = 0
    for _, change in sorted(edges, key=lambda e: (e[0], e[1])):
        running += change
        most = max(most, running)
    return most


def test_a_grid_sweep_from_the_cli_finds_the_best_point_holds_max_parallel_and_outlives_its_starter(
    env: dict[str, str], service: Service, tmp_path: Path
) -> None:
    env = {**env, "BACKPROP_SWEEP_POLL_SECONDS": "0.05"}
    argv = [sys.executable, "-m", "backprop_mcp", "sweep", SCRIPT, "--param", "x=0,0.3,0.6"]
    argv += ["--param", "layers=1,2,3", "--metric", "val_loss", "--parallel", "4", "-p", "2", "--json"]
    argv += ["--", "--steps", "3", "--step-seconds", "0.05"]
    starter = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert starter.stderr is not None
    first = starter.stderr.readline().decode()
    assert first.startswith("sweep "), first
    sweep_id = first.split()[1].rstrip(":")
    sweeps = Sweeps(service)
    wait_until(lambda: sweeps.get(sweep_id)["trials"], what="the first trial")
    starter.kill()  # the view goes away mid-sweep; the sweep must not notice
    starter.communicate(timeout=WAIT_SECONDS)

    done = wait_for_sweep(sweeps, sweep_id)
    assert done["status"] == "completed", done["status_detail"]
    assert done["counts"] == {"completed": 9}
    assert done["best"] is not None
    assert done["best"]["params"] == {"x": 0.3, "layers": 2}
    assert done["best"]["objective"] == pytest.approx(known({"x": 0.3, "layers": 2}) + 1 / 3)
    run_ids = [t["run_id"] for t in done["trials"]]
    assert max_overlap(service, run_ids) <= 2  # the run option -p 2, below the sweep's --parallel 4

    shape = cli_json(env, "sweep-status", sweep_id)
    assert {"sweep_id", "status", "trials", "best"} <= shape.keys()
    assert set(shape["best"]) >= {"run_id", "params", "objective"}
    assert all({"run_id", "params", "status", "objective"} <= t.keys() for t in shape["trials"])
    assert "rho" in shape["param_summary"]["layers"]
    assert len(json.dumps(shape, separators=(",", ":"))) <= 4096

    page = service.list_runs(sweep=sweep_id, limit=50)
    assert sorted(r["run_id"] for r in page["runs"]) == sorted(run_ids)
    trial = service.get(run_ids[0])
    assert trial["sweep"] == {"id": sweep_id, "trial": 1, "params": done["trials"][0]["params"]}
    log = service.store.log_path(run_ids[0], 1).read_text("utf-8")
    given = json.loads(log.split("params: ", 1)[1].splitlines()[0])
    assert given == trial["sweep"]["params"]
    assert oct(modes(service.store.home)[f"sweeps/{sweep_id}/sweep.json"]) == oct(0o600)
    assert cli(env, "list", "--sweep", sweep_id).stdout.count(sweep_id) == 9
    # The sweep filter composes with the sort, and the next page's line keeps it.
    best_row = service.list_runs(sweep=sweep_id, sort="val_loss", limit=1)["runs"][0]
    assert best_row["run_id"] == done["best"]["run_id"]
    last = cli(env, "list", "--sweep", sweep_id, "--limit", "4").stdout.splitlines()[-1]
    assert last == f"more: backprop list --sweep={sweep_id} --limit=4 --cursor 4"


def test_a_seeded_random_sweep_finds_the_best_of_what_it_sampled_reproducibly(sweeps: Sweeps) -> None:
    params = {"x": "uniform(0,1)", "layers": "int(1,3)", "act": "choice(relu,tanh)"}
    started = sweeps.start(
        SweepRequest(
            script=SCRIPT,
            params=params,
            metric="val_loss",
            method="random",
            max_trials=8,
            seed=7,
            parallel=4,
            args=["--steps", "2"],
        )
    )
    done = wait_for_sweep(sweeps, started["sweep_id"])
    assert done["counts"] == {"completed": 8}
    space = parse_space(params)
    expected = [suggest("random", space, 7, n, [], budget=8) for n in range(1, 9)]
    assert [t["params"] for t in done["trials"]] == expected
    truth = min(done["trials"], key=lambda t: known(t["params"]))
    assert done["best"] is not None
    assert done["best"]["run_id"] == truth["run_id"]
    assert done["best"]["objective"] == pytest.approx(known(truth["params"]) + 0.5)


def test_pruning_stops_a_bad_trial_before_its_box_ends(sweeps: Sweeps, service: Service) -> None:
    started = sweeps.start(
        SweepRequest(
            script=SCRIPT,
            params={"x": [0.3, 0.35, 0.4, 3.0], "layers": [2]},
            metric="val_loss",
            parallel=1,
            # The bad trial's steps take a second each: unpruned, it would run 20 s; the median rule
            # can judge it from its second step on, so being pruned well before its end is no luck.
            args=["--steps", "20", "--bad-step-seconds", "1"],
            options={"max_run_minutes": 1},
        )
    )
    done = wait_for_sweep(sweeps, started["sweep_id"])
    bad = done["trials"][3]
    assert bad["status"] == "stopped" and bad.get("reason") == "pruned", bad
    assert bad.get("step", 0) < 20
    record = service.get(bad["run_id"])
    assert record["termination_reason"] == "pruned"
    assert "median" in (record["status_detail"] or "")
    assert [t["status"] for t in done["trials"][:3]] == ["completed"] * 3
    assert done["best"] is not None and done["best"]["params"]["x"] == 0.3
    assert done["next_step"].startswith("best: trial 1")


def _tpe_seed_with_a_bad_fourth_trial(space: Any, steps: int) -> int:
    """A seed whose TPE sweep, fed the fixture's true results, draws three good trials, then a bad
    one: the sweep is as deterministic as its sampler, so the test knows which trial to watch."""
    for seed in range(200):
        history: list[tuple[dict[str, Any], float | None]] = []
        for number in range(1, 5):
            params = suggest("tpe", space, seed, number, history, budget=4)
            assert params is not None
            history.append((params, round(known(params) + 1 / steps, 9)))
        if [known(p) > 1 for p, _ in history] == [False, False, False, True]:
            return seed
    raise AssertionError("no seed in 0..199 gives three good TPE trials, then a bad one")


def test_a_tpe_sweep_prunes_a_bad_trial_by_optunas_pruner(sweeps: Sweeps, service: Service) -> None:
    pytest.importorskip("optuna")
    params: dict[str, Any] = {"x": [0.3, 0.35, 0.4, 3.0], "layers": [2]}
    seed = _tpe_seed_with_a_bad_fourth_trial(parse_space(params), steps=20)
    started = sweeps.start(
        SweepRequest(
            script=SCRIPT,
            params=params,
            metric="val_loss",
            method="tpe",
            max_trials=4,
            seed=seed,
            parallel=1,
            # As in the median rule's test: unpruned, the bad trial would run 20 s.
            args=["--steps", "20", "--bad-step-seconds", "1"],
            options={"max_run_minutes": 1},
        )
    )
    done = wait_for_sweep(sweeps, started["sweep_id"])
    bad = done["trials"][3]
    assert bad["params"]["x"] == 3.0, done["trials"]
    assert bad["status"] == "stopped" and bad.get("reason") == "pruned", bad
    assert bad.get("step", 0) < 20
    record = service.get(bad["run_id"])
    assert record["termination_reason"] == "pruned"
    assert "Optuna's MedianPruner" in (record["status_detail"] or ""), record["status_detail"]
    assert [t["status"] for t in done["trials"][:3]] == ["completed"] * 3


@pytest.mark.parametrize(("kind", "expected"), [("best", 1 / 3), ("final", 1 / 3 + 0.03)])
def test_the_best_objective_is_read_from_the_metric_history(
    sweeps: Sweeps, kind: str, expected: float
) -> None:
    # val_loss falls to 1/3 at step 3, then rises to 1/3 + 0.03 at step 6: only the history has the dip.
    started = sweeps.start(
        SweepRequest(
            script=SCRIPT,
            params={"x": [0.3], "layers": [2]},
            metric="val_loss",
            objective=kind,
            args=["--steps", "6", "--overfit-after", "3"],
        )
    )
    done = wait_for_sweep(sweeps, started["sweep_id"])
    assert done["best"] is not None
    assert done["best"]["objective"] == pytest.approx(expected, abs=1e-5)


def test_a_killed_runner_leaves_a_lost_sweep_that_resume_continues(sweeps: Sweeps, service: Service) -> None:
    started = sweeps.start(
        SweepRequest(
            script=SCRIPT,
            params={"x": [0.0, 0.3, 0.6], "layers": [2]},
            metric="val_loss",
            parallel=1,
            # 2 s a trial: long enough that trial 1 still runs when the lost sweep is asked to stop.
            args=["--steps", "20", "--step-seconds", "0.1"],
            prune=False,
        )
    )
    sweep_id = started["sweep_id"]
    wait_until(
        lambda: any(t["status"] == "running" for t in sweeps.get(sweep_id)["trials"]), what="a running trial"
    )
    record = sweeps.record(sweep_id)
    assert record["runner_pid"] is not None
    os.kill(record["runner_pid"], signal.SIGKILL)
    wait_until(
        lambda: not proctree.is_alive(record["runner_pid"], record["runner_started"]), what="runner gone"
    )

    # As if it died between creating trial 1's run and recording that it did.
    with sweeps.store.lock(sweep_id):
        stored = sweeps.store.read(sweep_id)
        stored["trials"][0]["status"] = "starting"
        sweeps.store.write(stored)
    lost = sweeps.get(sweep_id)
    assert lost["status"] == "lost"
    assert "resume" in lost["next_step"]
    assert lost["trials"][0]["status"] in ("running", "completed"), lost["trials"]  # its run's state
    if lost["trials"][0]["status"] == "running":
        with pytest.raises(RunStateError, match=r"already ended.*still run") as refused:
            sweeps.stop(sweep_id)
        assert lost["trials"][0]["run_id"] in refused.value.message

    resumed = sweeps.resume(sweep_id)
    assert resumed["status"] == "running"
    with pytest.raises(RunStateError, match="is running"):
        sweeps.resume(sweep_id)
    done = wait_for_sweep(sweeps, sweep_id)
    assert done["status"] == "completed", done["status_detail"]
    assert [t["number"] for t in done["trials"]] == [1, 2, 3]
    assert all(t["status"] == "completed" for t in done["trials"])
    assert done["best"] is not None and done["best"]["params"] == {"x": 0.3, "layers": 2}
    with pytest.raises(RunStateError, match="nothing left to run"):
        sweeps.resume(sweep_id)
    with pytest.raises(RunStateError, match="every point of its grid") as spent:
        sweeps.resume(sweep_id, max_trials=10)
    assert "--trials" not in (spent.value.hint or "")


def test_a_stopped_sweep_stops_its_trials_gracefully_and_resume_continues_them(
    sweeps: Sweeps, service: Service
) -> None:
    started = sweeps.start(
        SweepRequest(
            script=SCRIPT,
            params={"x": [0.3, 0.5], "layers": [2]},
            metric="val_loss",
            parallel=2,
            args=["--steps", "15", "--step-seconds", "0.1"],
            options={"max_parallel": 1},
            prune=False,
        )
    )
    sweep_id = started["sweep_id"]

    def one_running_one_queued() -> bool:
        trials = sweeps.get(sweep_id)["trials"]
        states = sorted(t["status"] for t in trials)
        return states == ["queued", "running"] and any(t.get("step", 0) >= 2 for t in trials)

    wait_until(one_running_one_queued, what="one trial past step 2 and one queued")
    sweeps.stop(sweep_id)
    stopped = wait_for_sweep(sweeps, sweep_id)
    assert stopped["status"] == "stopped"
    assert [t["status"] for t in stopped["trials"]] == ["stopped", "stopped"]
    first = stopped["trials"][0]
    assert first.get("unfinished") is True and first["objective"] is not None
    assert service.get(stopped["trials"][1]["run_id"])["started_at"] is None  # the queued one never ran

    sweeps.resume(sweep_id)
    done = wait_for_sweep(sweeps, sweep_id)
    assert done["status"] == "completed", done["status_detail"]
    assert [t["status"] for t in done["trials"]] == ["completed", "completed"]
    resumed = service.get(first["run_id"])
    assert resumed["attempt"] == 2 and resumed["attempts"][1]["resume_from"] is not None


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"metric": ""}, "metric must name"),
        ({"mode": "lowest"}, "mode must be min"),
        ({"objective": "mean"}, "objective must be final"),
        ({"method": "bayes"}, "choose grid, random or tpe"),
        ({"max_trials": 0}, "max_trials must be"),
        ({"parallel": 0}, "parallel must be"),
        ({"budget_minutes": -1}, "time budget must be"),
        ({"params": {"lr": "gauss(1,2)"}}, "is not a distribution"),
        ({"script": "missing.py"}, "script not found"),
        ({"options": {"max_run_minutes": "soon"}}, "max-run-minutes"),
        ({"sweep_id": "../x"}, "invalid sweep id"),
        # Its trials' runs are named "NAME #N": a name that fits a run but not a trial's is refused.
        ({"name": "n" * 199}, "a sweep name must be at most 197"),
    ],
)
def test_a_bad_sweep_is_refused_whole_before_anything_starts(
    sweeps: Sweeps, change: dict[str, Any], says: str
) -> None:
    request = SweepRequest(script=SCRIPT, params={"x": [0.1]}, metric="val_loss")._replace(**change)
    with pytest.raises(UsageError) as caught:
        sweeps.start(request)
    assert says in caught.value.message
    assert sweeps.list() == []


def test_bad_sweep_arguments_on_the_cli_are_clear_errors_without_a_traceback(
    env: dict[str, str], tmp_path: Path
) -> None:
    for args, says in [
        (["--param", "lr"], "NAME=VALUES"),
        (["--param", "lr=1", "--mode", "up"], "mode must be min"),
        ([], "give at least one --param"),
        (["--param", "x=1", "--param", "x=2"], "given twice"),
    ]:
        done = cli(env, "sweep", SCRIPT, *args, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert says in done.stderr and "Traceback" not in done.stderr


def test_a_sweep_whose_trials_all_fail_ends_failed_and_points_at_a_failed_trials_logs(
    env: dict[str, str], tmp_path: Path
) -> None:
    env = {**env, "BACKPROP_SWEEP_POLL_SECONDS": "0.05"}
    script = str(FIXTURES / "exits_nonzero.py")
    done = cli(env, "sweep", script, "--param", "x=1,2", "--json", cwd=tmp_path)
    assert done.returncode == 1, done.stderr  # as `backprop run` of a failing script
    answer = json.loads(done.stdout)
    assert answer["status"] == "failed", answer["status_detail"]
    assert answer["counts"] == {"failed": 2}
    assert answer["status_detail"].startswith("every trial failed"), answer["status_detail"]
    assert answer["next_step"].endswith(f"backprop logs {answer['trials'][0]['run_id']}"), answer["next_step"]


def test_a_corrupt_sweep_record_is_moved_aside_and_an_unknown_id_is_not_found(sweeps: Sweeps) -> None:
    folder = sweeps.store.make_folder("s1")
    (folder / "sweep.json").write_text('{"schema_version": 1, "sweep_id": "s1"}', encoding="utf-8")
    with pytest.raises(StoreCorrupt, match="moved to"):
        sweeps.get("s1")
    assert not (folder / "sweep.json").exists()
    with pytest.raises(RunNotFound, match="no sweep"):
        sweeps.get("s2")


def test_a_stop_that_names_a_prune_ends_the_run_stopped_with_reason_pruned(service: Service) -> None:
    from backprop_mcp.runs.requests import RunRequest
    from tests.helpers import wait_for_end

    run = service.start(RunRequest(script=SCRIPT, args=["--steps", "200", "--step-seconds", "0.05"]))
    wait_until(lambda: (service.get(run["run_id"])["step"] or 0) >= 1, what="a first step")
    service.stop(run["run_id"], pruned="pruned at step 1: worse than the median")
    ended = wait_for_end(service, run["run_id"])
    assert (ended["status"], ended["termination_reason"]) == ("stopped", "pruned")
    assert ended["status_detail"] == "pruned at step 1: worse than the median"
    assert ended["attempts"][-1]["termination_reason"] == "pruned"
