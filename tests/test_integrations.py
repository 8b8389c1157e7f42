"""The framework callbacks (`backprop_mcp.integrations`) keep the script contract with the real
frameworks on CPU: a tiny model on generated data, run through the real `backprop` CLI. Each run
is time-boxed (it must end `timed_out` with a checkpoint at the step it stopped), resumed and
stopped (`stopped`, a checkpoint again), and resumed to the end (`completed`, from past step 0).

The frameworks run only in the scripts' processes, never in pytest's. Each framework's test is
skipped, with the reason, where the framework cannot be imported.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import pytest

from backprop_mcp.core.records import RunRecord
from backprop_mcp.integrations import common
from backprop_mcp.runs.history import MAX_POINTS
from backprop_mcp.runs.service import Service
from tests.helpers import FIXTURES, WAIT_SECONDS, cli, wait_until

# The first attempt's time box. Importing a framework took up to 11 s on a loaded 2-core machine
# here (Lightning), so the box leaves room for that and for training.
BOX_SECONDS = 30.0
# The callbacks stop this long before the deadline (instead of the helper's tenth of the box, 3 s):
# time to checkpoint and exit even on a stalled machine, so the exit status is the callback's
# (124) rather than the supervisor's stop signal, and a callback that exited 0 would be recorded
# completed. Past half the box, as an exit 124 must be to count as a timeout.
STOP_MARGIN = 8.0
# Each step of a slowed attempt sleeps this long, so the first attempt trains until its box ends
# and the second until it is stopped, whatever the machine's speed, at little CPU.
STEP_DELAY = "0.05"
# The run's checkpoint interval (1.2 s): several interval checkpoints land in each slowed attempt.
CHECKPOINT_EVERY_MINUTES = 0.02
# A foreground `backprop run` waits for the whole box, then for the script's exit.
RUN_TIMEOUT = BOX_SECONDS + WAIT_SECONDS
# Steps (or epochs) the last attempt trains past its checkpoint: a few, so it ends soon.
MORE_STEPS = 16
# Longer than any attempt runs.
STEPS = ["--steps", "1000000"]
# The fixtures' batches per epoch (64 rows in batches of 8).
BATCHES_PER_EPOCH = 8
# The Hugging Face fixture logs its loss every second step: the first loss of an attempt comes at
# most this many steps after its checkpoint.
LOG_EVERY = 2
# Followed in the foreground, the CLI exits with 4 for a timed-out run and 0 for a completed one.
EXIT_TIMED_OUT, EXIT_COMPLETED = 4, 0
FRAMEWORKS = (
    "torch",
    "lightning",
    "pytorch_lightning",
    "transformers",
    "keras",
    "tensorflow",
    "jax",
    "numpy",
)


def needs(*modules: str) -> pytest.MarkDecorator:
    missing = [name for name in modules if find_spec(name) is None]
    return pytest.mark.skipif(
        bool(missing),
        reason=f"{', '.join(missing)} cannot be imported (pip install -e '.[test]' installs it)",
    )


def train_stop_and_resume(
    env: dict[str, str],
    service: Service,
    tmp_path: Path,
    fixture: str,
    validation_metric: str,
    endless: list[str],
    final_args: Callable[[int], list[str]],
) -> RunRecord:
    """Time-box, resume and stop, resume to the end; returns the final record. `endless`: the
    fixture's arguments for a training longer than any attempt; `final_args(step)`: for one that
    ends soon after `step`."""
    run_id = f"{Path(fixture).stem}-run"
    script = str(FIXTURES / fixture)
    slow = ["--step-delay", STEP_DELAY, "--stop-margin", str(STOP_MARGIN), *endless]
    box = str(BOX_SECONDS / 60)
    interval = str(CHECKPOINT_EVERY_MINUTES)

    # 1. The time box ends it: timed out, not failed or completed, with a checkpoint at its last step.
    done = cli(
        env,
        "run",
        script,
        "--run-id",
        run_id,
        "-m",
        box,
        "-c",
        interval,
        "--",
        *slow,
        cwd=tmp_path,
        timeout=RUN_TIMEOUT,
    )
    first = service.get(run_id)
    assert done.returncode == EXIT_TIMED_OUT, (
        done.stdout,
        done.stderr,
        first["status_detail"],
        _log(service, run_id, 1),
    )
    assert (first["status"], first["termination_reason"]) == ("timed_out", "deadline")
    # The callback stopped for the deadline itself, before the supervisor's signal.
    assert (first["exit_code"], first["signal"]) == (124, None), first["status_detail"]
    saved = [c for c in first["checkpoints"] if c["attempt"] == 1]
    assert len(saved) >= 2, saved  # on the interval, and when the deadline came
    assert saved[-1]["step"] == first["step"], (saved[-1], first["step"])
    assert first["latest_checkpoint"] == saved[-1]["path"] and os.path.exists(saved[-1]["path"])
    assert "loss" in first["metrics"] or first["loss"] is not None
    assert validation_metric in first["metrics"], first["metrics"]

    # 2. Resumed from that checkpoint, then stopped: stopped, with a checkpoint of its own.
    done = cli(env, "resume", run_id, "--detach", "-m", "10", "--", *slow, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert service.get(run_id)["resume_from"] == saved[-1]["path"]

    def saved_in_attempt_two() -> bool:
        record = service.get(run_id)
        return any(c["attempt"] == 2 for c in record["checkpoints"]) or record["status"] not in (
            "queued",
            "running",
        )

    wait_until(saved_in_attempt_two, what="a checkpoint of the resumed attempt")
    done = cli(env, "stop", run_id, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    second = wait_for_attempt_end(service, run_id)
    assert (second["status"], second["termination_reason"]) == ("stopped", "stop_requested"), (
        second["status_detail"],
        _log(service, run_id, 2),
    )
    stopped_at = [c for c in second["checkpoints"] if c["attempt"] == 2]
    assert len(stopped_at) >= 2, stopped_at  # on the interval, and when the stop came
    assert stopped_at[-1]["step"] == second["step"]

    # 3. Resumed again, to the end: completed, from past step 0.
    step = int(stopped_at[-1]["step"] or 0)
    done = cli(env, "resume", run_id, "-m", "10", "--", *final_args(step), cwd=tmp_path, timeout=RUN_TIMEOUT)
    final = service.get(run_id)
    assert done.returncode == EXIT_COMPLETED, (done.stderr, final["status_detail"], _log(service, run_id, 3))
    assert (final["status"], final["attempt"], final["resume_from"]) == (
        "completed",
        3,
        stopped_at[-1]["path"],
    )
    answer = service.metrics([run_id], metrics=["loss", validation_metric], points=MAX_POINTS)["runs"][0]
    assert answer["missing"] == [], answer
    # Each resumed attempt begins on the joined curve where its checkpoint left off, not at step 0
    # (Keras goes back to the start of the epoch it stopped in), and with the trained weights: its
    # first loss is far below the first loss of the run (a fresh model's, the same in every attempt
    # started from scratch: the data and the seeds are fixed).
    assert len(answer["joins"]) == 2, answer["joins"]
    loss = answer["metrics"]["loss"]
    for join, resumed in zip(answer["joins"], (saved[-1], stopped_at[-1]), strict=True):
        assert resumed["step"] is not None
        assert resumed["step"] - BATCHES_PER_EPOCH < join <= resumed["step"] + LOG_EVERY, (join, resumed)
        first_loss_after = next(v for s, v in zip(loss["steps"], loss["values"], strict=True) if s >= join)
        assert first_loss_after < loss["values"][0] / 2, (first_loss_after, loss["values"][0])
    assert final["step"] is not None and final["step"] > step
    return final


def wait_for_attempt_end(service: Service, run_id: str) -> RunRecord:
    def ended() -> RunRecord | None:
        record = service.get(run_id)
        return record if record["status"] not in ("queued", "running") else None

    return wait_until(ended, timeout=RUN_TIMEOUT, what=f"run {run_id} to end")


def _log(service: Service, run_id: str, attempt: int) -> str:
    path = service.store.log_path(run_id, attempt)
    return path.read_text(encoding="utf-8", errors="replace")[-3000:] if path.exists() else "(no log)"


@needs("lightning", "torch")
def test_the_lightning_callback_times_out_stops_and_resumes_with_checkpoints(
    env: dict[str, str], service: Service, tmp_path: Path
) -> None:
    final = train_stop_and_resume(
        env,
        service,
        tmp_path,
        "train_lightning.py",
        "val_loss",
        STEPS,
        lambda step: ["--steps", str(step + MORE_STEPS)],
    )
    assert final["step"] == final["total"]
    assert {"val_loss", "train_mse"} <= set(final["metrics"])


@needs("transformers", "torch", "accelerate")
def test_the_hugging_face_callback_times_out_stops_and_resumes_with_checkpoints(
    env: dict[str, str], service: Service, tmp_path: Path
) -> None:
    final = train_stop_and_resume(
        env,
        service,
        tmp_path,
        "train_hf_trainer.py",
        "eval_loss",
        STEPS,
        lambda step: ["--steps", str(step + MORE_STEPS)],
    )
    assert final["step"] == final["total"]
    assert {"eval_loss", "train_loss"} <= set(final["metrics"])
    # The Trainer's own checkpoint folders, the last one the resumed attempt's.
    assert Path(final["latest_checkpoint"] or "").name.startswith("checkpoint-")
    # Its printed logs went to stderr: stdout held events only.
    assert final["bad_event_lines"] == 0


@needs("keras", "torch")
def test_the_keras_callback_times_out_stops_and_resumes_by_itself(
    env: dict[str, str], service: Service, tmp_path: Path
) -> None:
    env["KERAS_BACKEND"] = "torch"
    final = train_stop_and_resume(
        env,
        service,
        tmp_path,
        "train_keras.py",
        "val_loss",
        ["--epochs", "100000"],
        # Keras resumes at the start of the epoch it stopped in: two or three epochs more.
        lambda step: ["--epochs", str(step // BATCHES_PER_EPOCH + 3)],
    )
    assert final["step"] == final["total"]
    assert {"val_loss", "val_mae", "mae"} <= set(final["metrics"])


@needs("pytorch_lightning", "torch")
def test_the_pytorch_lightning_callback_reports_checkpoints_and_resumes(tmp_path: Path) -> None:
    # The older package has its own Callback base; the hooks are the same, so one short training
    # and one resume of it, outside backprop's supervisor, show that the Trainer takes the callback.
    script = str(FIXTURES / "train_pytorch_lightning.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKPROP_")}
    env |= {"BACKPROP_CHECKPOINT_DIR": str(tmp_path / "ckpt"), "BACKPROP_CHECKPOINT_EVERY_SECONDS": "0.001"}
    events = _events_of(script, env, "--steps", "3")
    checkpoints = [e for e in events if e["event"] == "checkpoint_saved"]
    assert checkpoints, events  # the interval passes between two steps (a tiny one: most steps)
    assert events[-1]["event"] == "done"
    resume = {"BACKPROP_RESUME_FROM": str(checkpoints[-1]["path"])}
    resumed = _events_of(script, env | resume, "--steps", "5")
    first_step = next(e["step"] for e in resumed if e["event"] == "progress")
    assert first_step == int(str(checkpoints[-1]["step"])) + 1
    assert resumed[-1]["event"] == "done"


# --- a stop in the middle of an epoch ------------------------------------------------------------

# The fixtures send themselves the stop signal after this step, in the middle of their first epoch
# (8 batches): before any validation is due.
STOP_STEP = 3


def _stopped(script: str, tmp_path: Path, *args: str) -> tuple[int, list[dict[str, object]]]:
    """Exit status and events of a fixture run outside the supervisor, with a checkpoint folder and
    no checkpoint interval, that signals itself after step STOP_STEP."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKPROP_")}
    env |= {"BACKPROP_CHECKPOINT_DIR": str(tmp_path / "ckpt"), "KERAS_BACKEND": "torch"}
    done = subprocess.run(
        [sys.executable, str(FIXTURES / script), "--signal-at-step", str(STOP_STEP), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"event"')]
    return done.returncode, events


def _assert_stopped_at_once(returncode: int, events: list[dict[str, object]], signum: int) -> None:
    """Ended with 128 + the signal after one checkpoint at the stop step, and nothing after it: no
    validation of a half-trained epoch (it can outlast the time left before the deadline), no
    second save of the same step (a rewrite that a later kill would leave half-written)."""
    assert returncode == 128 + signum, events
    saved = [e for e in events if e["event"] == "checkpoint_saved"]
    assert [e["step"] for e in saved] == [STOP_STEP], saved
    assert events[-1]["event"] == "checkpoint_saved", events
    assert not [e for e in events if e["event"] in ("metric", "done")], events


@needs("lightning", "torch")
@pytest.mark.parametrize("signal_name", ["INT", "TERM"])
def test_a_lightning_training_stopped_mid_epoch_saves_once_skips_validation_and_exits_with_the_signal(
    tmp_path: Path, signal_name: str
) -> None:
    # SIGTERM: Lightning ends fit() with its own SIGTERMException, a SystemExit of status 0.
    returncode, events = _stopped("train_lightning.py", tmp_path, "--signal", signal_name)
    _assert_stopped_at_once(returncode, events, getattr(signal, "SIG" + signal_name))


@needs("transformers", "torch", "accelerate")
def test_a_hugging_face_training_stopped_mid_epoch_saves_once_and_skips_the_epoch_end_evaluation(
    tmp_path: Path,
) -> None:
    returncode, events = _stopped("train_hf_trainer.py", tmp_path, "--per-epoch")
    _assert_stopped_at_once(returncode, events, signal.SIGINT)


@needs("keras", "torch")
def test_a_keras_training_stopped_mid_epoch_saves_once_and_skips_the_validation(tmp_path: Path) -> None:
    returncode, events = _stopped("train_keras.py", tmp_path)
    _assert_stopped_at_once(returncode, events, signal.SIGINT)


def _events_of(script: str, env: dict[str, str], *args: str) -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"event"')]


# --- what importing costs ---------------------------------------------------------------------------


def test_importing_the_integrations_imports_no_framework() -> None:
    # In a child: pytest's own process may have imported anything.
    code = (
        "import json, sys\n"
        "import backprop_mcp.integrations, backprop_mcp.integrations.common\n"
        "import backprop_mcp.integrations.lightning_hooks\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT_SECONDS, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


# --- the shared session, without a framework -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, "1.0"),
        (0.5, "0.5"),
        (float("nan"), "nan"),
        (True, "None"),
        ("0.3", "None"),
        (None, "None"),
        ([1.0], "None"),
    ],
)
def test_only_single_numbers_are_taken_from_logs(value: object, expected: str) -> None:
    # Compared as text: NaN is kept (the helper says it is not finite) and equals nothing.
    assert str(common.scalar(value)) == expected


def test_progress_is_sent_at_most_every_interval_and_the_last_step_on_flush(
    capsys: pytest.CaptureFixture[str],
) -> None:
    session = common.Session(progress_every=3600.0)
    for step in range(1, 6):
        session.progress(step, 10, loss=1.0 / step)
    session.flush()
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["step"] for e in events] == [1, 5]
    assert events[-1]["loss"] == pytest.approx(0.2)


def test_only_the_newest_own_checkpoints_are_kept_and_a_saved_folder_can_be_saved_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BACKPROP_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    resumed_from = tmp_path / "ckpt" / "step0"
    resumed_from.mkdir(parents=True)
    session = common.Session(keep_checkpoints=2)
    for step in (1, 2, 3, 3):
        final = session.checkpoint_path(f"step{step}")
        partial = Path(final + ".partial")
        partial.mkdir()
        (partial / "weights").write_text(str(step), encoding="utf-8")
        session.publish(str(partial), final, step)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step0", "step2", "step3"]
    reported = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["step"] for e in reported] == [1, 2, 3, 3]
    assert session.last_checkpoint == str(tmp_path / "ckpt" / "step3")


def test_a_bad_number_of_checkpoints_to_keep_is_refused_with_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="at least 1 or None"):
        common.Session(keep_checkpoints=0)


class _FakeCuda:
    """torch.cuda at the probe boundary: this machine has no GPU."""

    def __init__(self) -> None:
        self.fractions: list[tuple[float, int]] = []

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def set_per_process_memory_fraction(self, fraction: float, device: int) -> None:
        self.fractions.append((fraction, device))


def test_the_gpu_memory_limit_is_applied_once_per_framework_as_each_is_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(common._Limited, "frameworks", None)
    for name in ("torch", "tensorflow", "jax"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "unset")  # restored to absent afterwards
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    monkeypatch.setenv("BACKPROP_GPU_MEMORY_FRACTION", "0.5")
    # Before any framework (the Keras module's first call): JAX's share, read when JAX starts.
    assert common.limit_gpu_memory() is False
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5000"
    cuda = _FakeCuda()
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    assert common.limit_gpu_memory() is True  # torch imported since: limited now
    assert common.limit_gpu_memory() is False  # and only once
    assert cuda.fractions == [(0.5, 0)]
