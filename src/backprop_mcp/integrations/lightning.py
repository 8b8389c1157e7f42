"""The PyTorch Lightning callback (`lightning` package): events, checkpoints on the run's interval
and at a stop or the deadline, a truthful end, resume.

    from backprop_mcp.integrations.lightning import BackpropCallback, resume_path

    trainer = lightning.Trainer(max_epochs=10, callbacks=[BackpropCallback()])
    trainer.fit(model, datamodule=data, ckpt_path=resume_path())

Importing this module imports Lightning (the callback subclasses its `Callback`); for the older
`pytorch_lightning` package use `integrations.pytorch_lightning`.
"""

from __future__ import annotations

from lightning.pytorch import Callback

from backprop_mcp.integrations.common import resume_path
from backprop_mcp.integrations.lightning_hooks import LightningHooks


class BackpropCallback(LightningHooks, Callback):  # type: ignore[misc]  # Lightning is untyped here
    """Keeps the script contract for a `lightning.Trainer` (see `LightningHooks`)."""


__all__ = ["BackpropCallback", "resume_path"]
