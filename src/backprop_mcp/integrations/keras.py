"""The Keras 3 callback: events, checkpoints on the run's interval and at a stop or the deadline,
a truthful end, and resume with no code of the script's own.

    from backprop_mcp.integrations.keras import BackpropCallback

    model.fit(x, y, epochs=10, validation_split=0.1, callbacks=[BackpropCallback()])

A checkpoint is a folder `stepN/` in the run's checkpoint folder: Keras's own weights file
(`model.weights.h5`, the model's and the optimizer's variables, as `model.save_weights` writes it)
and `state.json` (the epoch to resume at and the step count). Under `BACKPROP_RESUME_FROM` the
callback restores both when `fit()` begins, and `fit()` goes on from that epoch: a run stopped in
the middle of an epoch resumes at the start of that epoch with the weights it had (Keras cannot
start an epoch part-way), as Keras's own `BackupAndRestore` does.

Importing this module imports Keras; the GPU memory limit is applied around that import (before
it for JAX, which reads its share when its backend starts; after it for PyTorch and TensorFlow).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from backprop_mcp.integrations.common import KEEP_CHECKPOINTS, Session, limit_gpu_memory, resume_path, scalars

limit_gpu_memory()
import keras  # noqa: E402  # after the JAX limit, which must come first

limit_gpu_memory()

WEIGHTS_FILE = "model.weights.h5"
STATE_FILE = "state.json"
# What `state.json` says about its format, so that a folder of something else is refused clearly.
STATE_FORMAT = "backprop-keras-checkpoint"


class BackpropCallback(keras.callbacks.Callback):  # type: ignore[misc]  # keras is untyped here
    """Reports progress (loss and metrics per batch), validation metrics (`val_*`) as metric events
    and checkpoints; checkpoints on the run's interval and when the stop signal or the deadline
    comes, stops `fit()`, ends the script with the contract's status, and resumes from
    `BACKPROP_RESUME_FROM` by itself."""

    def __init__(
        self, *, keep_checkpoints: int | None = KEEP_CHECKPOINTS, margin_seconds: float | None = None
    ) -> None:
        """`keep_checkpoints`: how many of its own checkpoints to keep (None: all);
        `margin_seconds`: how long before the deadline to stop (default: the helper's margin)."""
        super().__init__()
        self._session = Session(keep_checkpoints=keep_checkpoints, margin_seconds=margin_seconds)
        self._session.start()
        self._step = 0
        self._epoch = 0
        self._epoch_start = 0
        self._steps_per_epoch: int | None = None
        self._total: int | None = None
        self._set_initial_epoch = False
        self._final: dict[str, float] = {}

    @property
    def last_checkpoint(self) -> str | None:
        """The newest checkpoint folder this callback saved, or None."""
        return self._session.last_checkpoint

    def on_train_begin(self, logs: Any = None) -> None:
        steps, epochs = self.params.get("steps"), self.params.get("epochs")
        self._steps_per_epoch = int(steps) if steps else None
        self._total = int(steps) * int(epochs) if steps and epochs else None
        path = resume_path()
        if path:
            self._restore(path)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch
        self._epoch_start = self._step

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        session = self._session
        self._step = self._epoch_start + int(batch) + 1
        values = scalars(logs)
        session.progress(self._step, self._total, values.pop("loss", None), values)
        last_of_epoch = self._steps_per_epoch is not None and int(batch) + 1 >= self._steps_per_epoch
        stop = session.should_stop()
        if session.should_checkpoint() or stop:
            self._save(resume_epoch=self._epoch + 1 if last_of_epoch else self._epoch)
        if stop:
            self.model.stop_training = True

    def on_test_begin(self, logs: Any = None) -> None:
        if self._session.stopping is not None and self._session.saved_step == self._step:
            # fit() validates the epoch it cut short: a whole pass over the validation data that
            # can outlast the margin before the deadline. The checkpoint is saved: end here.
            self._session.end_if_stopped()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        values = scalars(logs)
        self._final = values
        validation = {name: value for name, value in values.items() if name.startswith("val_")}
        self._session.validation(validation, self._step)
        if self._session.should_stop():
            # A stop that came during the validation: the epoch is whole, resume after it.
            self._save(resume_epoch=epoch + 1)
            self.model.stop_training = True

    def on_train_end(self, logs: Any = None) -> None:
        if self._set_initial_epoch:
            # Only this fit() resumes; a later fit() of the same model starts where it is asked to.
            self.model._initial_epoch = None
            self._set_initial_epoch = False
        self._session.end_if_stopped()
        self._session.finish(self._final)

    def _save(self, resume_epoch: int) -> None:
        session, step = self._session, self._step
        if session.saved_step == step:
            return
        final = session.checkpoint_path(f"step{step}")
        partial = final + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        self.model.save_weights(os.path.join(partial, WEIGHTS_FILE))
        # Resuming at `resume_epoch` starts that epoch over, so the steps count from its start.
        restart_step = step if resume_epoch > self._epoch else self._epoch_start
        state = {"format": STATE_FORMAT, "epoch": resume_epoch, "step": restart_step, "saved_at_step": step}
        with open(os.path.join(partial, STATE_FILE), "w", encoding="utf-8") as handle:
            json.dump(state, handle)
        session.publish(partial, final, step)

    def _restore(self, path: str) -> None:
        state = _read_state(path)
        model = self.model
        if model.optimizer is not None and not model.optimizer.built:
            # The optimizer's variables must exist for its saved state to load into them.
            model.optimizer.build(model.trainable_variables)
        model.load_weights(os.path.join(path, WEIGHTS_FILE))
        if not hasattr(model, "_initial_epoch"):
            raise SystemExit(
                f"backprop: this Keras ({keras.__version__}) cannot be told where fit() resumes; "
                "Keras 3 is required"
            )
        model._initial_epoch = int(state["epoch"])
        self._set_initial_epoch = True
        self._step = self._epoch_start = int(state["step"])


def _read_state(path: str) -> dict[str, Any]:
    """The checkpoint's `state.json`; a clear exit (no traceback) for a path that is not one."""
    where = os.path.join(path, STATE_FILE)
    try:
        with open(where, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError) as exc:
        raise SystemExit(
            f"backprop: cannot resume from {path}: it is not a checkpoint of the Keras callback "
            f"(a folder with {STATE_FILE} and {WEIGHTS_FILE}): {exc}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SystemExit(f"backprop: cannot resume from {path}: {where} is not the Keras callback's state")
    return state


__all__ = ["BackpropCallback", "resume_path"]
