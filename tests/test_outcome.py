"""The naming of an attempt's end: every stop reason against every kind of exit."""

from __future__ import annotations

import pytest

from backprop_mcp.runs.outcome import Outcome, classify, describe


@pytest.mark.parametrize(
    ("stop_reason", "returncode", "expected"),
    [
        (None, 0, Outcome("completed", "exit_zero", 0, None)),
        (None, 3, Outcome("failed", "exit_nonzero", 3, None)),
        (None, -11, Outcome("failed", "signal", None, "SIGSEGV")),
        (None, -9, Outcome("failed", "signal", None, "SIGKILL")),
        ("deadline", 130, Outcome("timed_out", "deadline", 130, None)),
        ("deadline", 0, Outcome("timed_out", "deadline", 0, None)),
        ("deadline", -9, Outcome("timed_out", "deadline", None, "SIGKILL")),
        ("wall_clock_cap", -15, Outcome("timed_out", "wall_clock_cap", None, "SIGTERM")),
        ("stop_requested", 0, Outcome("stopped", "stop_requested", 0, None)),
        ("stop_requested", -9, Outcome("stopped", "stop_requested", None, "SIGKILL")),
        ("gpu_memory_limit", 0, Outcome("failed", "gpu_memory_limit", 0, None)),
        ("gpu_memory_limit", 130, Outcome("failed", "gpu_memory_limit", 130, None)),
    ],
)
def test_our_stop_reason_wins_over_the_exit_status(
    stop_reason: str | None, returncode: int, expected: Outcome
) -> None:
    assert classify(stop_reason, returncode) == expected


@pytest.mark.parametrize(
    ("outcome", "words"),
    [
        (Outcome("completed", "exit_zero", 0, None), "exited with code 0"),
        (Outcome("failed", "exit_nonzero", 3, None), "exited with code 3"),
        (Outcome("failed", "signal", None, "SIGSEGV"), "killed by SIGSEGV"),
        (Outcome("timed_out", "deadline", 130, None), "time box ended"),
        (Outcome("timed_out", "wall_clock_cap", 130, None), "wall-clock cap"),
        (Outcome("stopped", "stop_requested", 0, None), "stopped on request"),
    ],
)
def test_each_outcome_is_described_in_words(outcome: Outcome, words: str) -> None:
    assert words in describe(outcome)


def test_the_gpu_memory_outcome_keeps_the_measured_detail() -> None:
    outcome = Outcome("failed", "gpu_memory_limit", 0, None)
    assert describe(outcome, "GPU memory 5000 MB > limit 4096 MB") == "GPU memory 5000 MB > limit 4096 MB"


@pytest.mark.parametrize(
    ("returncode", "box_used", "expected"),
    [
        # The contract's "stopped for the deadline" status late in the box: a timeout, as asked.
        (124, 0.9, Outcome("timed_out", "deadline", 124, None)),
        (124, 0.5, Outcome("timed_out", "deadline", 124, None)),
        (124, 1.2, Outcome("timed_out", "deadline", 124, None)),
        # The same status early in the box, or with no box known, is an ordinary failure.
        (124, 0.1, Outcome("failed", "exit_nonzero", 124, None)),
        (124, None, Outcome("failed", "exit_nonzero", 124, None)),
        # Other statuses late in the box keep their own meaning.
        (0, 0.95, Outcome("completed", "exit_zero", 0, None)),
        (1, 0.95, Outcome("failed", "exit_nonzero", 1, None)),
        (-9, 0.95, Outcome("failed", "signal", None, "SIGKILL")),
    ],
)
def test_a_script_that_stops_itself_for_the_deadline_timed_out(
    returncode: int, box_used: float | None, expected: Outcome
) -> None:
    assert classify(None, returncode, box_used=box_used) == expected


@pytest.mark.parametrize("stop_reason", ["stop_requested", "deadline", "wall_clock_cap", "gpu_memory_limit"])
def test_our_reason_still_wins_over_a_deadline_exit(stop_reason: str) -> None:
    assert classify(stop_reason, 124, box_used=0.95).reason == stop_reason


def test_a_deadline_exit_is_described_as_the_script_stopping_for_it() -> None:
    assert "stopped for it (exit 124)" in describe(Outcome("timed_out", "deadline", 124, None))
