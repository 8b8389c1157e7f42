"""`-f auto`: the framework is read from the script's imports (with `ast`; by a regex when the
script does not parse), Keras by the backend it will run on; checked on real scripts of each
framework, which are only parsed here, and on the record of a real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backprop_mcp.runs.detect import detect_framework
from tests.helpers import FIXTURES, cli_json, isolated_env

ROOT = Path(__file__).resolve().parent.parent


def detect(tmp_path: Path, source: str, **env: str) -> str:
    script = tmp_path / "train.py"
    script.write_text(source, encoding="utf-8")
    return detect_framework(script, "auto", {"HOME": str(tmp_path), **env})


@pytest.mark.parametrize(
    ("source", "framework"),
    [
        ("import os, torch\n", "pytorch"),
        ("from torch import nn\n", "pytorch"),
        ("def main():\n    import torch\n", "pytorch"),
        ("if __name__ == '__main__':\n    from torch.utils import data\n", "pytorch"),
        ("import torchvision.transforms as T\n", "pytorch"),
        ("import pytorch_lightning as pl\n", "pytorch"),
        ("from lightning.pytorch import Trainer\n", "pytorch"),
        ("from transformers import Trainer, TrainingArguments\n", "pytorch"),
        ("import numpy as np\nimport tensorflow as tf\n", "tensorflow"),
        ("from tensorflow import keras\n", "tensorflow"),
        ("import flax.linen as nn\n", "jax"),
        ("import optax\n", "jax"),
        ("from jax import numpy as jnp\n", "jax"),
        ("import importlib\ntf = importlib.import_module('tensorflow')\n", "tensorflow"),
        # The first framework imported decides, and the words in a docstring are not imports.
        ('"""Unlike the PyTorch version, which does\nimport torch\n"""\nimport jax\nimport torch\n', "jax"),
        # backprop's callback modules import their framework.
        ("from backprop_mcp.integrations.huggingface import BackpropCallback\n", "pytorch"),
        ("from backprop_mcp.integrations import lightning\n", "pytorch"),
        # Imports for type checkers only never run.
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import tensorflow\nimport jax\n", "jax"),
        ("import typing\nif typing.TYPE_CHECKING:\n    import torch\nelse:\n    import optax\n", "jax"),
        ("import numpy, sklearn\n", "none"),
        ("", "none"),
    ],
)
def test_the_framework_is_read_from_the_imports_wherever_they_are(
    tmp_path: Path, source: str, framework: str
) -> None:
    assert detect(tmp_path, source) == framework


@pytest.mark.parametrize(
    ("source", "env", "framework"),
    [
        ("import os\nos.environ['KERAS_BACKEND'] = 'jax'\nimport keras\n", {}, "jax"),
        ("import os\nos.environ['KERAS_BACKEND'] = 'jax'\nimport keras\n", {"KERAS_BACKEND": "torch"}, "jax"),
        ("from os import environ\nenviron['KERAS_BACKEND'] = 'torch'\nimport keras\n", {}, "pytorch"),
        ("import os\nos.environ.update(KERAS_BACKEND='jax')\nfrom keras import layers\n", {}, "jax"),
        ("import os\nos.environ.update({'KERAS_BACKEND': 'torch'})\nimport keras\n", {}, "pytorch"),
        ("import os\nos.environ.setdefault('KERAS_BACKEND', 'torch')\nimport keras\n", {}, "pytorch"),
        # setdefault gives way to the run's environment, as it does when the script runs.
        (
            "import os\nos.environ.setdefault('KERAS_BACKEND', 'torch')\nimport keras\n",
            {"KERAS_BACKEND": "jax"},
            "jax",
        ),
        # Set after the import: too late for Keras, so it does not count.
        ("import os, keras\nos.environ['KERAS_BACKEND'] = 'jax'\n", {}, "tensorflow"),
        ("import keras\n", {"KERAS_BACKEND": "torch"}, "pytorch"),
        ("import keras\n", {"KERAS_BACKEND": "numpy"}, "none"),
        ("import keras\n", {}, "tensorflow"),
        # The callback module imports Keras, on the backend set by then.
        (
            "import os\nos.environ['KERAS_BACKEND'] = 'torch'\n"
            "from backprop_mcp.integrations.keras import BackpropCallback\n",
            {},
            "pytorch",
        ),
        ("from backprop_mcp.integrations import keras\n", {"KERAS_BACKEND": "jax"}, "jax"),
    ],
)
def test_keras_counts_as_the_backend_it_will_run_on(
    tmp_path: Path, source: str, env: dict[str, str], framework: str
) -> None:
    assert detect(tmp_path, source, **env) == framework


def test_keras_without_a_backend_in_the_script_or_the_environment_reads_keras_json(tmp_path: Path) -> None:
    (tmp_path / ".keras").mkdir()
    (tmp_path / ".keras" / "keras.json").write_text(json.dumps({"backend": "jax"}), encoding="utf-8")
    assert detect(tmp_path, "import keras\n") == "jax"
    assert detect(tmp_path, "import keras\n", KERAS_BACKEND="torch") == "pytorch"
    keras_home = tmp_path / "elsewhere"
    keras_home.mkdir()
    (keras_home / "keras.json").write_text(json.dumps({"backend": "torch"}), encoding="utf-8")
    assert detect(tmp_path, "import keras\n", KERAS_HOME=str(keras_home)) == "pytorch"


def test_a_script_that_does_not_parse_is_read_by_its_import_lines(tmp_path: Path) -> None:
    python2 = "import sys\nimport torch\nprint 'training', torch.__version__\n"
    assert detect(tmp_path, python2) == "pytorch"
    assert detect(tmp_path, "import keras\nprint 'x'\n", KERAS_BACKEND="jax") == "jax"
    assert detect(tmp_path, "print 'no framework'\n") == "none"
    callback = "from backprop_mcp.integrations.keras import BackpropCallback\nprint 'x'\n"
    assert detect(tmp_path, callback, KERAS_BACKEND="torch") == "pytorch"


def test_a_framework_given_is_kept_and_an_unreadable_script_has_none(tmp_path: Path) -> None:
    assert detect_framework(tmp_path / "missing.py", "auto") == "none"
    assert detect_framework(tmp_path / "missing.py", "jax") == "jax"


# Real scripts of each framework: ours, and the callback fixtures of backprop_mcp.integrations.
REAL_SCRIPTS = [
    (ROOT / "examples" / "train_torch_digits.py", {}, "pytorch"),
    (ROOT / "examples" / "train_tiny.py", {}, "none"),
    (FIXTURES / "trains_with_lightning.py", {}, "pytorch"),
    (FIXTURES / "trains_with_hf_trainer.py", {}, "pytorch"),
    (FIXTURES / "trains_with_tensorflow.py", {}, "tensorflow"),
    (FIXTURES / "trains_with_flax_and_optax.py", {}, "jax"),
    (FIXTURES / "trains_keras_on_jax.py", {}, "jax"),
    (FIXTURES / "trains_keras_on_torch.py", {}, "pytorch"),
    (FIXTURES / "trains_keras_on_torch.py", {"KERAS_BACKEND": "jax"}, "jax"),
    (FIXTURES / "trains_keras_on_its_default_backend.py", {}, "tensorflow"),
    (FIXTURES / "trains_keras_on_its_default_backend.py", {"KERAS_BACKEND": "torch"}, "pytorch"),
    (FIXTURES / "train_lightning.py", {}, "pytorch"),
    (FIXTURES / "train_hf_trainer.py", {}, "pytorch"),
    (FIXTURES / "train_keras.py", {}, "pytorch"),  # it sets KERAS_BACKEND=torch by default
]


@pytest.mark.parametrize(
    ("script", "env", "framework"),
    REAL_SCRIPTS,
    ids=[f"{s.name}{'-' + '-'.join(e.values()) if e else ''}" for s, e, _ in REAL_SCRIPTS],
)
def test_real_training_scripts_are_detected(
    tmp_path: Path, script: Path, env: dict[str, str], framework: str
) -> None:
    if not script.exists():
        pytest.skip(f"{script.name} is written with backprop_mcp.integrations (h2-integrations)")
    assert detect_framework(script, "auto", {"HOME": str(tmp_path), **env}) == framework


def test_a_real_run_records_the_detected_framework_and_limits_jax_before_it_starts(tmp_path: Path) -> None:
    env = isolated_env(tmp_path / "home", HOME=str(tmp_path))
    env.pop("KERAS_BACKEND", None)
    dry = cli_json(env, "run", str(FIXTURES / "trains_keras_on_jax.py"), "-g", "50%", "--dry-run")
    assert dry["environment"]["BACKPROP_FRAMEWORK"] == "jax"
    assert dry["environment"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5000"
    assert dry["environment"]["XLA_CLIENT_MEM_FRACTION"] == "0.5000"
    assert dry["environment"]["BACKPROP_GPU_MEMORY_FRACTION"] == "0.5000"

    keras = str(FIXTURES / "trains_keras_on_its_default_backend.py")
    dry = cli_json({**env, "KERAS_BACKEND": "jax"}, "run", keras, "-g", "50%", "--dry-run")
    assert dry["environment"]["BACKPROP_FRAMEWORK"] == "jax"
    assert dry["environment"]["XLA_CLIENT_MEM_FRACTION"] == "0.5000"

    record = cli_json(env, "run", str(FIXTURES / "counts_and_exits.py"), "-f", "auto", cwd=tmp_path)
    assert record["framework"] == "none"
