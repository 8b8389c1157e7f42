"""The GPU memory limit in each framework: what `script.apply_gpu_memory_limit()` does for PyTorch,
TensorFlow, JAX and Keras 3 on each of its backends, and what the launcher gives the script.

The frameworks are fakes put in `sys.modules` (the helper finds them there and never imports one),
and the GPU's size comes from the fake `nvidia-smi` on PATH: this machine has no GPU. One child
runs the helper beside real PyTorch on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from backprop_mcp import script
from backprop_mcp.core import contract
from backprop_mcp.runs.launch import gpu_memory_fraction, gpu_memory_limit_mb
from tests.fake_gpu import FakeNvidiaSmi

XLA = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION")
PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"
FRAMEWORK_MODULES = ("torch", "tensorflow", "jax", "keras")
# Bounds the child that imports real PyTorch (a few seconds on a busy machine).
CHILD_SECONDS = 120.0


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No contract variables, no JAX or Keras variables, no framework imported, no GPU to ask."""
    for name in (*contract.CONTRACT_ENV, *XLA, PREALLOCATE, "KERAS_BACKEND", "CUDA_VISIBLE_DEVICES"):
        # setenv first so that monkeypatch restores the variable's absence afterwards.
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    for name in FRAMEWORK_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    empty = tmp_path / "no-nvidia-smi"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(script, "_state", script._State())


@pytest.fixture
def nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeNvidiaSmi:
    fake = FakeNvidiaSmi(tmp_path)
    fake.set_gpus([{"index": 0, "memory_total_mb": 16384}, {"index": 1, "memory_total_mb": 8192}])
    monkeypatch.setenv("PATH", str(fake.bin_dir))
    return fake


class FakeCuda:
    def __init__(self, total_bytes: int = 8 * 1024**3) -> None:
        self.total_bytes = total_bytes
        self.fractions: list[tuple[float, int]] = []

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def get_device_properties(self, index: int) -> SimpleNamespace:
        return SimpleNamespace(total_memory=self.total_bytes)

    def set_per_process_memory_fraction(self, fraction: float, device: int) -> None:
        self.fractions.append((fraction, device))


class FakeTensorFlow:
    def __init__(self) -> None:
        self.limits: list[tuple[str, int]] = []
        self.growing: list[str] = []
        self.config = SimpleNamespace(
            list_physical_devices=lambda kind: ["GPU:0"] if kind == "GPU" else [],
            LogicalDeviceConfiguration=lambda memory_limit: memory_limit,
            set_logical_device_configuration=lambda gpu, configs: self.limits.append((gpu, configs[0])),
            experimental=SimpleNamespace(set_memory_growth=lambda gpu, on: self.growing.append(gpu)),
        )


def fake_keras(backend: str) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(backend=lambda: backend))


def limit(monkeypatch: pytest.MonkeyPatch, *, mb: str | None = None, share: str | None = None) -> None:
    if mb is not None:
        monkeypatch.setenv(contract.ENV_GPU_MEMORY_LIMIT_MB, mb)
    if share is not None:
        monkeypatch.setenv(contract.ENV_GPU_MEMORY_FRACTION, share)


def test_jax_imported_before_the_call_cannot_be_limited_and_the_script_is_told_what_to_do(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    limit(monkeypatch, mb="4096", share="0.25")
    monkeypatch.setitem(sys.modules, "jax", SimpleNamespace())
    assert script.apply_gpu_memory_limit() is False
    err = capsys.readouterr().err
    assert "JAX was imported before apply_gpu_memory_limit()" in err
    assert "before `import jax`" in err
    assert not any(name in os.environ for name in XLA)


def test_jax_imported_under_backprops_own_setting_is_limited_without_a_word(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    limit(monkeypatch, mb="4096", share="0.25")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.2500")  # set by the launcher for -f jax
    monkeypatch.setitem(sys.modules, "jax", SimpleNamespace())
    assert script.apply_gpu_memory_limit() is True
    assert capsys.readouterr().err == ""


@pytest.mark.usefixtures("nvidia_smi")
def test_a_limit_in_mb_becomes_jaxs_share_of_the_gpu_it_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    limit(monkeypatch, mb="4096")
    monkeypatch.setenv(contract.ENV_FRAMEWORK, "jax")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-fake-0")  # the 16 GiB one, not the smaller
    assert script.apply_gpu_memory_limit() is True
    assert [os.environ[name] for name in XLA] == ["0.2500", "0.2500"]


def test_a_limit_in_mb_without_the_gpus_size_stops_jax_preallocating_and_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    limit(monkeypatch, mb="4096")
    monkeypatch.setenv(contract.ENV_FRAMEWORK, "jax")
    assert script.apply_gpu_memory_limit() is False
    assert os.environ[PREALLOCATE] == "false"
    assert "JAX cannot be held to 4096 MiB" in capsys.readouterr().err


def test_a_script_that_does_not_use_jax_is_not_told_about_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    limit(monkeypatch, mb="4096")
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=FakeCuda()))
    assert script.apply_gpu_memory_limit() is True
    assert capsys.readouterr().err == ""
    assert PREALLOCATE not in os.environ


def test_keras_on_jax_is_limited_when_the_call_comes_before_keras_is_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limit(monkeypatch, mb="2048", share="0.25")
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert script.apply_gpu_memory_limit() is True
    assert os.environ["XLA_CLIENT_MEM_FRACTION"] == "0.2500"


def test_keras_on_jax_imported_first_is_too_late_and_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    limit(monkeypatch, mb="2048", share="0.25")
    monkeypatch.setitem(sys.modules, "keras", fake_keras("jax"))
    monkeypatch.setitem(sys.modules, "jax", SimpleNamespace())
    assert script.apply_gpu_memory_limit() is False
    assert "before `import keras` on JAX" in capsys.readouterr().err


def test_keras_on_pytorch_limits_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    limit(monkeypatch, mb="2048")
    cuda = FakeCuda(total_bytes=8 * 1024**3)
    monkeypatch.setitem(sys.modules, "keras", fake_keras("torch"))
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    assert script.apply_gpu_memory_limit() is True
    assert cuda.fractions == [(0.25, 0)]


def test_keras_on_tensorflow_limits_tensorflow(monkeypatch: pytest.MonkeyPatch) -> None:
    limit(monkeypatch, mb="1500", share="0.1831")
    tf = FakeTensorFlow()
    monkeypatch.setitem(sys.modules, "keras", fake_keras("tensorflow"))
    monkeypatch.setitem(sys.modules, "tensorflow", tf)
    assert script.apply_gpu_memory_limit() is True
    assert tf.limits == [("GPU:0", 1500)]


@pytest.mark.usefixtures("nvidia_smi")
def test_tensorflow_given_only_a_share_is_capped_in_mib_of_the_gpu_it_sees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limit(monkeypatch, share="0.5")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # the 16 GiB one
    tf = FakeTensorFlow()
    monkeypatch.setitem(sys.modules, "tensorflow", tf)
    assert script.apply_gpu_memory_limit() is True
    assert tf.limits == [("GPU:0", 8192)]
    assert tf.growing == []


def test_tensorflow_given_only_a_share_of_a_gpu_of_unknown_size_grows_on_demand_and_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    limit(monkeypatch, share="0.5")
    tf = FakeTensorFlow()
    monkeypatch.setitem(sys.modules, "tensorflow", tf)
    assert script.apply_gpu_memory_limit() is False
    assert (tf.limits, tf.growing) == ([], ["GPU:0"])
    assert "TensorFlow cannot be held to 50% of the GPU" in capsys.readouterr().err


def test_a_call_before_any_framework_is_imported_says_when_to_call_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    limit(monkeypatch, mb="1024")
    assert script.apply_gpu_memory_limit() is False
    assert "call it after importing PyTorch, TensorFlow or Keras" in capsys.readouterr().err
    assert not set(FRAMEWORK_MODULES) & set(sys.modules)


@pytest.mark.parametrize(
    ("limit_text", "total", "mb", "share"),
    [
        ("80%", 10000, 8000.0, 0.8),
        ("80%", None, None, 0.8),  # a share needs no known GPU
        ("4", 16384, 4096.0, 0.25),
        ("4", None, 4096.0, None),
        ("40", 16384, 40960.0, 1.0),
        (None, 16384, None, None),
    ],
)
def test_the_launcher_gives_the_limit_in_mib_and_as_a_share_whenever_it_can(
    limit_text: str | None, total: int | None, mb: float | None, share: float | None
) -> None:
    gpu: Any = None if total is None else {"memory_total_mb": total}
    assert gpu_memory_limit_mb(limit_text, gpu) == mb
    assert gpu_memory_fraction(limit_text, gpu) == share


REAL_TORCH_CHILD = textwrap.dedent("""
    import torch
    from backprop_mcp import script
    print("applied", script.apply_gpu_memory_limit(), flush=True)
""")


@pytest.mark.skipif(find_spec("torch") is None, reason="PyTorch is not installed")
def test_with_real_pytorch_on_the_cpu_the_call_returns_false_and_says_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in contract.CONTRACT_ENV}
    env |= {
        "PYTHONPATH": str(Path(script.__file__).parent.parent),
        "CUDA_VISIBLE_DEVICES": "",
        contract.ENV_GPU_MEMORY_LIMIT_MB: "4096",
        contract.ENV_GPU_MEMORY_FRACTION: "0.25",
        contract.ENV_FRAMEWORK: "pytorch",
    }
    done = subprocess.run(
        [sys.executable, "-c", REAL_TORCH_CHILD],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=CHILD_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "applied False\n"
    assert done.stderr == ""
