"""The hooks of the PyTorch Lightning callback, without importing Lightning.

`integrations.lightning` mixes them into `lightning.pytorch.Callback` and
`integrations.pytorch_lightning` into `pytorch_lightning.Callback`: the two packages have distinct
base classes (a Trainer accepts only its own), with the same hooks.
"""

from __future__ import annotations

import math
import signal
from typing import Any

from backprop_mcp import script as bp
from backprop_mcp.integrations.common import KEEP_CHECKPOINTS, Session, note, resume_path, scalar, scalars


class LightningHooks:
    """Reports progress, validation metrics and checkpoints; checkpoints on the run's interval and
    when the stop signal or the deadline comes, stops the Trainer, and ends the script with the
    contract's status. Resume with `trainer.fit(model, ckpt_path=resume_path())`."""

    def __init__(
        self,
        *,
        keep_checkpoints: int | None = KEEP_CHECKPOINTS,
        margin_seconds: float | None = None,
    ) -> None:
        """`keep_checkpoints`: how many of its own checkpoints to keep (None: all);
        `margin_seconds`: how long before the deadline to stop (default: the helper's margin)."""
        super().__init__()
        self._session = Session(keep_checkpoints=keep_checkpoints, margin_seconds=margin_seconds)
        # Created in the script's main thread, before fit(): the stop signal becomes a flag here.
        self._session.start()
        self._total: int | None = None
        self._validation_names: set[str] = set()
        self._before_validation: dict[str, int] = {}
        self._stop_asked_at: int | None = None

    @property
    def last_checkpoint(self) -> str | None:
        """The newest checkpoint this callback saved, or None."""
        return self._session.last_checkpoint

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # In each training process, after Lightning launched it and before the model goes to the
        # GPU: the earliest point where the limit holds for every process.
        self._session.start()
        self._session.emit = bool(trainer.is_global_zero)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._total = _total(trainer)
        if resume_path() and not trainer.ckpt_path and self._session.emit:
            note(
                "BACKPROP_RESUME_FROM is set but fit() got no ckpt_path: training starts from scratch; "
                "pass ckpt_path=resume_path() to fit()"
            )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        session, step = self._session, int(trainer.global_step)
        metrics = scalars(trainer.callback_metrics, skip=self._validation_names)
        session.progress(step, self._total, _loss(outputs), metrics)
        if self._stop_asked_at is not None and step > self._stop_asked_at:
            # Lightning went on training (min_epochs or min_steps not reached): the checkpoint is
            # saved, so end here rather than past the deadline.
            session.end_if_stopped()
        stop = _any_process(trainer, session.should_stop())
        if _any_process(trainer, session.should_checkpoint()) or stop:
            self._save(trainer, step)
        if stop and self._stop_asked_at is None:
            session.mark_stopping()
            self._stop_asked_at = step
            trainer.should_stop = True

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self._stop_asked_at is not None:
            # Lightning validates once more when training is asked to stop: a whole pass over the
            # validation data that can outlast the margin before the deadline, of an epoch cut
            # short. The checkpoint is saved: end here.
            self._session.end_if_stopped()
        self._before_validation = {name: id(value) for name, value in trainer.callback_metrics.items()}

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        # What this validation logged: the values that are new objects since it began.
        changed = {
            name: value
            for name, value in trainer.callback_metrics.items()
            if self._before_validation.get(name) != id(value)
        }
        found = scalars(changed)
        self._validation_names |= set(found)
        self._session.validation(found, int(trainer.global_step))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        session = self._session
        session.flush()
        session.end_if_stopped()
        session.finish(scalars(trainer.callback_metrics))

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Lightning ends fit() with its own SIGTERMException (between two batches, so the state
        # is whole) when SIGTERM is the stop signal: save what was trained.
        if type(exception).__name__ != "SIGTERMException":
            return  # a real error: Lightning raises it again and the run fails
        session = self._session
        session.mark_stopping()
        if session.saved_step != trainer.global_step:
            self._save(trainer, int(trainer.global_step))
        # The exception is a SystemExit with no status, which would end the script with 0, as if
        # training had finished: it carries the contract's status instead (128 + SIGTERM, or of
        # the stop signal that came first).
        code = bp.stop_exit_code()
        exception.code = 128 + signal.SIGTERM if code == bp.EXIT_DEADLINE else code  # type: ignore[attr-defined]

    def _save(self, trainer: Any, step: int) -> None:
        session = self._session
        if session.saved_step == step:
            return
        final = session.checkpoint_path(f"step{step}.ckpt")
        partial = final + ".partial"
        # Every process calls it (a sharded model saves its shards); the first one writes.
        trainer.save_checkpoint(partial)
        if trainer.is_global_zero:
            session.publish(partial, final, step)
        else:
            session.saved_step = step


def _total(trainer: Any) -> int | None:
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        estimate = float(trainer.estimated_stepping_batches)
    except (TypeError, ValueError, RuntimeError):
        return None
    return int(estimate) if math.isfinite(estimate) and estimate >= 1 else None


def _loss(outputs: Any) -> float | None:
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    return scalar(outputs)


def _any_process(trainer: Any, flag: bool) -> bool:
    """The same decision in every process of the training (one that stops alone would hang the
    others in their next collective): true if it is true in any."""
    if int(getattr(trainer, "world_size", 1) or 1) > 1:
        return bool(trainer.strategy.reduce_boolean_decision(flag, all=False))
    return flag
