"""What the framework callbacks share: one training's side of the script contract (`Session`),
turning a framework's logged values into numbers, and the GPU memory limit applied once.

Standard library only, on top of `backprop_mcp.script`: the callbacks differ only in which hook
of their framework calls which method here.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable, Mapping

from backprop_mcp import script as bp

# Values reported batch by batch go out at most this often (the step and loss of a fast model
# would otherwise be a line per batch): ten a second is a live view and more points than the
# metric history keeps per metric, and converting a GPU tensor to a number waits for the GPU, so
# fewer conversions also cost less. Values the framework logs on its own cadence (a logging
# interval, an epoch's end, a validation) and the last step before a checkpoint or the end are
# always sent.
PROGRESS_EVERY_SECONDS = 0.1

# Checkpoints a callback keeps of those it wrote itself (older ones are deleted as new ones
# land): two, so that if the newest turns out unreadable the one before is still there. The
# checkpoint a run resumed from is never deleted by the attempt that resumed it.
KEEP_CHECKPOINTS = 2

_FRAMEWORKS = ("torch", "tensorflow", "jax")


class _Limited:
    """The frameworks the GPU memory limit was applied for in this process (None: not yet)."""

    frameworks: frozenset[str] | None = None


def resume_path() -> str | None:
    """The checkpoint this attempt resumes from (`BACKPROP_RESUME_FROM`), or None to start fresh.

    Pass it to the framework: `trainer.fit(model, ckpt_path=resume_path())` in Lightning,
    `trainer.train(resume_from_checkpoint=resume_path())` in Hugging Face (Keras needs nothing).
    """
    return bp.resume_from()


def limit_gpu_memory() -> bool:
    """Apply the run's GPU memory limit to the frameworks imported so far, once per framework.

    Called again after another framework was imported, it applies the limit for that one too
    (TensorFlow refuses a second configuration, so each is configured once). Returns whether a
    limit was applied by this call.
    """
    loaded = frozenset(name for name in _FRAMEWORKS if name in sys.modules)
    done = _Limited.frameworks
    if done is not None and loaded <= done:
        return False
    _Limited.frameworks = loaded | (done or frozenset())
    return bp.apply_gpu_memory_limit()


def scalar(value: object) -> float | None:
    """A logged value as a float: a number, a NumPy scalar, a one-element tensor or array; None for
    anything else (strings, bools, None, tensors of several values). Non-finite values are kept:
    the helper leaves them out of events with a note, so a diverged loss is said, not hidden."""
    if value is None or isinstance(value, bool | str | bytes):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        # 0-d and one-element tensors and arrays convert; larger ones raise.
        return float(value)  # type: ignore[arg-type]  # anything with __float__, checked here
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return None


def scalars(values: Mapping[str, object] | None, skip: Iterable[str] = ()) -> dict[str, float]:
    """The entries of `values` that are single numbers, by name, without the names in `skip`."""
    left_out = set(skip)
    found: dict[str, float] = {}
    for name, value in (values or {}).items():
        if not isinstance(name, str) or not name or name in left_out:
            continue
        number = scalar(value)
        if number is not None:
            found[name] = number
    return found


class Session:
    """One training's side of the contract, driven by a framework callback.

    `emit` is False on the processes of a multi-process training that are not its first (rank
    zero reports for all of them); such a process still decides to stop and save with the others.
    """

    def __init__(
        self,
        *,
        keep_checkpoints: int | None = KEEP_CHECKPOINTS,
        margin_seconds: float | None = None,
        progress_every: float = PROGRESS_EVERY_SECONDS,
    ) -> None:
        if keep_checkpoints is not None and keep_checkpoints < 1:
            raise ValueError(
                f"keep_checkpoints must be at least 1 or None (keep all), got {keep_checkpoints!r}"
            )
        self.emit = True
        self.keep = keep_checkpoints
        self.margin = margin_seconds
        self.progress_every = progress_every
        # Why training is being stopped ("deadline" or "signal"), once it is.
        self.stopping: str | None = None
        self.saved_step: int | None = None
        self.last_checkpoint: str | None = None
        self._written: list[str] = []
        self._last_sent = -math.inf
        self._pending: tuple[int, int | None, float | None, dict[str, float]] | None = None
        self._started = False

    def start(self) -> None:
        """Turn the stop signal into a flag (training then stops at the next step's end) and apply
        the GPU memory limit to the frameworks imported so far. Idempotent."""
        limit_gpu_memory()
        if self._started:
            return
        self._started = True
        try:
            bp.install_stop_handler()
        except ValueError:
            # Signal handlers can only be set from the main thread; the stop signal then raises
            # KeyboardInterrupt as usual and the deadline is still kept by should_stop().
            note(
                "the callback was created outside the main thread: a stop signal interrupts training at once"
            )

    # --- what happened -------------------------------------------------------------------------

    def progress(
        self,
        step: int,
        total: int | None = None,
        loss: float | None = None,
        metrics: Mapping[str, float] | None = None,
        *,
        force: bool = False,
    ) -> None:
        """Report a step; sent at once when forced, else at most every `progress_every` seconds
        (the latest values wait for the next send or `flush()`)."""
        self._pending = (step, total if total and total > 0 else None, loss, dict(metrics or {}))
        now = time.monotonic()
        if force or now - self._last_sent >= self.progress_every:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Send the step that is waiting, if any."""
        pending, self._pending = self._pending, None
        if pending is None or not self.emit:
            return
        step, total, loss, metrics = pending
        bp.progress(step, total=total, loss=loss, **metrics)
        self._last_sent = time.monotonic() if now is None else now

    def validation(self, metrics: Mapping[str, float], step: int | None) -> None:
        """Report validation values, one metric event each."""
        self.flush()
        if self.emit:
            for name, value in metrics.items():
                bp.metric(name, value, step=step)

    def finish(self, metrics: Mapping[str, float]) -> None:
        """The training ended by itself: the final event, unless it was stopped."""
        self.flush()
        if self.emit and self.stopping is None:
            bp.done(**metrics)

    # --- what to do ----------------------------------------------------------------------------

    def should_stop(self) -> bool:
        """True once a stop signal came or the deadline is near (it stays true)."""
        if self.stopping is None and bp.should_stop(self.margin):
            self.mark_stopping()
        return self.stopping is not None

    def mark_stopping(self) -> None:
        """Training stops now (this process decided it, or another process of the training did)."""
        if self.stopping is None:
            self.stopping = "deadline" if bp.stop_exit_code() == bp.EXIT_DEADLINE else "signal"

    def should_checkpoint(self) -> bool:
        """True when the run's checkpoint interval has passed."""
        return bp.should_checkpoint()

    def end_if_stopped(self) -> None:
        """After the framework stopped training for us: exit with the contract's status (124 for
        the deadline, 128 + the signal for a stop signal), so the run is recorded as timed out or
        stopped, not as completed."""
        if self.stopping is None:
            return
        self.flush()
        code = bp.stop_exit_code()
        why = "the deadline is near" if self.stopping == "deadline" else "a stop signal came"
        where = f"; last checkpoint {self.last_checkpoint}" if self.last_checkpoint else ""
        note(f"training stopped because {why}{where}; exiting with status {code}")
        with contextlib.suppress(ValueError):  # ValueError: not the main thread
            bp.ignore_stop_signals()
        raise SystemExit(code)

    # --- checkpoints ---------------------------------------------------------------------------

    def checkpoint_path(self, name: str) -> str:
        """Where a checkpoint called `name` goes: the run's checkpoint folder."""
        return os.path.join(bp.checkpoint_dir(), name)

    def publish(self, partial: str, final: str, step: int) -> None:
        """Move a completely written checkpoint (file or folder) into place, report it and drop
        the oldest ones this session wrote beyond `keep_checkpoints`."""
        if os.path.isdir(final) and not os.path.islink(final):
            # The same step saved again (a resumed attempt passing it once more): a folder cannot
            # be replaced in one rename, so the old one goes aside first.
            aside = final + ".old"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
            os.replace(partial, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(partial, final)
        self.saved(final, step, rotate=True)

    def saved(self, path: str, step: int, *, rotate: bool = False) -> None:
        """Report a checkpoint written by the framework; with `rotate`, it counts towards
        `keep_checkpoints`."""
        self.flush()
        self.saved_step = step
        self.last_checkpoint = os.path.abspath(path)
        if self.emit:
            bp.checkpoint_saved(self.last_checkpoint, step=step)
        if not rotate:
            return
        if self.last_checkpoint in self._written:
            self._written.remove(self.last_checkpoint)
        self._written.append(self.last_checkpoint)
        while self.keep is not None and len(self._written) > self.keep:
            _remove(self._written.pop(0))


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except OSError as exc:
        note(f"could not delete the old checkpoint {path}: {exc}")


def note(message: str) -> None:
    print(f"backprop: {message}", file=sys.stderr, flush=True)
