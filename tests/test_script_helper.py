"""The helper module that training scripts import: contract names, emitted events, stop and GPU limit."""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backprop_mcp import script
from backprop_mcp.core import contract
from backprop_mcp.runs.events import ParseResult, ProgressEvent, parse_line

SRC = Path(script.__file__).parent
# Bounds every wait on a child; generous because CI machines stall, never slept through.
CHILD_TIMEOUT = 30.0


@pytest.fixture(autouse=True)
def fresh_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in contract.CONTRACT_ENV:
        monkeypatch.delenv(name, raising=False)
    # The helper keeps per-process state (stop flag, checkpoint clock, notes given); each test
    # starts as a freshly started script would.
    monkeypatch.setattr(script, "_state", script._State())


def _events(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def test_the_helpers_names_equal_the_contracts() -> None:
    names = [
        name for name in dir(contract) if name.startswith(("ENV_", "EVENT_", "EXIT_")) and name != "EVENTS"
    ]
    assert names
    for name in names:
        assert getattr(script, name) == getattr(contract, name), name


def test_the_helper_imports_nothing_from_backprop_mcp_and_runs_as_a_copied_file(tmp_path: Path) -> None:
    shutil.copy(SRC / "script.py", tmp_path / "bp_helper.py")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import bp_helper
        bp_helper.progress(1, loss=0.5)
        assert "backprop_mcp" not in sys.modules, "the helper imported the package"
    """)
    # -I: no PYTHONPATH, no user site, so backprop_mcp cannot be found by accident.
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert _events(proc.stdout) == [{"event": "progress", "step": 1, "loss": 0.5}]


def test_progress_prints_one_json_line_in_the_contract_form(capsys: pytest.CaptureFixture[str]) -> None:
    script.progress(120, total=1000, loss=0.41, acc=0.88)
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert _events(out) == [
        {"event": "progress", "step": 120, "total": 1000, "loss": 0.41, "metrics": {"acc": 0.88}}
    ]


def test_progress_leaves_out_what_was_not_given(capsys: pytest.CaptureFixture[str]) -> None:
    script.progress(3)
    assert _events(capsys.readouterr().out) == [{"event": "progress", "step": 3}]


def test_metric_checkpoint_and_done_print_the_contract_forms(capsys: pytest.CaptureFixture[str]) -> None:
    script.metric("val_loss", 0.52, step=120)
    script.metric("lr", 1)
    script.checkpoint_saved(Path("ckpt/step120.pt"), step=120)
    script.checkpoint_saved("/tmp/final.pt")
    script.done(val_acc=0.91)
    assert _events(capsys.readouterr().out) == [
        {"event": "metric", "name": "val_loss", "value": 0.52, "step": 120},
        {"event": "metric", "name": "lr", "value": 1.0},
        {"event": "checkpoint_saved", "path": "ckpt/step120.pt", "step": 120},
        {"event": "checkpoint_saved", "path": "/tmp/final.pt"},
        {"event": "done", "metrics": {"val_acc": 0.91}},
    ]


def test_every_line_the_helper_prints_is_accepted_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    script.progress(1, total=2, loss=0.5, acc=0.1)
    script.metric("m", 2.0, step=1)
    script.checkpoint_saved("c.pt", step=1)
    script.done(acc=0.2)
    for line in capsys.readouterr().out.splitlines():
        result = parse_line(line.encode("utf-8"))
        assert result.error is None
        assert len(result.events) == 1


METRIC_NAMES = st.text(st.characters(min_codepoint=0x20, exclude_categories=["Cs"]), min_size=1, max_size=20)
FINITE = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=200)
@given(
    st.integers(0, 2**63 - 1),
    st.none() | st.integers(1, 2**63 - 1),
    st.none() | FINITE,
    # `step`, `total` and `loss` are progress()'s own parameters, so they cannot be metric names.
    st.dictionaries(
        METRIC_NAMES.filter(lambda n: "\x7f" not in n and n not in ("step", "total", "loss")),
        FINITE,
        max_size=5,
    ),
)
def test_whatever_the_helper_prints_the_parser_reads_back_unchanged(
    step: int, total: int | None, loss: float | None, metrics: dict[str, float]
) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        script.progress(step, total, loss, **metrics)
    assert parse_line(out.getvalue().rstrip("\n").encode("utf-8")) == ParseResult(
        (ProgressEvent(step=step, total=total, loss=loss, metrics=metrics),), None
    )


def test_non_finite_values_are_dropped_with_one_note_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    script.progress(5, loss=float("nan"), acc=0.5, bad_metric=float("inf"))
    script.progress(6, loss=float("nan"))
    script.metric("diverged", float("-inf"))
    script.done(final=float("nan"), ok=1.0)
    captured = capsys.readouterr()
    assert _events(captured.out) == [
        {"event": "progress", "step": 5, "metrics": {"acc": 0.5}},
        {"event": "progress", "step": 6},
        {"event": "done", "metrics": {"ok": 1.0}},
    ]
    assert captured.err.count("loss=nan") == 1
    assert "bad_metric=inf" in captured.err
    assert "diverged=-inf" in captured.err


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: script.progress(1.5), id="float step"),  # type: ignore[arg-type]
        pytest.param(lambda: script.progress(True), id="bool step"),
        pytest.param(lambda: script.progress(1, loss="0.5"), id="string loss"),  # type: ignore[arg-type]
        pytest.param(lambda: script.progress(1, acc=True), id="bool metric"),
        pytest.param(lambda: script.metric("", 1.0), id="empty metric name"),
        pytest.param(lambda: script.metric("x", None), id="None value"),  # type: ignore[arg-type]
    ],
)
def test_wrong_types_raise_type_error(call: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TypeError):
        call()
    assert capsys.readouterr().out == ""


def test_a_negative_step_a_zero_total_or_a_bad_checkpoint_path_raises_value_error() -> None:
    with pytest.raises(ValueError):
        script.progress(-1)
    with pytest.raises(ValueError):
        script.progress(1, total=0)
    with pytest.raises(ValueError):
        script.checkpoint_saved("")
    with pytest.raises(ValueError):
        script.checkpoint_saved("a\0b")


def test_lines_from_many_threads_never_interleave(capsys: pytest.CaptureFixture[str]) -> None:
    def emit() -> None:
        for step in range(200):
            script.progress(step, loss=0.5, acc=0.25, note=1.0)

    threads = [threading.Thread(target=emit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CHILD_TIMEOUT)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8 * 200
    assert all(parse_line(line.encode()).error is None for line in lines)


def test_outside_backprop_the_helper_gives_defaults_and_does_not_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert script.run_id() is None
    assert script.run_dir() == str(tmp_path)
    assert script.checkpoint_dir() == str(tmp_path / "checkpoints")
    assert (tmp_path / "checkpoints").is_dir()
    assert script.attempt() == 1
    assert script.resume_from() is None
    assert script.deadline() is None
    assert script.time_left() is None
    assert script.checkpoint_every_seconds() is None
    assert script.framework() == "none"
    assert script.gpu_memory_limit_mb() is None
    assert script.should_stop() is False
    assert script.should_checkpoint() is False
    assert script.apply_gpu_memory_limit() is False


def test_the_contract_environment_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(contract.ENV_RUN_ID, "r-1")
    monkeypatch.setenv(contract.ENV_RUN_DIR, str(tmp_path))
    monkeypatch.setenv(contract.ENV_CHECKPOINT_DIR, str(tmp_path / "ck"))
    monkeypatch.setenv(contract.ENV_ATTEMPT, "3")
    monkeypatch.setenv(contract.ENV_RESUME_FROM, str(tmp_path / "ck" / "a.pt"))
    monkeypatch.setenv(contract.ENV_DEADLINE, str(time.time() + 3600))
    monkeypatch.setenv(contract.ENV_CHECKPOINT_EVERY_SECONDS, "120")
    monkeypatch.setenv(contract.ENV_FRAMEWORK, "pytorch")
    monkeypatch.setenv(contract.ENV_GPU_MEMORY_LIMIT_MB, "2048")
    assert script.run_id() == "r-1"
    assert script.run_dir() == str(tmp_path)
    assert script.checkpoint_dir() == str(tmp_path / "ck")
    assert (tmp_path / "ck").is_dir()
    assert script.attempt() == 3
    assert script.resume_from() == str(tmp_path / "ck" / "a.pt")
    left = script.time_left()
    assert left is not None
    assert 3500 < left <= 3600
    assert script.should_stop() is False
    assert script.checkpoint_every_seconds() == 120.0
    assert script.framework() == "pytorch"
    assert script.gpu_memory_limit_mb() == 2048.0


def test_bad_environment_values_fall_back_to_defaults_with_a_note(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(contract.ENV_ATTEMPT, "two")
    monkeypatch.setenv(contract.ENV_DEADLINE, "nan")
    monkeypatch.setenv(contract.ENV_CHECKPOINT_EVERY_SECONDS, "-5")
    assert script.attempt() == 1
    assert script.deadline() is None
    assert script.checkpoint_every_seconds() is None
    assert "BACKPROP_ATTEMPT" in capsys.readouterr().err


def test_should_stop_turns_true_within_the_margin_of_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    script._state.started = time.time() - 595  # ten minutes into a ten-minute box, less 5 s
    monkeypatch.setenv(contract.ENV_DEADLINE, str(time.time() + 5))
    assert script.should_stop() is True
    assert script.should_stop(margin_seconds=1) is False
    assert script.stop_exit_code() == 124


@pytest.mark.parametrize(
    ("box", "margin"),
    [(3.0, 0.3), (18.0, 1.8), (60.0, 6.0), (100.0, 10.0), (600.0, 10.0), (86400.0, 10.0)],
)
def test_the_stop_margin_is_a_tenth_of_the_box_at_most_ten_seconds(
    monkeypatch: pytest.MonkeyPatch, box: float, margin: float
) -> None:
    now = time.time()
    script._state.started = now
    monkeypatch.setenv(contract.ENV_DEADLINE, str(now + box))
    assert script.stop_margin() == pytest.approx(margin, abs=1e-3)


def test_a_short_box_is_not_cut_in_half(monkeypatch: pytest.MonkeyPatch) -> None:
    # The case: an 18 s box stopped after 9 s with a fixed 10 s margin.
    now = time.time()
    script._state.started = now - 9
    monkeypatch.setenv(contract.ENV_DEADLINE, str(now + 9))
    assert script.should_stop() is False
    script._state.started = now - 16.5
    monkeypatch.setenv(contract.ENV_DEADLINE, str(now + 1.5))
    assert script.should_stop() is True


def test_without_a_deadline_there_is_no_margin_and_no_stop() -> None:
    assert script.stop_margin() is None
    assert script.should_stop() is False


def test_should_checkpoint_follows_the_interval_and_restarts_after_a_checkpoint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(contract.ENV_CHECKPOINT_EVERY_SECONDS, "1e-9")
    assert script.should_checkpoint() is True
    monkeypatch.setenv(contract.ENV_CHECKPOINT_EVERY_SECONDS, "3600")
    assert script.should_checkpoint() is False
    script.checkpoint_saved("a.pt")
    assert script.should_checkpoint() is False
    capsys.readouterr()


class _FakeCuda:
    def __init__(self, total_bytes: int, devices: int = 1) -> None:
        self.total_bytes = total_bytes
        self.devices = devices
        self.fractions: list[tuple[float, int]] = []

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.devices

    def get_device_properties(self, index: int) -> SimpleNamespace:
        return SimpleNamespace(total_memory=self.total_bytes)

    def set_per_process_memory_fraction(self, fraction: float, device: int) -> None:
        self.fractions.append((fraction, device))


@pytest.fixture
def no_xla_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # setenv first so that monkeypatch restores the variable's absence afterwards.
    for name in (
        "XLA_PYTHON_CLIENT_MEM_FRACTION",
        "XLA_CLIENT_MEM_FRACTION",
        "XLA_PYTHON_CLIENT_PREALLOCATE",
    ):
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)


@pytest.mark.usefixtures("no_xla_env")
def test_the_gpu_limit_in_mb_becomes_a_pytorch_memory_fraction_per_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = _FakeCuda(total_bytes=8 * 1024**3, devices=2)
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    monkeypatch.setenv(contract.ENV_GPU_MEMORY_LIMIT_MB, "2048")
    assert script.apply_gpu_memory_limit() is True
    assert cuda.fractions == [(0.25, 0), (0.25, 1)]


@pytest.mark.usefixtures("no_xla_env")
def test_the_gpu_memory_fraction_is_preferred_when_given(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = _FakeCuda(total_bytes=8 * 1024**3)
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    monkeypatch.setenv(contract.ENV_GPU_MEMORY_LIMIT_MB, "2048")
    monkeypatch.setenv(contract.ENV_GPU_MEMORY_FRACTION, "0.5")
    assert script.apply_gpu_memory_limit() is True
    assert cuda.fractions == [(0.5, 0)]
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5000"


@pytest.mark.usefixtures("no_xla_env")
def test_tensorflow_gets_a_logical_device_with_the_memory_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    configured: list[tuple[str, list[Any]]] = []
    config = SimpleNamespace(
        list_physical_devices=lambda kind: ["GPU:0"] if kind == "GPU" else [],
        LogicalDeviceConfiguration=lambda memory_limit: ("limit", memory_limit),
        set_logical_device_configuration=lambda gpu, configs: configured.append((gpu, configs)),
    )
    monkeypatch.setitem(sys.modules, "tensorflow", SimpleNamespace(config=config))
    monkeypatch.setenv(contract.ENV_GPU_MEMORY_LIMIT_MB, "1500")
    assert script.apply_gpu_memory_limit() is True
    assert configured == [("GPU:0", [("limit", 1500)])]


@pytest.mark.usefixtures("no_xla_env")
def test_a_framework_error_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(fraction: float, device: int) -> None:
        raise RuntimeError("CUDA error: out of memory")

    cuda = SimpleNamespace(
        is_available=lambda: True, device_count=lambda: 1, set_per_process_memory_fraction=fail
    )
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    monkeypatch.setenv(contract.ENV_GPU_MEMORY_FRACTION, "0.5")
    assert script.apply_gpu_memory_limit() is False
    assert "out of memory" in capsys.readouterr().err


@pytest.mark.usefixtures("no_xla_env")
def test_applying_the_gpu_limit_never_imports_a_framework(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("torch", "tensorflow", "jax"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setenv(contract.ENV_GPU_MEMORY_LIMIT_MB, "1024")
    assert script.apply_gpu_memory_limit() is False
    assert not {"torch", "tensorflow", "jax"} & set(sys.modules)


# A child that loops until should_stop(), as a training loop would.
STOP_CHILD = textwrap.dedent("""
    import sys, time
    from backprop_mcp import script
    script.install_stop_handler()
    print("ready", flush=True)
    while not script.should_stop():
        time.sleep(0.01)
    try:
        # Printed inside `try`: the test sends the second signal as soon as it reads this line.
        print("stopping", script.stop_exit_code(), flush=True)
        while True:  # checkpointing, in real life; a second signal must cut this short
            time.sleep(0.01)
    finally:
        print("finally ran", flush=True)
""")


class _Child:
    """A child process whose stdout lines arrive on a queue, so every wait is bounded."""

    def __init__(self, code: str, env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, "PYTHONPATH": str(SRC.parent), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def next_line(self) -> str:
        return self.lines.get(timeout=CHILD_TIMEOUT)

    def finish(self) -> int:
        return self.proc.wait(timeout=CHILD_TIMEOUT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=CHILD_TIMEOUT)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., _Child]]:
    """Starts children that are killed and reaped however the test ends."""
    children: list[_Child] = []

    def start(code: str, env: dict[str, str] | None = None) -> _Child:
        children.append(_Child(code, env))
        return children[-1]

    yield start
    for child in children:
        child.close()


@pytest.mark.parametrize(("signum", "second_exit"), [(signal.SIGINT, -signal.SIGINT), (signal.SIGTERM, 143)])
def test_a_stop_signal_sets_should_stop_and_a_second_one_ends_the_script_through_finally(
    spawn: Callable[..., _Child], signum: int, second_exit: int
) -> None:
    child = spawn(STOP_CHILD)
    assert child.next_line() == "ready"
    child.proc.send_signal(signum)
    assert child.next_line() == f"stopping {128 + signum}"
    child.proc.send_signal(signum)
    assert child.next_line() == "finally ran"
    # A second SIGINT is a KeyboardInterrupt, which Python reports as death by SIGINT.
    assert child.finish() == second_exit


def test_the_configured_stop_signal_is_handled_too(spawn: Callable[..., _Child]) -> None:
    child = spawn(STOP_CHILD, env={contract.ENV_STOP_SIGNAL: "SIGUSR1"})
    assert child.next_line() == "ready"
    child.proc.send_signal(signal.SIGUSR1)
    assert child.next_line() == f"stopping {128 + signal.SIGUSR1}"


def test_restore_default_sigint_brings_back_keyboard_interrupt(spawn: Callable[..., _Child]) -> None:
    code = textwrap.dedent("""
        import time
        from backprop_mcp import script
        script.install_stop_handler()
        script.restore_default_sigint()
        try:
            print("ready", flush=True)
            time.sleep(60)
        except KeyboardInterrupt:
            print("interrupted", script.should_stop(), flush=True)
    """)
    child = spawn(code)
    assert child.next_line() == "ready"
    child.proc.send_signal(signal.SIGINT)
    assert child.next_line() == "interrupted False"
    assert child.finish() == 0


def test_after_ignore_stop_signals_no_stop_signal_changes_how_the_script_exits(
    spawn: Callable[..., _Child],
) -> None:
    code = textwrap.dedent("""
        import os, signal
        from backprop_mcp import script
        script.install_stop_handler()
        script.ignore_stop_signals()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            os.kill(os.getpid(), signum)
        print("still here", script.should_stop(), flush=True)
        raise SystemExit(124)
    """)
    child = spawn(code, env={contract.ENV_STOP_SIGNAL: "SIGUSR1"})
    assert child.next_line() == "still here False"
    assert child.finish() == 124
