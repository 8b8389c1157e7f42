"""The PyTorch digits example (examples/train_torch_digits.py) keeps the script contract on real
training: time-boxed three times and resumed, it ends exactly where one uninterrupted run ends.

PyTorch runs only in the children (the scripts backprop starts): importing it here would warn
under filterwarnings=error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from backprop_mcp.core import contract
from backprop_mcp.runs import history
from backprop_mcp.runs.service import Service
from tests.helpers import cli, cli_json, isolated_env, unique_id, wait_for_end

pytestmark = pytest.mark.skipif(
    find_spec("torch") is None or find_spec("sklearn") is None,
    reason="the digits example needs PyTorch and scikit-learn (the examples extra)",
)

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "train_torch_digits.py"
# 26 epochs of 45 batches of 32: 1170 steps, validated every 90.
ARGS = ["--epochs", "26", "--batch-size", "32", "--eval-every", "90", "--log-every", "30"]
TOTAL_STEPS = 1170
# `-m` takes any positive number of minutes, but a box must outlast the script's imports (torch
# and scikit-learn: about 1.5 s on a fast idle machine, 5 s and more on a busy 2-core one). A 9 s
# box leaves a fast machine at most about 7 s of training (less the helper's 10% stop margin): at
# 20 ms a step (--step-delay) under 360 steps, so three boxes (under 1080) never reach the 1170th
# step there, while a slow machine that trains little in each box finishes the rest in the fourth
# attempt in about 20 s. The delay does not change the result: the uninterrupted run goes at full
# speed and must still end with the same weights.
BOX_MINUTES = "0.15"
SLOW = ["--step-delay", "0.02"]
# The last attempt's box: room for every remaining step on a slow machine.
LAST_BOX_MINUTES = "5"
# Bounds one CLI call: a run in the foreground lasts its box (or its training), its stop signal's
# grace included, plus start-up on a slow machine.
CALL_SECONDS = 180.0
# Seconds between the box's stop signal and SIGTERM: a stop that lands while a slow machine is
# still importing torch is answered with a checkpoint only after the imports.
GRACE = ["--grace-seconds", "60"]
# Bounds a direct run of the example (imports and one short epoch).
CHILD_SECONDS = 120.0


def digest_of(service: Service, run_id: str, attempt: int) -> str:
    """The weights fingerprint the example prints at its end."""
    log = service.store.log_path(run_id, attempt).read_text(encoding="utf-8")
    found = [line.split()[-1] for line in log.splitlines() if "weights sha256" in line]
    assert len(found) == 1, log[-2000:]
    return found[0]


def test_a_run_time_boxed_and_resumed_three_times_ends_with_the_weights_of_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    boxed_id = unique_id("boxed")
    whole_id = unique_id("whole")
    env = isolated_env(tmp_path / "home", CUDA_VISIBLE_DEVICES="")  # CPU: deterministic kernels
    service = Service(Path(env["BACKPROP_HOME"]), env=env)
    boxed = ["--run-id", boxed_id, "-m", BOX_MINUTES, *GRACE]
    first = cli(env, "run", str(DIGITS), *boxed, "--", *ARGS, *SLOW, timeout=CALL_SECONDS)
    assert first.returncode == 4, first.stdout + first.stderr  # timed out
    for _ in range(2):
        again = cli(env, "resume", boxed_id, "-m", BOX_MINUTES, *GRACE, timeout=CALL_SECONDS)
        assert again.returncode == 4, again.stdout + again.stderr
    # The uninterrupted run, at full speed, beside the last attempt (not beside a box, whose
    # start-up it would slow down).
    whole = cli(env, "run", str(DIGITS), "--run-id", whole_id, "-f", "auto", "--detach", "--", *ARGS)
    assert whole.returncode == 0, whole.stderr
    last = cli(env, "resume", boxed_id, "-m", LAST_BOX_MINUTES, timeout=CALL_SECONDS)
    assert last.returncode == 0, last.stdout + last.stderr

    record = cli_json(env, "status", boxed_id)
    attempts = record["attempts"]
    assert [(a["status"], a["termination_reason"]) for a in attempts] == [
        ("timed_out", "deadline"),
        ("timed_out", "deadline"),
        ("timed_out", "deadline"),
        ("completed", "exit_zero"),
    ]
    # Each boxed attempt saved a checkpoint when its box ended (in its log: an attempt that trained
    # no step saves the same file at the same step, which the record counts once), and each next
    # attempt started from the newest one.
    for attempt in (1, 2, 3):
        log = service.store.log_path(boxed_id, attempt).read_text(encoding="utf-8")
        assert '"event":"checkpoint_saved"' in log, log[-2000:]
    checkpoints = record["checkpoints"]
    for before, attempt in enumerate(attempts[1:], start=1):
        newest = [c for c in checkpoints if c["attempt"] <= before][-1]
        assert attempt["resume_from"] == newest["path"]
    cut_at = [c for c in checkpoints if c["attempt"] <= 3][-1]["step"]
    assert cut_at < TOTAL_STEPS, "three boxes trained to the end: the boxes cut nothing"
    assert cut_at > 0, "no box saw a single step: the machine is too slow for this test's box"
    assert checkpoints[-1]["step"] == TOTAL_STEPS

    assert wait_for_end(service, whole_id, timeout=CALL_SECONDS)["status"] == "completed"
    reference = cli_json(env, "status", whole_id)
    assert reference["framework"] == record["framework"] == "pytorch"
    assert record["metrics"]["val_loss"] == reference["metrics"]["val_loss"]
    assert record["metrics"]["val_acc"] == reference["metrics"]["val_acc"]
    assert record["metrics"]["val_acc"] > 0.9  # it learned the digits
    assert digest_of(service, boxed_id, 4) == digest_of(service, whole_id, 1)
    # The whole way there too: the joined curves of the four attempts are the uninterrupted ones.
    boxed_record, whole_record = service.get(boxed_id), service.get(whole_id)
    for metric in ("loss", "acc", "val_loss"):
        assert history.series(service.store, boxed_record, metric) == history.series(
            service.store, whole_record, metric
        ), metric


def run_outside_backprop(
    cwd: Path, *args: str, resume_from: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in contract.CONTRACT_ENV}
    env |= {"PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    if resume_from is not None:
        env[contract.ENV_RESUME_FROM] = str(resume_from)
    return subprocess.run(
        [sys.executable, str(DIGITS), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=CHILD_SECONDS,
        check=False,
    )


# Run before the example: any attempt to reach the network (a download of the data) fails it.
NO_NETWORK = """
import runpy, sys
def deny(event, args):
    if event.startswith(("socket.", "urllib.")):
        raise RuntimeError(f"the example reached for the network: {event} {args}")
sys.addaudithook(deny)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_outside_backprop_it_trains_offline_and_refuses_checkpoints_it_cannot_continue(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in contract.CONTRACT_ENV}
    env |= {"PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    offline = subprocess.run(
        [sys.executable, "-c", NO_NETWORK, str(DIGITS), "--epochs", "1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=CHILD_SECONDS,
        check=False,
    )
    assert offline.returncode == 0, offline.stderr
    final = tmp_path / "checkpoints" / "final.pt"
    assert f'"path":"{final}"' in offline.stdout

    other = run_outside_backprop(tmp_path, "--epochs", "1", "--hidden", "32", resume_from=final)
    assert other.returncode == 2, other.stderr
    assert "cannot resume" in other.stderr
    assert "--hidden 128 there, 32 here" in other.stderr
    assert "Traceback" not in other.stderr

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint\n")
    broken = run_outside_backprop(tmp_path, "--epochs", "1", resume_from=garbage)
    assert broken.returncode == 2, broken.stderr
    assert f"cannot resume from {garbage}" in broken.stderr
    assert "Traceback" not in broken.stderr

    # A checkpoint cut short (a copy, a full disk): refused, saying so.
    cut = tmp_path / "cut.pt"
    cut.write_bytes(final.read_bytes()[:5000])
    broken = run_outside_backprop(tmp_path, "--epochs", "1", resume_from=cut)
    assert broken.returncode == 2, broken.stderr
    assert f"cannot resume from {cut}" in broken.stderr and "damaged" in broken.stderr, broken.stderr
    assert "Traceback" not in broken.stderr
