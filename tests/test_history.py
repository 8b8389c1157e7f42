"""The metric history (issue 11, point 3): what the supervisor records of every reported value,
bounded per attempt; how attempts join; the metrics answer, compare by best or last, and the CLI's
`metrics` table and `status` curve."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backprop_mcp.core.errors import UsageError
from backprop_mcp.core.records import RunRecord, new_attempt, new_record
from backprop_mcp.core.store import Store
from backprop_mcp.runs import history
from backprop_mcp.runs.events import is_plain_progress, parse_line
from backprop_mcp.runs.metrics import downsample
from backprop_mcp.runs.recorder import Recorder, Series
from backprop_mcp.runs.requests import RunRequest
from backprop_mcp.runs.service import Service
from tests.fault_helpers import start, supervisor_pid
from tests.helpers import FIXTURES, cli, cli_json, unique_id, wait_for_end, wait_until

# The default answer (3 metrics) of three long runs with six metrics each, compact JSON: about
# 800 bytes per curve of 50 points (5-digit values, 4-digit steps) and its figures.
METRICS_ANSWER_BUDGET = 8_000
# The same runs at 20 points a curve: what an agent's answer may cost by default (issue 11: no
# answer over 4 KB unless the agent asks for more).
SMALL_METRICS_ANSWER_BUDGET = 4_000


def _run(service: Service, fixture: str, run_id: str, *args: str, **options: object) -> None:
    request = RunRequest(script=str(FIXTURES / fixture), args=list(args), run_id=run_id, options=options)
    service.start(request)


def _ended(service: Service, fixture: str, run_id: str, *args: str) -> None:
    _run(service, fixture, run_id, *args)
    assert wait_for_end(service, run_id)["status"] == "completed"


def _stored(service: Service, run_id: str, attempt: int = 1) -> dict[str, object]:
    path = service.store.run_dir(run_id) / "history" / f"{attempt}.json"
    data: dict[str, object] = json.loads(path.read_bytes())
    return data


def _compact(data: object) -> int:
    return len(json.dumps(data, separators=(",", ":")))


# -- recording, in-process ----------------------------------------------------------------------------


def test_a_series_stays_bounded_and_keeps_its_first_last_lowest_and_highest_points() -> None:
    rng = random.Random(7)
    values = [rng.gauss(0, 1) for _ in range(200_000)]
    one_by_one, in_batches = Series(), Series()
    for x, y in enumerate(values):
        one_by_one.add(x, y)
    for at in range(0, len(values), 997):
        batch = values[at : at + 997]
        in_batches.add_many(batch, lambda i, at=at: at + i)  # type: ignore[misc]
    low, high = values.index(min(values)), values.index(max(values))
    for series in (one_by_one, in_batches):
        xs, ys = series.points()
        assert len(xs) <= history.MAX_POINTS and series.count == len(values)
        assert xs == sorted(xs)  # reported order
        assert {0, len(values) - 1, low, high} <= set(xs)
        assert min(ys) == min(values) and max(ys) == max(values)
    assert one_by_one.points() == in_batches.points()


_PLAIN_KEYS = st.fixed_dictionaries(
    {},
    optional={
        "event": st.just("progress"),
        "step": st.integers(0, 10**6),
        "total": st.integers(1, 10**6),
        "loss": st.floats(-1e6, 1e6, allow_nan=False) | st.integers(-1000, 1000),
    },
)


@given(st.lists(st.lists(_PLAIN_KEYS, min_size=1, max_size=30), max_size=8))
def test_folding_plain_progress_lines_records_what_parsing_each_line_would(
    batches: list[list[dict[str, object]]],
) -> None:
    """The supervisor's fast path (a run of plain lines at once) must give the series and the best
    that parsing every line gives."""
    fast, slow = Recorder(Path("unused"), "r", 1), Recorder(Path("unused"), "r", 1)
    for batch in batches:
        lines = [json.dumps(entry).encode() for entry in batch]
        lines = [line for line in lines if is_plain_progress(line)]
        if not lines:
            continue
        fast.observe_plain(lines)
        for line in lines:
            for event in parse_line(line).events:
                slow.observe(event)
    assert fast.document() == slow.document()
    assert fast.step == slow.step


def test_folding_a_long_flood_in_uneven_batches_matches_parsing_each_line() -> None:
    rng = random.Random(3)
    lines = [
        json.dumps({"event": "progress", "step": s, "total": 10**6, "loss": rng.random()}).encode()
        for s in range(1, 30_001)
    ]
    fast, slow = Recorder(Path("unused"), "r", 1), Recorder(Path("unused"), "r", 1)
    at = 0
    while at < len(lines):
        size = rng.randint(1, 2_000)
        fast.observe_plain(lines[at : at + size])
        at += size
    for line in lines:
        for event in parse_line(line).events:
            slow.observe(event)
    assert fast.document() == slow.document()
    points = fast.document()["metrics"]["loss"]
    assert len(points["steps"]) <= history.MAX_POINTS and points["reported"] == 30_000


@given(st.integers(1, 3_000), st.integers(1, 60), st.data())
def test_downsampling_keeps_the_last_the_best_and_the_first_within_the_points_asked(
    n: int, points: int, data: st.DataObject
) -> None:
    best = data.draw(st.integers(0, n - 1))
    kept = downsample(n, points, best)
    assert kept == sorted(set(kept)) and len(kept) == min(n, points)
    assert n - 1 in kept
    assert points < 2 or best in kept
    assert points < 3 or 0 in kept


# -- joining attempts, from files the recorder wrote ----------------------------------------------------


def _attempts(
    tmp_path: Path, *attempts: tuple[str | None, list[tuple[int | None, float | dict[str, float]]]]
) -> tuple[Store, RunRecord]:
    """A store holding one run whose attempts reported these (step, loss) points; each attempt
    is (its resume_from, its points), a step of None meaning the script gave none, and a point of
    {name: value} other metrics at that step instead of a loss."""
    store = Store(tmp_path / "home").ensure()
    record = new_record(run_id="joined", script="train.py", created_at="2026-01-01T00:00:00.000Z")
    record["attempts"] = [new_attempt(i, resume) for i, (resume, _) in enumerate(attempts, start=1)]
    (store.run_dir("joined")).mkdir()
    for number, (_, points) in enumerate(attempts, start=1):
        recorder = Recorder(history.history_path(store, "joined", number), "joined", number)
        for step, loss in points:
            if isinstance(loss, dict):
                line = json.dumps({"step": step, "metrics": loss})
            else:
                line = json.dumps({"step": step, "loss": loss} if step is not None else {"loss": loss})
            for event in parse_line(line.encode()).events:
                recorder.observe(event)
        if points:
            recorder.write()
    return store, record


def test_a_resume_from_a_checkpoint_replaces_the_points_from_its_first_step_on(tmp_path: Path) -> None:
    store, record = _attempts(
        tmp_path,
        (None, [(1, 1.0), (2, 0.9), (3, 0.8), (4, 0.7)]),
        ("ckpt-2", [(3, 0.5), (4, 0.4), (5, 0.3)]),
        ("ckpt-4", [(5, 0.2), (6, 0.1)]),
    )
    assert history.series(store, record, "loss") == [
        (1, 1.0),
        (2, 0.9),
        (3, 0.5),
        (4, 0.4),
        (5, 0.2),
        (6, 0.1),
    ]
    assert history.joins(store, record) == [3, 5]


def test_a_resume_from_scratch_restarts_the_curve_and_an_attempt_without_history_changes_nothing(
    tmp_path: Path,
) -> None:
    store, record = _attempts(
        tmp_path,
        (None, [(1, 1.0), (2, 0.9)]),
        ("ckpt-2", [(3, 0.5)]),
        (None, []),  # queued and stopped before it started: no file
        (None, [(2, 2.0), (3, 1.5)]),  # its first report comes at step 2: step 1 is not kept either
    )
    assert history.series(store, record, "loss") == [(2, 2.0), (3, 1.5)]
    assert history.joins(store, record) == []
    assert history.names(store, record) == ["loss"]


def test_a_metric_only_attempts_off_the_curve_reported_is_not_named_and_a_restart_is_said(
    tmp_path: Path,
) -> None:
    # Attempt 2 resumes at step 2, replacing all attempt 1 reported of val_loss.
    store, record = _attempts(
        tmp_path, (None, [(1, 1.0), (2, {"val_loss": 0.5})]), ("ckpt-1", [(2, 0.8), (3, 0.7)])
    )
    stored = history.load(store, record)
    assert stored.series("val_loss") == [] and stored.names() == ["loss"] and stored.restarted is None
    # Attempt 3 starts from scratch: acc, reported by attempt 1 only, is off the curve too.
    store, record = _attempts(
        tmp_path / "restarted",
        (None, [(1, 1.0), (2, {"acc": 0.5})]),
        ("ckpt-2", [(3, 0.9)]),
        (None, [(1, 2.0), (2, {"f1": 0.1})]),
    )
    stored = history.load(store, record)
    assert stored.names() == ["loss", "f1"] and stored.restarted == 3 and stored.joins() == []


def test_attempts_of_a_script_that_gives_no_steps_follow_one_another(tmp_path: Path) -> None:
    store, record = _attempts(
        tmp_path, (None, [(None, 1.0), (None, 0.9)]), ("ckpt", [(None, 0.8), (None, 0.7), (None, 0.6)])
    )
    assert history.series(store, record, "loss") == [(1, 1.0), (2, 0.9), (3, 0.8), (4, 0.7), (5, 0.6)]
    assert history.joins(store, record) == [3]


# -- real runs ----------------------------------------------------------------------------------------


def test_a_loss_that_dips_then_rises_keeps_its_dip_and_compare_ranks_by_best_or_last(
    service: Service, env: dict[str, str]
) -> None:
    dipped = unique_id("dipped")
    steady = unique_id("steady")
    _ended(service, "loss_dips_then_rises.py", dipped, "0.5", "0.1", "0.9")
    _ended(service, "loss_dips_then_rises.py", steady, "0.7", "0.5")
    curve = service.metrics([dipped])["runs"][0]["metrics"]["loss"]
    assert (curve["steps"], curve["values"]) == ([1, 2, 3], [0.5, 0.1, 0.9])
    assert (curve["best"], curve["best_step"], curve["last"], curve["reported"]) == (0.1, 2, 0.9, 3)
    by_best = service.compare([dipped, steady], by="best")
    assert by_best["ranked_by"] == "best" and by_best["top_run_id"] == dipped
    assert [(r["run_id"], r["value"], r["best_value"], r["last_value"]) for r in by_best["runs"]] == [
        (dipped, 0.1, 0.1, 0.9),
        (steady, 0.5, 0.5, 0.5),
    ]
    by_last = cli_json(env, "compare", dipped, steady, "--by", "last")
    assert by_last["ranked_by"] == "last" and by_last["top_run_id"] == steady
    assert [(r["run_id"], r["value"]) for r in by_last["runs"]] == [(steady, 0.5), (dipped, 0.9)]
    text = cli(env, "compare", dipped, steady, "--by", "best")
    assert text.returncode == 0, text.stderr
    assert "ranked by the best loss seen" in text.stdout
    assert "best loss 0.1 (last 0.9)" in text.stdout.splitlines()[1]


def test_a_flood_of_plain_progress_lines_keeps_the_bound_and_the_true_extremes(service: Service) -> None:
    flood = unique_id("flood")
    _ended(service, "floods_plain_progress_with_a_dip.py", flood, "50000", "33331", "41117")
    stored = _stored(service, flood)["metrics"]["loss"]  # type: ignore[index]
    assert len(stored["steps"]) <= history.MAX_POINTS and stored["reported"] == 50_000
    assert {1, 33_331, 41_117, 50_000} <= set(stored["steps"])
    curve = service.metrics([flood], points=10)["runs"][0]["metrics"]["loss"]
    assert (curve["best"], curve["best_step"], curve["last_step"]) == (0.001, 33_331, 50_000)
    assert len(curve["steps"]) == 10 and curve["steps"][0] == 1 and 33_331 in curve["steps"]
    by_best = service.compare([flood], by="best")["runs"][0]
    assert by_best["best_value"] == 0.001 and not by_best["ended_early"]


def test_resumed_attempts_join_on_one_curve_and_a_resume_from_scratch_restarts_it(
    service: Service, env: dict[str, str]
) -> None:
    joined = unique_id("joined")
    _ended(service, "trains_from_its_checkpoint.py", joined, "10", "5")  # steps 1-10, saved at 5
    service.resume(joined)  # from step 5: steps 6-15, saved at 10
    assert wait_for_end(service, joined)["status"] == "completed"
    answer = service.metrics([joined], metrics=["loss", "val_loss"])["runs"][0]
    loss, val = answer["metrics"]["loss"], answer["metrics"]["val_loss"]
    assert loss["steps"] == list(range(1, 16)) and answer["joins"] == [6]
    assert loss["values"] == [101, 102, 103, 104, 105, *range(206, 216)]
    assert val["steps"] == [2, 4, 6, 8, 10, 12, 14]
    assert val["values"] == [102.5, 104.5, 206.5, 208.5, 210.5, 212.5, 214.5]
    assert loss["reported"] == 20 and loss["best"] == 101
    table = cli(env, "metrics", joined)
    assert table.returncode == 0, table.stderr
    assert "| a resumed attempt joins at step 6" in table.stdout and "|" in table.stdout.splitlines()[2]
    service.resume(joined, from_scratch=True)  # steps 1-10 again
    assert wait_for_end(service, joined)["status"] == "completed"
    restarted = service.metrics([joined])["runs"][0]
    assert restarted["metrics"]["loss"]["values"] == list(range(301, 311)) and restarted["joins"] == []


def test_a_metric_without_a_step_takes_the_last_step_seen_and_a_script_without_steps_is_counted(
    service: Service,
) -> None:
    stepped = unique_id("stepped")
    counted = unique_id("counted")
    lines = [
        {"event": "progress", "step": 10, "loss": 0.5},
        {"event": "metric", "name": "val_loss", "value": 0.7},
        {"event": "metric", "name": "acc", "value": 0.2, "step": 12},
        {"event": "done", "metrics": {"final": 1.0}},
    ]
    _ended(service, "prints_each_argument_as_a_line.py", stepped, *map(json.dumps, lines))
    got = service.metrics([stepped], metrics=["loss", "val_loss", "acc", "final"])["runs"][0]["metrics"]
    assert {name: (s["steps"], s["values"]) for name, s in got.items()} == {
        "loss": ([10], [0.5]),
        "val_loss": ([10], [0.7]),
        "acc": ([12], [0.2]),
        "final": ([12], [1]),
    }
    stepless = [{"loss": 0.9}, {"loss": 0.8}, {"event": "metric", "name": "val_loss", "value": 0.85}]
    _ended(service, "prints_each_argument_as_a_line.py", counted, *map(json.dumps, stepless))
    got = service.metrics([counted], metrics=["loss", "val_loss"])["runs"][0]["metrics"]
    assert (got["loss"]["steps"], got["val_loss"]["steps"]) == ([1, 2], [3])


def test_the_history_keeps_as_many_names_as_the_record_and_the_loss() -> None:
    from backprop_mcp.runs.progress import MAX_METRICS

    assert history.MAX_NAMES == 1 + MAX_METRICS


def test_metric_names_are_bounded_and_the_rest_is_counted(service: Service) -> None:
    run_id = unique_id("names")
    lines = [json.dumps({"event": "metric", "name": f"m{i:03d}", "value": i, "step": i}) for i in range(100)]
    _ended(service, "prints_each_argument_as_a_line.py", run_id, json.dumps({"step": 0, "loss": 1}), *lines)
    names = history.names(service.store, service.get(run_id))
    assert len(names) == history.MAX_NAMES and names[0] == "loss"
    answer = service.metrics([run_id], metrics=["m099"])["runs"][0]
    assert answer["missing"] == ["m099"] and len(answer["available"]) == history.MAX_NAMES
    assert "36 value(s) of metrics past the first 65 names were not kept" in answer["note"]


def test_a_corrupt_newer_or_missing_history_falls_back_to_the_last_values_and_says_so(
    service: Service, env: dict[str, str]
) -> None:
    damaged = unique_id("damaged")
    _ended(service, "loss_dips_then_rises.py", damaged, "0.5", "0.1", "0.9")
    path = service.store.run_dir(damaged) / "history" / "1.json"
    path.write_bytes(b'{"schema_version": 1, "metrics": [')
    answer = service.metrics([damaged])["runs"][0]
    assert "corrupt" in answer["note"] and "moved to" in answer["note"] and "last values" in answer["note"]
    assert answer["metrics"]["loss"]["values"] == [0.9] and answer["metrics"]["loss"]["best"] == 0.9
    assert not path.exists() and list(path.parent.glob("1.json.corrupt-*"))
    assert service.compare([damaged], by="best")["runs"][0]["best_value"] == 0.9
    path.write_text(json.dumps({"schema_version": 99}), encoding="utf-8")
    newer = service.metrics([damaged])["runs"][0]
    assert "newer backprop" in newer["note"] and path.exists()
    path.unlink()
    text = cli(env, "metrics", damaged)
    assert text.returncode == 0 and "Traceback" not in text.stderr
    assert "no metric history was recorded (the run predates it)" in text.stdout
    status = cli(env, "status", damaged)
    assert status.returncode == 0 and "Traceback" not in status.stderr


def test_the_metrics_answer_of_three_long_runs_stays_within_its_budget(service: Service) -> None:
    long_1 = unique_id("long-1")
    long_2 = unique_id("long-2")
    long_3 = unique_id("long-3")
    for run_id in (long_1, long_2, long_3):
        _run(service, "reports_six_metrics.py", run_id, "3000")
    for run_id in (long_1, long_2, long_3):
        assert wait_for_end(service, run_id)["status"] == "completed"
    ids = [long_1, long_2, long_3]
    answer = service.metrics(ids)
    assert [list(run["metrics"]) for run in answer["runs"]] == [["loss", "acc", "val_loss"]] * 3
    assert all(len(s["steps"]) == 50 for run in answer["runs"] for s in run["metrics"].values())
    assert _compact(answer) <= METRICS_ANSWER_BUDGET
    assert _compact(service.metrics(ids, points=20)) <= SMALL_METRICS_ANSWER_BUDGET


def test_the_history_is_written_when_a_run_is_stopped_and_survives_its_supervisors_death(
    service: Service, tmp_path: Path
) -> None:
    gate = tmp_path / "never"
    stopped = start(service, "trains_until_told_to_finish.py", str(tmp_path / "s1"), str(gate))
    killed = start(service, "trains_until_told_to_finish.py", str(tmp_path / "s2"), str(gate))
    wait_until(lambda: (service.get(stopped)["step"] or 0) >= 3, what="a few steps")
    service.stop(stopped)
    record = wait_for_end(service, stopped)
    assert record["status"] == "stopped"
    # Written at the attempt's end: its last point is the record's last step.
    assert service.metrics([stopped])["runs"][0]["metrics"]["loss"]["last_step"] == record["step"]

    def written() -> bool:
        path = service.store.run_dir(killed) / "history" / "1.json"
        return path.exists() and len(json.loads(path.read_bytes())["metrics"]["loss"]["steps"]) >= 3

    wait_until(written, what="the history written while the run runs")
    os.kill(supervisor_pid(service, killed), signal.SIGKILL)
    assert wait_for_end(service, killed)["status"] == "lost"
    answer = service.metrics([killed])["runs"][0]
    assert "note" not in answer and len(answer["metrics"]["loss"]["steps"]) >= 3


def test_the_history_files_are_private(service: Service) -> None:
    private = unique_id("private")
    _ended(service, "loss_dips_then_rises.py", private)
    folder = service.store.run_dir(private) / "history"
    assert (folder.stat().st_mode & 0o777, (folder / "1.json").stat().st_mode & 0o777) == (0o700, 0o600)


# -- errors and the CLI ---------------------------------------------------------------------------------


def test_comparing_on_a_metric_no_run_reported_names_the_ones_they_did(
    service: Service, env: dict[str, str]
) -> None:
    counted = unique_id("counted")
    _ended(service, "counts_and_exits.py", counted, "3")
    with pytest.raises(UsageError, match=r"no run of these reported the metric 'val_acc'.*: loss, acc"):
        service.compare([counted], metric="val_acc")
    result = cli(env, "compare", counted, "--metric", "val_acc")
    assert result.returncode == 2 and "they reported: loss, acc" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"run_ids": []}, "1 or more run ids"),
        ({"run_ids": "counted"}, "a list of 1 or more run ids"),
        ({"run_ids": ["counted"] * 21}, "at most 20 runs"),
        ({"run_ids": ["counted"], "points": 0}, "from 1 to 1000"),
        ({"run_ids": ["counted"], "points": True}, "from 1 to 1000"),
        ({"run_ids": ["counted"], "metrics": "loss"}, "a list of metric names"),
        ({"run_ids": ["counted"], "metrics": [""]}, "1 to 200 characters"),
        ({"run_ids": ["counted"], "metrics": ["m"] * 17}, "at most 16 metrics"),
    ],
)
def test_bad_arguments_to_metrics_are_clear_errors(
    service: Service, arguments: dict[str, object], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        service.metrics(**arguments)  # type: ignore[arg-type]


def test_the_cli_shows_a_metrics_table_and_a_curve_in_status(service: Service, env: dict[str, str]) -> None:
    shown = unique_id("shown")
    _ended(service, "counts_and_exits.py", shown, "8")
    table = cli(env, "metrics", shown, "--metric", "loss", "--metric", "acc", "--metric", "nope")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == shown and lines[1].split() == [
        "METRIC",
        "LAST",
        "BEST",
        "@",
        "STEP",
        "REPORTED",
        "CURVE",
    ]
    assert lines[2].split() == ["loss", "0.125", "0.125", "@", "8", "8", "█▄▃▂▂▁▁▁"]
    assert lines[3].split()[:5] == ["acc", "1", "1", "@", "8"]
    assert "not reported: nope (it reported: loss, acc)" in lines[4]
    as_json = cli_json(env, "metrics", shown, "--points", "3")
    assert as_json["runs"][0]["metrics"]["loss"]["steps"] == [1, 5, 8]
    status = cli(env, "status", shown)
    assert status.returncode == 0, status.stderr
    assert "curve      loss █▄▃▂▂▁▁▁  best 0.125 @ 8" in status.stdout
    bad = cli(env, "metrics", shown, "--points", "0")
    assert bad.returncode == 2 and "points must be a whole number from 1 to 1000" in bad.stderr
