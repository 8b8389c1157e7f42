"""Callbacks that make a framework's trainer keep the script contract: PyTorch Lightning
(`integrations.lightning`), Hugging Face `transformers` (`integrations.huggingface`) and Keras 3
(`integrations.keras`).

They run inside training scripts, so, like `backprop_mcp.script`, they import nothing of the
package but `backprop_mcp.script`. Importing this package imports no framework; each submodule
imports its own framework (its callback subclasses the framework's base class), and
`integrations.common` holds what the three share, standard library only.
"""
