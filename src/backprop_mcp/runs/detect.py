"""Which framework a training script uses, for `-f auto`: read from its imports with `ast` (by a
regex over its head when it does not parse), Keras by the backend it will run on."""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

# A script up to this size is parsed whole; a larger one (generated code) is searched in its head
# by the regex only, as imports sit at the top: parsing costs about 1 s per 10 MB.
_PARSE_BYTES = 4 * 1024 * 1024
_HEAD_BYTES = 256 * 1024

# The framework behind each package a training script may import (its top-level name).
FRAMEWORK_OF: dict[str, str] = {
    **dict.fromkeys(
        # Hugging Face's Trainer and accelerate train PyTorch models.
        (
            "torch", "torchvision", "torchaudio", "torchtext", "lightning", "pytorch_lightning",
            "lightning_fabric", "transformers", "accelerate", "timm", "peft", "trl", "deepspeed",
        ),
        "pytorch",
    ),
    **dict.fromkeys(("tensorflow", "tf_keras"), "tensorflow"),
    **dict.fromkeys(("jax", "jaxlib", "flax", "optax", "haiku", "equinox"), "jax"),
}  # fmt: skip
KERAS = "keras"
# backprop's own callback modules import their framework: a script may import only those.
_INTEGRATIONS = "backprop_mcp.integrations"
_PACKAGE_OF_INTEGRATION = {
    "lightning": "lightning",
    "pytorch_lightning": "pytorch_lightning",
    "huggingface": "transformers",
    "keras": KERAS,
}
# Keras 3 runs on the backend named by KERAS_BACKEND, else by ~/.keras/keras.json, else TensorFlow.
KERAS_BACKEND = "KERAS_BACKEND"
KERAS_DEFAULT_BACKEND = "tensorflow"
_FRAMEWORK_OF_KERAS_BACKEND = {"tensorflow": "tensorflow", "jax": "jax", "torch": "pytorch"}
_IMPORT_RE = re.compile(
    rb"^[ \t]*(?:import|from)[ \t]+("
    + "|".join([*FRAMEWORK_OF, KERAS, *(f"{_INTEGRATIONS}.{m}" for m in _PACKAGE_OF_INTEGRATION)])
    .replace(".", r"\.")
    .encode()
    + rb")\b",
    re.M,
)


def detect_framework(script: Path, requested: str, env: Mapping[str, str] | None = None) -> str:
    """The framework given, or for 'auto' that of the first framework package the script imports
    (anywhere: in functions, under `if __name__ == "__main__":`), 'none' if none. Keras counts
    as its backend: the one the script sets in `os.environ` before importing it, else the one
    `env` (the run's environment) or keras.json names, else TensorFlow."""
    if requested != "auto":
        return requested
    env = os.environ if env is None else env
    try:
        with script.open("rb") as handle:
            source = handle.read(_PARSE_BYTES + 1)
    except OSError:
        return "none"
    found: tuple[str, str | None, str | None] | None = None
    if len(source) <= _PARSE_BYTES:
        try:
            tree = ast.parse(source, str(script))
        except (SyntaxError, ValueError):  # ValueError: NUL bytes
            tree = None
        if tree is not None:
            reader = _ImportReader()
            reader.visit(tree)
            found = reader.found
            if found is None:
                return "none"
    if found is None:
        match = _IMPORT_RE.search(source[:_HEAD_BYTES])
        if match is None:
            return "none"
        found = (_package(match.group(1).decode()), None, None)
    package, assigned, default = found
    if package != KERAS:
        return FRAMEWORK_OF[package]
    # As Keras itself chooses: the variable (the script's assignment over the run's environment
    # over the script's setdefault), else keras.json.
    backend = (
        assigned or env.get(KERAS_BACKEND) or default or _keras_json_backend(env) or KERAS_DEFAULT_BACKEND
    )
    return _FRAMEWORK_OF_KERAS_BACKEND.get(backend.strip().lower(), "none")


def imported_modules(script: Path) -> set[str]:
    """The top-level names of every module the script imports, anywhere in it (a backprop callback
    module counts as its framework); empty when it cannot be read or parsed."""
    try:
        with script.open("rb") as handle:
            source = handle.read(_PARSE_BYTES + 1)
        tree = ast.parse(source, str(script)) if len(source) <= _PARSE_BYTES else None
    except (OSError, SyntaxError, ValueError):
        return set()
    names: set[str] = set()
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.Import):
            names.update(_package(alias.name).split(".", 1)[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(_package(node.module).split(".", 1)[0])
    return names


class _ImportReader(ast.NodeVisitor):
    """Walks a module in source order to the first framework import, noting the Keras backend
    the script has set by then."""

    def __init__(self) -> None:
        # (package, KERAS_BACKEND assigned by then, KERAS_BACKEND set by default by then)
        self.found: tuple[str, str | None, str | None] | None = None
        self.keras_backend: str | None = None  # set by the script so far
        self.keras_default: str | None = None  # os.environ.setdefault: the run's environment wins

    def visit(self, node: ast.AST) -> None:
        if self.found is None:
            super().visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._imported(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module == _INTEGRATIONS:
            for alias in node.names:  # from backprop_mcp.integrations import keras
                self._imported(f"{_INTEGRATIONS}.{alias.name}")
        elif node.level == 0 and node.module:
            self._imported(node.module)

    def visit_If(self, node: ast.If) -> None:
        # `if TYPE_CHECKING:` imports are for type checkers only; they never run.
        test = node.test
        name = test.attr if isinstance(test, ast.Attribute) else test.id if isinstance(test, ast.Name) else ""
        if name == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        value = _text(node.value)
        if value is not None and any(_is_environ_key(target) for target in node.targets):
            self.keras_backend = value

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        func = node.func
        args = [_text(arg) for arg in node.args]
        if isinstance(func, ast.Attribute) and _is_environ(func.value):
            if func.attr == "setdefault" and args[:1] == [KERAS_BACKEND] and len(args) == 2:
                self.keras_default = args[1]
            elif func.attr == "update":
                for keyword in node.keywords:
                    if keyword.arg == KERAS_BACKEND and _text(keyword.value) is not None:
                        self.keras_backend = _text(keyword.value)
                for arg in node.args:
                    if isinstance(arg, ast.Dict):
                        for key, value in zip(arg.keys, arg.values, strict=True):
                            if key is not None and _text(key) == KERAS_BACKEND and _text(value) is not None:
                                self.keras_backend = _text(value)
        # importlib.import_module("torch"), __import__("torch")
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in ("import_module", "__import__") and args and args[0] is not None:
            self._imported(args[0])

    def _imported(self, module: str) -> None:
        if self.found is not None:
            return
        top = _package(module).split(".", 1)[0]
        if top == KERAS:
            self.found = (KERAS, self.keras_backend, self.keras_default)
        elif top in FRAMEWORK_OF:
            self.found = (top, None, None)


def _package(module: str) -> str:
    """The framework package a module stands for: its own, or that of a backprop callback module."""
    if module.startswith(_INTEGRATIONS + "."):
        return _PACKAGE_OF_INTEGRATION.get(module.split(".")[2], module)
    return module


def _text(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _is_environ(node: ast.expr) -> bool:
    """`os.environ` or `environ` (from os import environ)."""
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ"
    )


def _is_environ_key(target: ast.expr) -> bool:
    """`os.environ["KERAS_BACKEND"]` as an assignment target."""
    return (
        isinstance(target, ast.Subscript)
        and _is_environ(target.value)
        and _text(target.slice) == KERAS_BACKEND
    )


def _keras_json_backend(env: Mapping[str, str]) -> str | None:
    """The backend in Keras's config file ($KERAS_HOME/keras.json, else ~/.keras/keras.json)."""
    home = env.get("KERAS_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return None
    backend = config.get("backend") if isinstance(config, dict) else None
    return backend if isinstance(backend, str) and backend else None
