"""The example training scripts keep the script contract: events, checkpoint on stop, exact resume."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from backprop_mcp.core import contract
from backprop_mcp.runs.events import CheckpointEvent, DoneEvent, parse_line
from tests.helpers import unique_id

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "train_tiny.py"
# Bounds every wait on a child; generous because CI machines stall, never slept through.
CHILD_TIMEOUT = 60.0
TINY_ARGS = ["--steps", "600", "--log-every", "20"]
# Slow enough that a signal sent after the first checkpoint lands long before the last step.
SLOW = ["--step-delay", "0.01"]


class Run:
    """An example script started with the contract environment; stdout lines arrive on a queue."""

    started: ClassVar[list[Run]] = []

    def __init__(self, script: Path, args: list[str], env: dict[str, str], *, isolated: bool = False) -> None:
        full_env = {k: v for k, v in os.environ.items() if k not in contract.CONTRACT_ENV}
        full_env |= {"PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1", **env}
        flags = ["-I"] if isolated else []  # -I: backprop_mcp is not importable, as for a user's venv
        self.proc = subprocess.Popen(
            [sys.executable, *flags, str(script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            start_new_session=True,
        )
        Run.started.append(self)
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self.seen: list[bytes] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip(b"\n"))
        self.lines.put(None)

    def wait_for_checkpoint(self) -> CheckpointEvent:
        while True:
            line = self.lines.get(timeout=CHILD_TIMEOUT)
            assert line is not None, "the script ended before its first checkpoint"
            self.seen.append(line)
            for event in parse_line(line).events:
                if isinstance(event, CheckpointEvent):
                    return event

    def finish(self) -> tuple[int, list[bytes], str]:
        """Exit status, every stdout line, and stderr."""
        code = self.proc.wait(timeout=CHILD_TIMEOUT)
        while (line := self.lines.get(timeout=CHILD_TIMEOUT)) is not None:
            self.seen.append(line)
        assert self.proc.stderr is not None
        return code, self.seen, self.proc.stderr.read().decode("utf-8", "replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=CHILD_TIMEOUT)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(autouse=True)
def reap_runs() -> Iterator[None]:
    """Every script a test started is killed and reaped, however the test ends."""
    yield
    while Run.started:
        Run.started.pop().close()


def contract_env(tmp_path: Path, name: str, **extra: str) -> dict[str, str]:
    run_dir = tmp_path / name
    return {
        contract.ENV_RUN_ID: unique_id(name),  # a process of no store: matched by its id alone
        contract.ENV_RUN_DIR: str(run_dir),
        contract.ENV_CHECKPOINT_DIR: str(run_dir / "checkpoints"),
        contract.ENV_ATTEMPT: "1",
        contract.ENV_CHECKPOINT_EVERY_SECONDS: "0.05",
        contract.ENV_FRAMEWORK: "none",
        **extra,
    }


def events_of(lines: list[bytes]) -> list[Any]:
    """Every event in the output; asserts that no JSON line was rejected."""
    events: list[Any] = []
    for line in lines:
        result = parse_line(line)
        assert result.error is None, (line, result.error)
        assert result.warning is None, (line, result.warning)
        events.extend(result.events)
    return events


def last_checkpoint(lines: list[bytes]) -> CheckpointEvent:
    checkpoints = [e for e in events_of(lines) if isinstance(e, CheckpointEvent)]
    assert checkpoints
    return checkpoints[-1]


def run_to_completion(
    script: Path, args: list[str], env: dict[str, str], *, isolated: bool = False
) -> list[bytes]:
    code, lines, err = Run(script, args, env, isolated=isolated).finish()
    assert code == 0, err
    assert isinstance(events_of(lines)[-1], DoneEvent)
    return lines


def tiny_state(path: str) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
    return {key: payload[key] for key in ("step", "weights", "bias", "rng_state")}


@pytest.mark.parametrize(("signum", "expected_exit"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_the_tiny_example_checkpoints_on_a_stop_signal_and_exits_with_128_plus_the_signal(
    tmp_path: Path, signum: int, expected_exit: int
) -> None:
    run = Run(TINY, TINY_ARGS + SLOW, contract_env(tmp_path, "stopped"))
    first = run.wait_for_checkpoint()
    run.proc.send_signal(signum)
    code, lines, err = run.finish()
    assert code == expected_exit, err
    assert "Traceback" not in err
    final = last_checkpoint(lines)
    assert final.path != first.path
    assert final.step is not None
    assert first.step is not None
    assert 0 < final.step < 600
    assert tiny_state(final.path)["step"] == final.step
    assert not any(isinstance(e, DoneEvent) for e in events_of(lines))


def test_the_tiny_example_resumed_after_sigint_ends_with_the_weights_of_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    whole = run_to_completion(TINY, TINY_ARGS, contract_env(tmp_path, "whole"))
    expected = tiny_state(last_checkpoint(whole).path)
    assert expected["step"] == 600

    run = Run(TINY, TINY_ARGS + SLOW, contract_env(tmp_path, "parts"))
    run.wait_for_checkpoint()
    run.proc.send_signal(signal.SIGINT)
    code, lines, err = run.finish()
    assert code == 130, err
    stopped_at = last_checkpoint(lines)

    env = contract_env(
        tmp_path, "parts", **{contract.ENV_ATTEMPT: "2", contract.ENV_RESUME_FROM: stopped_at.path}
    )
    resumed = run_to_completion(TINY, TINY_ARGS, env)
    progress_steps = [e.step for e in events_of(resumed) if hasattr(e, "total")]
    assert stopped_at.step is not None
    assert min(s for s in progress_steps if s is not None) > stopped_at.step
    assert tiny_state(last_checkpoint(resumed).path) == expected


def test_the_tiny_example_outside_backprop_checkpoints_under_the_working_directory(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(TINY), "--steps", "40", "--step-delay", "0"],
        capture_output=True,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k not in contract.CONTRACT_ENV},
        timeout=CHILD_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert last_checkpoint(proc.stdout.splitlines()).path == str(tmp_path / "checkpoints" / "final.json")


def test_the_tiny_example_refuses_a_checkpoint_from_another_configuration(tmp_path: Path) -> None:
    whole = run_to_completion(TINY, ["--steps", "40"], contract_env(tmp_path, "a"))
    env = contract_env(tmp_path, "b", **{contract.ENV_RESUME_FROM: last_checkpoint(whole).path})
    code, _, err = Run(TINY, ["--steps", "40", "--lr", "0.5"], env).finish()
    assert code == 2
    assert "cannot resume" in err


def test_the_example_config_uses_the_seed_keys() -> None:
    config = json.loads((ROOT / "examples" / "backprop.config.example.json").read_text(encoding="utf-8"))
    assert set(config) <= {"maxRunMinutes", "maxParallel", "gpuMemoryLimit", "minFreeRamGB", "gpu"}
    assert set(config["gpu"]) <= {"probe", "minFreeVramMB", "maxTempC"}


def test_no_config_file_in_examples_changes_the_defaults_an_example_run_gets(tmp_path: Path) -> None:
    """Issue 9, item 23: run from examples/ (as MCP does, in the script's folder), an example got
    examples/backprop.config.json's 30-minute box where the README promises 10."""
    from backprop_mcp.core.config import PROJECT_FILES
    from backprop_mcp.runs.requests import RunRequest
    from backprop_mcp.runs.service import Service
    from tests.helpers import isolated_env

    assert not [name for name in PROJECT_FILES if (ROOT / "examples" / name).exists()]
    env = isolated_env(tmp_path / "home")
    service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=ROOT / "examples")
    dry = service.dry_run(RunRequest(script=str(TINY)), allowed_roots=[ROOT / "examples"])
    inside_repo = [f for f in dry["config_files"] if Path(f).is_relative_to(ROOT)]
    assert inside_repo == []
    if not dry["config_files"]:  # a config file above the checkout (not ours) may set its own box
        assert dry["options"]["max_run_minutes"] == 10
