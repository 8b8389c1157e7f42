"""The PyTorch Lightning callback for the `pytorch_lightning` package (a Trainer accepts only
callbacks of its own package): the same hooks as `integrations.lightning`.

    from backprop_mcp.integrations.pytorch_lightning import BackpropCallback, resume_path

    trainer = pytorch_lightning.Trainer(max_epochs=10, callbacks=[BackpropCallback()])
    trainer.fit(model, datamodule=data, ckpt_path=resume_path())
"""

from __future__ import annotations

from pytorch_lightning import Callback

from backprop_mcp.integrations.common import resume_path
from backprop_mcp.integrations.lightning_hooks import LightningHooks


class BackpropCallback(LightningHooks, Callback):  # type: ignore[misc]  # Lightning is untyped here
    """Keeps the script contract for a `pytorch_lightning.Trainer` (see `LightningHooks`)."""


__all__ = ["BackpropCallback", "resume_path"]
