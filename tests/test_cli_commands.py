"""The rest of the CLI: import-legacy, compare, logs -f, dry-run, and `python -m backprop_mcp`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from backprop_mcp.runs.requests import RunRequest
from backprop_mcp.runs.service import Service
from tests.helpers import FIXTURES, WAIT_SECONDS, cli, cli_json, unique_id, wait_for_end


def test_import_legacy_brings_in_the_seeds_experiments(env: dict[str, str], tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"x")
    legacy = tmp_path / "experiments.json"
    legacy.write_text(
        json.dumps(
            {
                "experiments": [
                    {
                        "id": "exp-1",
                        "name": "first",
                        "scriptPath": "/p/train.py",
                        "status": "completed",
                        "checkpoints": [str(ckpt)],
                        "lastStep": 120,
                        "lastLoss": 0.41,
                        "startTime": 1_700_000_000_000,
                        "endTime": 1_700_000_600_000,
                    },
                    {
                        "id": "exp-2",
                        "name": "left running",
                        "scriptPath": "/p/train.py",
                        "status": "running",
                        "checkpoints": [],
                        "startTime": 1_700_000_700_000,
                    },
                    {"id": "../evil", "status": "completed"},
                    "not an object",
                ]
            }
        ),
        encoding="utf-8",
    )
    report = cli_json(env, "import-legacy", str(legacy))
    assert report["imported"] == ["exp-1", "exp-2"]
    assert len(report["skipped"]) == 2
    first = cli_json(env, "status", "exp-1")
    assert (first["status"], first["step"], first["loss"], first["name"]) == ("completed", 120, 0.41, "first")
    assert first["started_at"] == "2023-11-14T22:13:20.000Z"
    assert first["ended_at"] == "2023-11-14T22:23:20.000Z"
    assert first["latest_checkpoint"] == str(ckpt)
    assert cli_json(env, "status", "exp-2")["status"] == "lost"
    again = cli_json(env, "import-legacy", str(legacy))
    assert again["imported"] == [] and any("already exists" in s for s in again["skipped"])


def test_import_legacy_of_a_corrupt_file_is_a_clear_error(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "experiments.json"
    bad.write_text("{nope", encoding="utf-8")
    result = cli(env, "import-legacy", str(bad))
    assert result.returncode == 2 and "not valid JSON" in result.stderr and "Traceback" not in result.stderr


def test_compare_ranks_runs_on_a_metric(service: Service, env: dict[str, str]) -> None:
    short = unique_id("short")
    long = unique_id("long")
    for run_id, steps in ((short, "2"), (long, "8")):
        service.start(RunRequest(script=str(FIXTURES / "counts_and_exits.py"), args=[steps], run_id=run_id))
    wait_for_end(service, short)
    wait_for_end(service, long)
    by_loss = cli_json(env, "compare", short, long)
    assert by_loss["top_run_id"] == long and by_loss["lower_is_better"] is True
    by_acc = cli_json(env, "compare", short, long, "--metric", "acc")
    assert by_acc["lower_is_better"] is False
    assert [r["last_value"] for r in by_acc["runs"]] == [1.0, 1.0]
    assert [r["last_value"] for r in by_loss["runs"]] == [1 / 8, 1 / 2]


def test_compare_by_last_ranks_the_last_value_and_says_so(service: Service, env: dict[str, str]) -> None:
    """Issue 9, item 24: a run whose loss dipped to 0.1 and ended at 0.9 ranks at 0.9 when ranked
    by the last value, and the ranking says it is the last value (its best is shown beside it)."""
    dipped = unique_id("dipped")
    steady = unique_id("steady")
    script = str(FIXTURES / "loss_dips_then_rises.py")
    service.start(RunRequest(script=script, args=["0.5", "0.1", "0.9"], run_id=dipped))
    service.start(RunRequest(script=script, args=["0.7", "0.5"], run_id=steady))
    wait_for_end(service, dipped)
    wait_for_end(service, steady)
    comparison = cli_json(env, "compare", dipped, steady)
    assert comparison["ranked_by"] == "last" and comparison["top_run_id"] == steady
    assert [(r["run_id"], r["value"], r["last_value"], r["best_value"]) for r in comparison["runs"]] == [
        (steady, 0.5, 0.5, 0.5),
        (dipped, 0.9, 0.9, 0.1),
    ]
    text = cli(env, "compare", dipped, steady)
    assert text.returncode == 0, text.stderr
    assert "best" not in text.stdout and "ranked by the last reported loss" in text.stdout
    assert "last loss 0.9" in text.stdout


def test_logs_follow_prints_the_output_until_the_run_ends(service: Service, env: dict[str, str]) -> None:
    followed = unique_id("followed")
    service.start(RunRequest(script=str(FIXTURES / "counts_and_exits.py"), args=["3"], run_id=followed))
    result = cli(env, "logs", followed, "-f")
    assert result.returncode == 0, result.stderr
    assert 'args: ["3"]' in result.stdout
    assert "completed" in result.stdout


def test_dry_run_prints_the_decision_command_and_environment_without_starting(
    env: dict[str, str], tmp_path: Path, service: Service
) -> None:
    dry = unique_id("dry")
    result = cli(
        env,
        "run",
        str(FIXTURES / "counts_and_exits.py"),
        "--run-id",
        dry,
        "--dry-run",
        "--",
        "--x",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "counts_and_exits.py --x" in result.stdout
    assert f"BACKPROP_RUN_ID={dry}" in result.stdout
    assert "a new run can start now" in result.stdout
    assert "nothing was started" in result.stdout
    assert not service.store.exists(dry)


def test_the_module_entry_point_and_version_work(env: dict[str, str]) -> None:
    from backprop_mcp import __version__

    result = cli(env, "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"backprop {__version__}"


def test_the_interpreter_choice_is_recorded(service: Service, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    in_venv = Service(service.store.home, env={**service.env, "VIRTUAL_ENV": str(venv)}, cwd=tmp_path)
    record = in_venv.start(RunRequest(script=str(FIXTURES / "counts_and_exits.py")))
    assert (record["python"], record["python_source"]) == (str(venv / "bin" / "python"), "virtualenv")
    explicit = service.start(RunRequest(script=str(FIXTURES / "counts_and_exits.py"), python=sys.executable))
    assert explicit["python_source"] == "option"
    default = service.start(RunRequest(script=str(FIXTURES / "counts_and_exits.py")))
    assert (default["python"], default["python_source"]) == (sys.executable, "current")
    for run in (record, explicit, default):
        assert wait_for_end(service, run["run_id"])["status"] == "completed"


def test_an_interpreter_that_cannot_start_fails_the_run_with_start_failed(
    service: Service, tmp_path: Path
) -> None:
    # A missing one is refused up front (tests/test_path_options.py); one that exists but is not
    # a program gets as far as the supervisor's exec.
    python = tmp_path / "not-a-program"
    python.write_text("neither a binary nor a #! line\n", encoding="utf-8")
    python.chmod(0o755)
    record = service.start(RunRequest(script=str(FIXTURES / "counts_and_exits.py"), python=str(python)))
    final = wait_for_end(service, record["run_id"])
    assert (final["status"], final["termination_reason"]) == ("failed", "start_failed")
    assert str(python) in (final["status_detail"] or "")


def test_the_framework_is_detected_from_imports(service: Service, tmp_path: Path) -> None:
    script = tmp_path / "t.py"
    script.write_text("import os\nimport torch.nn as nn\n", encoding="utf-8")
    report = service.dry_run(RunRequest(script=str(script)))
    assert report["environment"]["BACKPROP_FRAMEWORK"] == "pytorch"


def _foreground(env: dict[str, str], tmp_path: Path, fixture: str, run_id: str) -> subprocess.Popen[str]:
    import subprocess
    import sys

    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backprop_mcp",
            "run",
            str(FIXTURES / fixture),
            "--run-id",
            run_id,
            "--grace-seconds",
            "30",
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_ctrl_c_once_in_the_foreground_stops_gracefully(
    env: dict[str, str], tmp_path: Path, service: Service
) -> None:
    run_id = unique_id("fg-once")
    from tests.helpers import wait_for_log

    proc = _foreground(env, tmp_path, "checkpoints_on_sigint.py", run_id)
    from tests.helpers import wait_until

    wait_until(lambda: service.store.exists(run_id), what="the run")
    wait_for_log(service, run_id, "ready")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 5
    assert "stopping gracefully" in out
    record = service.get(run_id)
    assert (record["status"], record["exit_code"]) == ("stopped", 130)
    assert record["latest_checkpoint"] is not None


def test_ctrl_c_twice_in_the_foreground_kills_without_the_grace(
    env: dict[str, str], tmp_path: Path, service: Service
) -> None:
    run_id = unique_id("fg-twice")
    from tests.helpers import wait_for_log, wait_until

    # The script notes each signal and ignores it: a second Ctrl-C taken as one more graceful stop
    # would end it too, but only after the grace and a SIGTERM, which it would note.
    proc = _foreground(env, tmp_path, "notes_and_ignores_sigint_and_sigterm.py", run_id)
    wait_until(lambda: service.store.exists(run_id), what="the run")
    wait_for_log(service, run_id, "ready")
    proc.send_signal(signal.SIGINT)
    wait_for_log(service, run_id, "got SIGINT")  # the graceful stop reached the script
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 5
    assert "killing" in out
    record = service.get(run_id)
    assert (record["status"], record["signal"]) == ("stopped", "SIGKILL")
    lines = service.logs(run_id, tail=50)["lines"]
    assert "got SIGINT" in lines and "got SIGTERM" not in lines, lines
    stops = [e for e in service.store.read_events(run_id) if e.get("type") == "stop_requested"]
    assert [e.get("force") for e in stops] == [False, True], stops


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of a parser, its own included, read from the parser itself."""
    found = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*path, name))
    return found


def test_help_of_every_command_prints_and_exits_0(env: dict[str, str], tmp_path: Path) -> None:
    """Issue 9, item 20: argparse formats help with %, so a literal % in a help text crashed
    `run --help`. Every command the parser has, and the server's own --help, as real processes."""
    from backprop_mcp.cli.parser import build_parser

    commands = _commands(build_parser())
    assert ("run",) in commands and ("resume",) in commands  # the enumeration found the subcommands
    bin_dir = Path(sys.executable).parent
    invocations = [[str(bin_dir / "backprop"), *path, "--help"] for path in commands]
    invocations.append([str(bin_dir / "backprop-mcp"), "--help"])
    for argv in invocations:
        done = subprocess.run(
            argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=WAIT_SECONDS, check=False
        )
        assert done.returncode == 0 and "Traceback" not in done.stderr, (argv, done.stderr)
        assert done.stdout.startswith("usage: "), (argv, done.stdout)
        if argv[1:] == ["run", "--help"]:
            assert '"80%" of the GPU' in done.stdout  # the literal %, shown once


@pytest.mark.parametrize("args", [("status",), ("list",), ("status", "r0"), ("list", "--json")])
def test_a_reader_that_stops_reading_ends_the_cli_with_141_and_no_traceback(
    env: dict[str, str], tmp_path: Path, args: tuple[str, ...]
) -> None:
    service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=tmp_path)
    run_ids = [unique_id(f"r{number}") for number in range(3)]
    args = tuple(run_ids[0] if arg == "r0" else arg for arg in args)  # the first run's own id
    for run_id in run_ids:
        service.start(RunRequest(script=str(FIXTURES / "counts_and_exits.py"), args=["1"], run_id=run_id))
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte: `backprop list | head -0`
    try:
        done = subprocess.run(
            [sys.executable, "-m", "backprop_mcp", *args],
            env=env,
            cwd=tmp_path,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=WAIT_SECONDS,
            check=False,
        )
    finally:
        os.close(write)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 141, done.stderr
