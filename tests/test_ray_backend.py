"""The ray backend against a real Ray head on loopback (one per test session, `ray_head`): runs
submitted, followed, time-boxed, stopped, resumed and listed through the CLI and the MCP tools over
stdio; their metrics and history as a local run's; a job killed on the cluster and a head that
goes away recorded truthfully; the cluster's admission and maxParallel; and the bad inputs."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from backprop_mcp.backends.ray_state import ray_queue
from backprop_mcp.core.errors import ClusterError, RunStateError, UsageError
from backprop_mcp.core.records import ACTIVE_STATES, TERMINAL_STATES
from backprop_mcp.runs.joblog import job_home, store_key
from backprop_mcp.runs.requests import RunRequest
from backprop_mcp.runs.service import Service
from backprop_mcp.runs.supervisor.job import ECHO_TAIL_LINES
from tests.helpers import (
    FIXTURES,
    cli,
    cli_json,
    isolated_env,
    no_survivors,
    unique_id,
    wait_for_end,
    wait_until,
)
from tests.ray_head import Head, kill_head, ray_command, start_head, stop_head
from tests.test_mcp_stdio import server_command
from tests.test_mcp_tools import call, wait_end
from tests.test_sweeps import known, max_overlap

pytestmark = pytest.mark.skipif(
    find_spec("ray") is None, reason="Ray is not installed: pip install 'backprop-mcp[ray]' (ray[default])"
)

# Bounds every wait on a ray run: a job's runtime environment is set up before its entrypoint runs
# (seconds on an idle machine, far more on a loaded 2-core runner).
WAIT = 120.0
# What a Ray dashboard takes in one upload (its client_max_size): a working directory packs to one.
UPLOAD_LIMIT = 100 * 1024**2
# How long the cluster may stay silent before a run is ended as lost, in the head-gone test: long
# enough that a busy reader's own retries do not trip it, short enough to keep the test quick.
SILENT_SECONDS = "5"
# The bound on the run's end once its head is gone: the silence above, and the slack of a loaded
# runner's reads (each refused at once); short, so that a check without the timeout is cheap.
SILENT_WAIT = 60.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def ray_env(tmp_path: Path, head: Head, **extra: str) -> dict[str, str]:
    return isolated_env(
        tmp_path / "home",
        BACKPROP_BACKEND="ray",
        RAY_ADDRESS=head.address,
        BACKPROP_RAY_STORAGE=str(tmp_path / "cluster"),
        **extra,
    )


def project_with(tmp_path: Path, **scripts: str) -> Path:
    """A project folder holding fixtures under new names (name=fixture file)."""
    folder = tmp_path / "project"
    folder.mkdir(exist_ok=True)
    for name, fixture in scripts.items():
        shutil.copy(FIXTURES / f"{fixture}.py", folder / f"{name}.py")
    return folder


@contextlib.contextmanager
def http_server() -> Iterator[int]:
    """A real HTTP server on loopback that is no Ray dashboard (it answers 404 to everything)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def silent_server() -> Iterator[tuple[int, Callable[[], int]]]:
    """A port that accepts connections and never answers (a hung head); and how many it accepted."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    accepted: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], lambda: len(accepted)
    finally:
        done.set()
        thread.join()
        for conn in [*accepted, listener]:
            conn.close()


def job_state(service: Service, run_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((service.store.run_dir(run_id) / "ray-job.json").read_text("utf-8"))
    return data


def running(service: Service, run_id: str) -> dict[str, Any]:
    """Wait until the run runs on the cluster and its supervisor there is known; its record."""

    def check() -> dict[str, Any] | None:
        record = service.get(run_id)
        assert record["status"] in ACTIVE_STATES, record
        supervisor = job_state(service, run_id).get("supervisor")
        return dict(record) if record["status"] == "running" and supervisor else None

    return wait_until(check, timeout=WAIT, what=f"run {run_id} to run on the cluster")


def logged(service: Service, run_id: str, text: str) -> None:
    wait_until(
        lambda: any(text in line for line in service.logs(run_id, tail=50)["lines"]),
        timeout=WAIT,
        what=f"{text!r} in the log of {run_id}",
    )


def test_the_cli_follows_a_ray_run_to_its_end_lists_it_and_resumes_it_from_its_checkpoint(
    ray_head: Head, tmp_path: Path
) -> None:
    r1 = unique_id("r1")
    l1 = unique_id("l1")
    project = project_with(tmp_path, train="trains_from_its_checkpoint")
    env = isolated_env(tmp_path / "home")  # the backend chosen on the command line alone
    ray = ("--backend", "ray", "--ray-address", ray_head.address.removeprefix("http://"))
    try:
        done = cli(env, "run", "train.py", *ray, "--run-id", r1, "--", "20", "10", cwd=project, timeout=WAIT)
        assert done.returncode == 0, done.stdout + done.stderr
        record = cli_json(env, "status", r1)
        assert (record["status"], record["termination_reason"], record["exit_code"]) == (
            "completed",
            "exit_zero",
            0,
        )
        assert (record["step"], record["loss"], record["metrics"]) == (20, 120.0, {"val_loss": 120.5})
        assert record["job_id"].startswith(f"backprop-{r1}-1-")
        assert (record["options"]["backend"], record["options"]["ray_address"]) == ("ray", ray_head.address)
        assert record["python_source"] == "cluster"
        assert record["cwd"] == str(project) and record["script"] == str(project / "train.py")
        lines = cli_json(env, "logs", r1, "--tail", "3")["lines"]
        assert lines[-1] == '{"event": "metric", "name": "val_loss", "value": 120.5, "step": 20}'

        # The same script run locally: the same record fields and the same metric history.
        done = cli(env, "run", "train.py", "--run-id", l1, "--", "20", "10", cwd=project, timeout=WAIT)
        assert done.returncode == 0, done.stderr
        local = cli_json(env, "status", l1)
        for field in ("status", "step", "loss", "metrics", "termination_reason", "exit_code", "total"):
            assert record[field] == local[field], field
        assert set(record) - {"job_id"} == set(local)
        curves = cli_json(env, "metrics", r1, l1)["runs"]
        assert curves[0]["metrics"] == curves[1]["metrics"]
        assert curves[0]["metrics"]["loss"]["reported"] == 20

        done = cli(env, "resume", r1, "--", "6", "3", cwd=project, timeout=WAIT)
        assert done.returncode == 0, done.stdout + done.stderr
        record = cli_json(env, "status", r1)
        assert (record["status"], record["attempt"], record["step"]) == ("completed", 2, 16)
        assert record["resume_from"] == record["attempts"][0]["resume_from"] or record[
            "resume_from"
        ].endswith("step10.json")
        assert record["attempts"][0]["status"] == "completed" and record["job_id"].startswith(
            f"backprop-{r1}-2-"
        )
        rows = {row["run_id"]: row for row in cli_json(env, "list")["runs"]}
        assert (rows[r1]["status"], rows[r1]["attempt"], rows[r1]["step"]) == ("completed", 2, 16)
        loss = cli_json(env, "metrics", r1)["runs"][0]["metrics"]["loss"]
        assert loss["reported"] == 26 and loss["last"] == 216.0  # both attempts, joined
    finally:
        shutil.rmtree(job_home(None, store_key(tmp_path / "home")), ignore_errors=True)


@pytest.mark.anyio
async def test_mcp_tools_time_box_resume_stop_and_list_a_ray_run(ray_head: Head, tmp_path: Path) -> None:
    project = project_with(tmp_path, train="checkpoints_on_sigint")
    env = isolated_env(tmp_path / "home", RAY_ADDRESS=ray_head.address)
    env["BACKPROP_RAY_STORAGE"] = str(tmp_path / "cluster")
    command, *args = server_command()
    params = StdioServerParameters(
        command=command, args=[*args, "--root", str(project), "--backend", "ray"], env=env, cwd=project
    )
    options = {"backend": "ray", "min_free_ram_gb": 0, "use_gpu": False, "grace_seconds": 10}
    service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=project)
    with anyio.fail_after(WAIT * 4):
        async with Client(params) as client:
            first = await call(
                client, "run_training", script="train.py", max_run_minutes=0.05, options=options
            )
            ended = await wait_end(client, first["run_id"])
            assert (ended["status"], ended["termination_reason"]) == ("timed_out", "deadline"), ended
            saved = ended["latest_checkpoint"]
            assert saved.startswith(str(tmp_path / "cluster")) and Path(saved).is_file()
            assert ended["step"] == json.loads(Path(saved).read_text("utf-8"))["step"] > 0

            resumed = await call(client, "resume_run", run_id=first["run_id"], max_run_minutes=5)
            assert resumed["attempt"] == 2
            await anyio.to_thread.run_sync(running, service, first["run_id"])
            await anyio.to_thread.run_sync(logged, service, first["run_id"], "ready")
            # The machine view of a ray server is the cluster's, within an answer's budget.
            machine = await call(client, "get_status")
            assert machine["cluster"]["cpus_total"] == 2 and machine["cluster"]["nodes"][0]["head"]
            assert [r["run_id"] for r in machine["live_runs"]] == [first["run_id"]]
            assert len(json.dumps(machine, separators=(",", ":"))) <= 4096
            await call(client, "stop_run", run_id=first["run_id"])
            stopped = await wait_end(client, first["run_id"])
            assert (stopped["status"], stopped["termination_reason"]) == ("stopped", "stop_requested"), (
                stopped
            )
            assert stopped["resume_from"] == saved and stopped["latest_checkpoint"] != saved
            assert stopped["step"] > ended["step"]  # it went on from the first attempt's checkpoint

            page = await call(client, "list_experiments")
            row = next(r for r in page["runs"] if r["run_id"] == first["run_id"])
            assert (row["status"], row["attempt"]) == ("stopped", 2)
            metrics = await call(client, "get_metrics", run_ids=[first["run_id"]])
            assert metrics["runs"][0]["metrics"]["loss"]["last"] == pytest.approx(stopped["loss"], rel=1e-4)
    assert no_survivors(first["run_id"])


def test_a_job_stopped_or_killed_on_the_cluster_is_recorded_as_such(ray_head: Head, tmp_path: Path) -> None:
    by_ray = unique_id("by-ray")
    by_kill = unique_id("by-kill")
    project = project_with(tmp_path, wait="waits_forever")
    env = ray_env(tmp_path, ray_head)
    service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=project)
    stopped = service.start(RunRequest(script="wait.py", run_id=by_ray))
    killed = service.start(RunRequest(script="wait.py", run_id=by_kill))
    running(service, by_ray)
    logged(service, by_ray, "ready")
    ray_job_stop(ray_head, job_state(service, by_ray)["job_id"])
    record = wait_for_end(service, stopped["run_id"], timeout=WAIT)
    assert (record["status"], record["termination_reason"]) == ("stopped", "stop_requested"), record
    assert "stopped by the cluster" in (record["status_detail"] or "") or "ray job stop" in (
        record["status_detail"] or ""
    )

    running(service, by_kill)
    pid, _ = job_state(service, by_kill)["supervisor"]
    os.kill(pid, 9)  # the job's entrypoint, as an out-of-memory kill on the node would
    record = wait_for_end(service, killed["run_id"], timeout=WAIT)
    assert (record["status"], record["termination_reason"]) == ("lost", "supervisor_lost"), record
    assert "ended FAILED" in (record["status_detail"] or "")
    wait_until(lambda: no_survivors(by_kill), timeout=WAIT, what="the killed run's script to die with it")
    assert no_survivors(by_ray)


def stored(service: Service, run_id: str) -> dict[str, Any]:
    """The run's record as stored, without reading it through the backend (no fold, no submit)."""
    return dict(service.store.read(run_id))


def ray_job_stop(head: Head, job_id: str) -> None:
    command = [str(ray_command()), "job", "stop", "--address", head.address, job_id]
    done = subprocess.run(command, capture_output=True, text=True, timeout=WAIT, check=False)
    assert done.returncode == 0, done.stderr


def test_admission_asks_the_cluster_and_queued_runs_advance_in_order_without_any_read(
    ray_head: Head, tmp_path: Path
) -> None:
    too_big = unique_id("too-big")
    refused_id = unique_id("refused")
    first_id = unique_id("first")
    second_id = unique_id("second")
    third_id = unique_id("third")
    project = project_with(tmp_path, wait="waits_forever")
    # The waiters look at the cluster often, so that the test waits little for them.
    env = ray_env(tmp_path, ray_head, BACKPROP_MAX_PARALLEL="1", BACKPROP_SAMPLE_INTERVAL_SECONDS="0.2")
    service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=project)
    huge = {"min_free_ram_gb": 65536, "queue_timeout_minutes": 0.05}
    record = service.start(RunRequest(script="wait.py", run_id=too_big, options=huge))
    assert record["status"] == "queued" and "no Ray node has 1 CPU and 65536.0 GB memory free" in (
        record["status_detail"] or ""
    )
    assert "job_id" not in record
    refused = service.start(RunRequest(script="wait.py", run_id=refused_id, options={**huge, "queue": False}))
    assert refused["status"] == "rejected" and "no Ray node has" in (refused["status_detail"] or "")
    # Its waiter ends it at its queue timeout, with nobody reading it.
    wait_until(
        lambda: stored(service, too_big)["status"] == "rejected", timeout=WAIT, what="the queue timeout"
    )
    assert stored(service, too_big)["termination_reason"] == "queue_timeout"

    service.start(RunRequest(script="wait.py", run_id=first_id))
    running(service, first_id)
    # Another process of the same store (the CLI, which then exits) finds the one place taken.
    second = cli_json(env, "run", "wait.py", "--run-id", second_id, "--detach", cwd=project)
    assert second["status"] == "queued", second
    third = service.start(RunRequest(script="wait.py", run_id=third_id))
    assert (third["status"], third["queue_position"]) == ("queued", 2), third
    assert "1 ray runs of this store live; maxParallel is 1" in (
        stored(service, second_id)["status_detail"] or ""
    )
    machine = cli_json(env, "status")
    assert (machine["cluster"]["cpus_total"], machine["cluster"]["nodes_left_out"]) == (2, 0)
    assert [r["run_id"] for r in machine["live_runs"]] == [first_id]
    assert [r["run_id"] for r in machine["queued_runs"]] == [second_id, third_id]
    assert not machine["verdict"]["allowed"]

    # The first run's job ends on the cluster, and from here on nobody reads any of the runs: the
    # second's waiter notices the place is free and submits it; the third waits behind it.
    ray_job_stop(ray_head, job_state(service, first_id)["job_id"])
    wait_until(lambda: stored(service, second_id).get("job_id"), timeout=WAIT, what="the second run's job")
    assert stored(service, first_id)["status"] == "stopped"
    waiting = stored(service, third_id)
    assert (waiting["status"], waiting["queue_position"]) == ("queued", 1), waiting
    assert "job_id" not in waiting

    # A waiter that dies leaves its run truthfully lost, not queued forever.
    os.kill(job_state(service, third_id)["waiter"][0], 9)
    wait_until(lambda: service.get(third_id)["status"] == "lost", timeout=WAIT, what="the waiter's death")
    assert "queue waiter died" in (service.get(third_id)["status_detail"] or "")
    running(service, second_id)
    service.stop(second_id)
    assert wait_for_end(service, second_id, timeout=WAIT)["status"] == "stopped"


def test_a_stop_while_the_starter_submits_is_refused_not_overwritten(ray_head: Head, tmp_path: Path) -> None:
    racing = unique_id("racing")
    project = project_with(tmp_path, wait="waits_forever")
    env = ray_env(tmp_path, ray_head)
    service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=project)
    started: list[Any] = []
    # The ray queue's lock held here: the starter has created the run and waits to submit it.
    with ray_queue(service.store).exclusive():
        starter = threading.Thread(
            target=lambda: started.append(service.start(RunRequest(script="wait.py", run_id=racing)))
        )
        starter.start()
        wait_until(lambda: service.store.exists(racing), timeout=WAIT, what="the run to be created")
        with pytest.raises(RunStateError, match="still being submitted"):
            service.stop(racing)
    starter.join(timeout=WAIT)
    assert started and started[0]["job_id"]
    running(service, racing)
    service.stop(racing)
    assert wait_for_end(service, racing, timeout=WAIT)["status"] == "stopped"


def test_a_grid_sweep_runs_its_trials_as_ray_runs_within_max_parallel(ray_head: Head, tmp_path: Path) -> None:
    project = project_with(tmp_path, scores="scores_its_params")
    env = ray_env(
        tmp_path,
        ray_head,
        BACKPROP_MAX_PARALLEL="1",  # the second trial waits in the ray queue for the first
        BACKPROP_SWEEP_POLL_SECONDS="0.2",
        BACKPROP_SAMPLE_INTERVAL_SECONDS="0.2",
    )
    grid = ["--param", "x=0,0.3", "--metric", "val_loss", "--parallel", "2", "--json"]
    ran = cli(env, "sweep", "scores.py", *grid, "--", "--steps", "3", cwd=project, timeout=WAIT * 2)
    assert ran.returncode == 0, ran.stderr
    done = json.loads(ran.stdout)
    assert (done["status"], done["counts"]) == ("completed", {"completed": 2}), done["status_detail"]
    assert done["best"]["params"] == {"x": 0.3}
    assert done["best"]["objective"] == pytest.approx(known({"x": 0.3, "layers": 1}) + 1 / 3)
    service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=project)
    run_ids = [t["run_id"] for t in done["trials"]]
    for number, run_id in enumerate(run_ids, 1):
        record = service.get(run_id)
        assert record["options"]["backend"] == "ray" and record["job_id"].startswith(f"backprop-{run_id}-1-")
        assert record["sweep"]["trial"] == number and record["python_source"] == "cluster"
        given = service.logs(run_id, tail=20)["lines"][0]
        assert json.loads(given.removeprefix("params: ")) == record["sweep"]["params"]
        assert service.metrics([run_id])["runs"][0]["metrics"]["val_loss"]["reported"] == 3
    assert max_overlap(service, run_ids) == 1
    rows = cli_json(env, "list", "--sweep", done["sweep_id"])["runs"]
    assert sorted(row["run_id"] for row in rows) == sorted(run_ids)


def test_a_ray_runs_log_is_a_local_runs_log_and_what_travels_is_bounded(
    ray_head: Head, tmp_path: Path
) -> None:
    on_ray_id = unique_id("on-ray")
    here_id = unique_id("here")
    too_large = unique_id("too-large")
    project = project_with(tmp_path, odd="prints_odd_line_breaks")
    # A repository's history does not travel: this one alone is over what the dashboard takes.
    (project / ".git").mkdir()
    (project / ".git" / "pack").write_bytes(os.urandom(UPLOAD_LIMIT + 1024**2))
    env = ray_env(tmp_path, ray_head)
    service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=project)
    service.start(RunRequest(script="odd.py", run_id=on_ray_id))
    service.start(RunRequest(script="odd.py", run_id=here_id, options={"backend": "local"}))
    on_ray, here = (
        wait_for_end(service, on_ray_id, timeout=WAIT),
        wait_for_end(service, here_id, timeout=WAIT),
    )
    assert (
        (on_ray["status"], on_ray["metrics"])
        == (here["status"], here["metrics"])
        == (
            "completed",
            {"val_loss": 0.5},
        )
    )
    # Carriage returns, form feeds, line separators, bytes that are not UTF-8 and a forged mark: the
    # same bytes in the same lines as the local run's log.
    logged = service.store.log_path(on_ray_id, 1).read_bytes()
    assert logged == service.store.log_path(here_id, 1).read_bytes()
    assert logged.startswith(b"step 1/3\rstep 2/3\rstep 3/3\n") and b"caf\xe9 au lait\r\n" in logged
    assert "two" not in (service.store.run_dir(on_ray_id) / "supervisor.log").read_text("utf-8")

    (project / ".git" / "pack").rename(project / "data.bin")
    with pytest.raises(ClusterError, match="refused the run's working directory as too large") as refused:
        service.start(RunRequest(script="odd.py", run_id=too_large))
    assert ".rayignore" in (refused.value.hint or "")
    assert [r["run_id"] for r in service.list_runs()["runs"]] == [here_id, on_ray_id]


def test_a_flooding_script_leaves_a_bounded_job_log_and_the_whole_metric_history(
    ray_head: Head, tmp_path: Path
) -> None:
    on_ray_id = unique_id("on-ray")
    here_id = unique_id("here")
    project = project_with(tmp_path, flood="floods_plain_progress_with_a_dip")
    env = ray_env(tmp_path, ray_head)
    service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=project)
    # 200,000 lines of about 70 bytes: past what a job log carries; the dip and the spike lie past it.
    flood = ["200000", "150001", "180001"]
    service.start(RunRequest(script="flood.py", run_id=on_ray_id, args=flood))
    service.start(RunRequest(script="flood.py", run_id=here_id, args=flood, options={"backend": "local"}))
    on_ray, here = (
        wait_for_end(service, on_ray_id, timeout=WAIT),
        wait_for_end(service, here_id, timeout=WAIT),
    )
    assert (on_ray["status"], on_ray["step"]) == (here["status"], here["step"]) == ("completed", 200000)
    # 8 MiB of the output, and the records, the last lines and the history.
    assert job_state(service, on_ray_id)["consumed"] < 10 * 1024**2
    curves = service.metrics([on_ray_id, here_id], points=1000)["runs"]
    assert curves[0]["metrics"] == curves[1]["metrics"]
    assert curves[0]["metrics"]["loss"]["best"] == 0.001
    lines = service.logs(on_ray_id, tail=ECHO_TAIL_LINES + 1)["lines"]
    assert "past the first 8 MiB did not travel with the job log" in lines[0]
    assert lines[-1] == service.logs(here_id, tail=1)["lines"][-1]


def test_a_head_that_goes_away_mid_run_leaves_a_truthful_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    orphaned = unique_id("orphaned")
    head = start_head(cpus=1)
    try:
        project = project_with(tmp_path, wait="waits_forever")
        env = ray_env(tmp_path, head)
        # Read by whoever follows the run: here, this process.
        monkeypatch.setenv("BACKPROP_RAY_SILENT_SECONDS", SILENT_SECONDS)
        service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=project)
        service.start(RunRequest(script="wait.py", run_id=orphaned))
        running(service, orphaned)
        kill_head(head)

        def ended() -> dict[str, Any] | None:
            record = service.get(orphaned)
            return dict(record) if record["status"] in TERMINAL_STATES else None

        record = wait_until(ended, timeout=SILENT_WAIT, what="the run of a gone head to end")
        assert (record["status"], record["termination_reason"]) == ("lost", "supervisor_lost"), record
        assert "does not answer" in (record["status_detail"] or "") or "no longer knows" in (
            record["status_detail"] or ""
        )
        wait_until(lambda: no_survivors(orphaned), timeout=WAIT, what="the script to die with its head")
    finally:
        stop_head(head)


def test_bad_ray_inputs_are_clear_errors_and_leave_nothing(ray_head: Head, tmp_path: Path) -> None:
    unreachable = unique_id("unreachable")
    project = project_with(tmp_path, wait="waits_forever")
    outside = tmp_path / "elsewhere.py"
    shutil.copy(FIXTURES / "waits_forever.py", outside)
    env = isolated_env(tmp_path / "home")
    done = cli(
        env, "run", "wait.py", "--backend", "ray", "--ray-address", "ray://127.0.0.1:10001", cwd=project
    )
    assert done.returncode == 2 and "--ray-address must be the Ray dashboard's address" in done.stderr
    done = cli(env, "run", "wait.py", "--backend", "cloud", cwd=project)
    assert done.returncode == 2 and "--backend must be one of local, ray" in done.stderr
    service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=project)
    ray = {"backend": "ray", "ray_address": "http://127.0.0.1:9"}  # nothing listens on port 9
    with pytest.raises(UsageError, match="lies outside the run's working directory"):
        service.start(RunRequest(script=str(outside), options=ray))
    with pytest.raises(UsageError, match="runs with the python of the Ray cluster"):
        service.start(RunRequest(script="wait.py", python=sys.executable, options=ray))
    with pytest.raises(
        ClusterError, match=re.escape("the Ray cluster at http://127.0.0.1:9 does not answer")
    ) as refused:
        service.start(RunRequest(script="wait.py", run_id=unreachable, options=ray))
    assert "not the GCS port (6379)" in (refused.value.hint or "")
    # Something answers there, but it is no Ray dashboard (a wrong port): said so, not "Jobs API".
    with http_server() as port:
        not_ray = {"backend": "ray", "ray_address": f"http://127.0.0.1:{port}"}
        with pytest.raises(
            ClusterError, match="is a Ray dashboard's Jobs API: it answered its version check"
        ) as refused:
            service.start(RunRequest(script="wait.py", options=not_ray))
    assert "dashboard's" in (refused.value.hint or "")
    # RAY_ADDRESS in the environment (Ray's own client would prefer it) does not redirect a run
    # whose address was given: the run goes where its settings say, or nowhere.
    done = cli(
        {**env, "RAY_ADDRESS": ray_head.address},
        *("run", "wait.py", "--backend", "ray", "--ray-address", "127.0.0.1:9", "--detach"),
        cwd=project,
    )
    assert done.returncode == 1 and "http://127.0.0.1:9 does not answer" in done.stderr, done.stdout
    assert service.list_runs()["runs"] == []


def test_a_cluster_that_does_not_answer_costs_a_status_one_timeout(tmp_path: Path) -> None:
    env = isolated_env(tmp_path / "home", BACKPROP_RAY_REQUEST_SECONDS="1")
    with silent_server() as (port, connections):
        answer = cli_json(env, "status", "--backend", "ray", "--ray-address", f"127.0.0.1:{port}")
        assert connections() == 1  # every later request of the status failed at once, saying why
    assert "does not answer" in answer["cluster"]["error"] and answer["cluster"]["nodes"] == []
    assert not answer["verdict"]["allowed"] and "does not answer" in answer["verdict"]["reasons"][0]


def test_local_runs_never_import_ray(tmp_path: Path) -> None:
    project = project_with(tmp_path, train="trains_from_its_checkpoint")
    env = isolated_env(tmp_path / "home")
    code = (
        "import sys; from pathlib import Path; from backprop_mcp.runs.service import Service; "
        "from backprop_mcp.runs.requests import RunRequest; from tests.helpers import wait_for_end; "
        f"s = Service(Path({env['BACKPROP_HOME']!r}), cwd=Path({str(project)!r})); "
        "r = s.start(RunRequest(script='train.py', args=['3', '1'])); wait_for_end(s, r['run_id']); "
        "s.list_runs(); print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr
