"""The Hugging Face `transformers` Trainer callback: events, checkpoints on the run's interval and
at a stop or the deadline, a truthful end, resume.

    from backprop_mcp.integrations.huggingface import BackpropCallback, resume_path

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[BackpropCallback()])
    trainer.train(resume_from_checkpoint=resume_path())

Checkpoints are the Trainer's own `checkpoint-STEP` folders in `args.output_dir` (model,
optimizer, scheduler, RNG states, trainer state), which `resume_from_checkpoint` reads back;
`save_total_limit` rotates them as usual. Importing this module imports `transformers`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from backprop_mcp import script as bp
from backprop_mcp.integrations.common import Session, note, resume_path, scalars

# Keys of the Trainer's logs that describe speed or position, not the model: kept out of events.
_NOT_METRICS = ("epoch", "total_flos")
_SPEED_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_tokens_per_second")
# The Trainer's summary log at the end of training carries this key.
_SUMMARY_KEY = "train_runtime"


class BackpropCallback(TrainerCallback):  # type: ignore[misc]  # transformers is untyped here
    """Reports progress (with each logged loss), evaluation metrics and checkpoints; asks the
    Trainer to checkpoint on the run's interval and to checkpoint and stop when the stop signal or
    the deadline comes, and ends the script with the contract's status."""

    def __init__(self, *, margin_seconds: float | None = None) -> None:
        """`margin_seconds`: how long before the deadline to stop (default: the helper's margin)."""
        super().__init__()
        # Rotation is the Trainer's (save_total_limit): the callback deletes nothing.
        self._session = Session(keep_checkpoints=None, margin_seconds=margin_seconds)
        # In the script's main thread, with torch imported: the stop signal becomes a flag and the
        # GPU limit holds before the Trainer allocates anything for training.
        self._session.start()
        self._final: dict[str, float] = {}
        if bp.run_id() is not None:
            _trainer_logs_to_stderr()

    @property
    def last_checkpoint(self) -> str | None:
        """The newest checkpoint folder reported, or None."""
        return self._session.last_checkpoint

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._session.emit = bool(state.is_world_process_zero)
        if resume_path() and not state.global_step and self._session.emit:
            note(
                "BACKPROP_RESUME_FROM is set but training starts at step 0: pass "
                "resume_from_checkpoint=resume_path() to train()"
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        session = self._session
        session.progress(int(state.global_step), _total(state))
        stop = _any_process(args, session.should_stop())
        if _any_process(args, session.should_checkpoint()) or stop:
            control.should_save = True
        if stop:
            session.mark_stopping()
            control.should_training_stop = True
            # The loss since the last logging step is reported before the end.
            control.should_log = True
            # An evaluation (a whole pass over the evaluation data) could outlast the margin
            # before the deadline; the checkpoint comes first.
            control.should_evaluate = False

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._session.stopping is None:
            return
        # The Trainer ends the epoch it cut short as any other: an evaluation with an "epoch"
        # strategy, and a second save of the step just saved (rewriting the checkpoint in place,
        # where a kill would leave it half-written), with an "epoch" save strategy.
        control.should_evaluate = False
        if self._session.saved_step == state.global_step:
            control.should_save = False

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        values = _metrics(logs)
        if _SUMMARY_KEY in (logs or {}):
            self._final.update(values)
        elif values and not any(name.startswith("eval_") for name in values):
            loss = values.pop("loss", None)
            self._session.progress(int(state.global_step), _total(state), loss, values, force=True)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        values = _metrics(metrics)
        self._final.update(values)
        self._session.validation(values, int(state.global_step))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(path):
            self._session.saved(path, int(state.global_step))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._session.end_if_stopped()
        self._session.finish(self._final)


def _trainer_logs_to_stderr() -> None:
    """The Trainer prints its logs on stdout as Python dicts (`{'loss': '0.41', ...}`); stdout is
    backprop's event channel, where a line starting with `{` that is not JSON counts as a bad event
    line. Under backprop they go to stderr instead, still in the run's log; the values themselves
    arrive as events from this callback."""
    for cls in (PrinterCallback, ProgressCallback):
        method = cls.on_log
        if not getattr(method, "_backprop_to_stderr", False):
            cls.on_log = _to_stderr(method)


def _to_stderr(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def on_log(*args: Any, **kwargs: Any) -> Any:
        with contextlib.redirect_stdout(sys.stderr):
            return method(*args, **kwargs)

    on_log._backprop_to_stderr = True  # type: ignore[attr-defined]  # marks the wrapper: wrap once
    return on_log


def _total(state: Any) -> int | None:
    return int(state.max_steps) if state.max_steps and state.max_steps > 0 else None


def _metrics(logs: Any) -> dict[str, float]:
    values = scalars(logs, skip=_NOT_METRICS)
    return {name: value for name, value in values.items() if not name.endswith(_SPEED_SUFFIXES)}


def _any_process(args: Any, flag: bool) -> bool:
    """The same decision in every process of a distributed training (one that stops alone would
    hang the others in their next collective): true if it is true in any."""
    if int(getattr(args, "world_size", 1) or 1) <= 1:
        return flag
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    decision = torch.tensor([1 if flag else 0], device=args.device)
    dist.all_reduce(decision, op=dist.ReduceOp.MAX)
    return bool(decision.item())


__all__ = ["BackpropCallback", "resume_path"]
