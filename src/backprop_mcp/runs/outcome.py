"""How an attempt's end is named: its final state, reason, exit code and signal, and the words
that describe them. Pure functions, so every combination is checked by a table."""

from __future__ import annotations

import signal
from typing import NamedTuple

from backprop_mcp.core.contract import EXIT_DEADLINE

# A script that exits with EXIT_DEADLINE is taken at its word (it stopped itself for the deadline,
# as the contract asks) once it has used at least this share of its time box: the helper's margin
# is at most 10% of the box, and a script that picks its own margin still stops in the last part
# of it. The same status an hour early is a failure with an odd exit code, not a timeout.
DEADLINE_EXIT_MIN_SHARE = 0.5


class Outcome(NamedTuple):
    """The truthful end of an attempt."""

    status: str
    reason: str
    exit_code: int | None
    signal: str | None


def classify(stop_reason: str | None, returncode: int | None, *, box_used: float | None = None) -> Outcome:
    """Name the end of an attempt from why we stopped it (if we did) and how the script exited.

    `stop_reason` is given only when we acted on it (sent the stop signal or killed the script)
    before the script exited on its own; a stop that came later changes nothing. Our reason wins
    over the exit status: a script that exits 0 on SIGINT at the deadline still ran out of time,
    and one killed for its GPU memory failed even if a handler exited cleanly. `box_used` is the
    share of the time box the script had used when it exited: with it, exit status
    `EXIT_DEADLINE` late in the box is a script that stopped itself for the deadline.
    """
    code: int | None = returncode
    sig: str | None = None
    if returncode is not None and returncode < 0:
        code, sig = None, signal.Signals(-returncode).name
    if stop_reason in ("deadline", "wall_clock_cap"):
        return Outcome("timed_out", stop_reason, code, sig)
    if stop_reason in ("stop_requested", "pruned"):
        return Outcome("stopped", stop_reason, code, sig)
    if stop_reason == "gpu_memory_limit":
        return Outcome("failed", "gpu_memory_limit", code, sig)
    if sig is not None:
        return Outcome("failed", "signal", code, sig)
    if code == EXIT_DEADLINE and box_used is not None and box_used >= DEADLINE_EXIT_MIN_SHARE:
        return Outcome("timed_out", "deadline", code, sig)
    if code == 0:
        return Outcome("completed", "exit_zero", code, sig)
    return Outcome("failed", "exit_nonzero", code, sig)


def describe(outcome: Outcome, detail: str | None = None) -> str:
    """The outcome in words, for `status_detail`."""
    reason = outcome.reason
    if reason == "exit_zero":
        return "the script exited with code 0"
    if reason == "exit_nonzero":
        return f"the script exited with code {outcome.exit_code}"
    if reason == "signal":
        return f"the script was killed by {outcome.signal}"
    if reason == "deadline":
        if outcome.exit_code == EXIT_DEADLINE:
            return f"the time box ended; the script stopped for it (exit {EXIT_DEADLINE})"
        return "the time box ended; the script was asked to stop"
    if reason == "wall_clock_cap":
        return "the wall-clock cap (paused time included) ended"
    if reason == "gpu_memory_limit":
        return detail or "the run exceeded its GPU memory limit"
    if reason == "pruned":
        return detail or "pruned by its sweep: its metric was worse than the median of earlier trials"
    return "stopped on request"
