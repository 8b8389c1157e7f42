"""The training script's half of the script contract: read the run's environment, emit events, stop.

This module runs inside the user's training script, possibly under an interpreter where
backprop-mcp is not installed (copying this one file next to the script works), so it is
self-contained: standard library only, nothing imported from `backprop_mcp`, and every function
works outside backprop too (the environment variables are then absent and defaults apply).

    from backprop_mcp import script as bp

    bp.install_stop_handler()
    bp.apply_gpu_memory_limit()          # after `import torch`
    start = load(bp.resume_from()) if bp.resume_from() else 0
    for step in range(start, total):
        loss = train_step()
        bp.progress(step + 1, total=total, loss=loss)
        if bp.should_checkpoint() or bp.should_stop():
            path = save(os.path.join(bp.checkpoint_dir(), f"step{step + 1}.pt"))
            bp.checkpoint_saved(path, step=step + 1)
        if bp.should_stop():
            raise SystemExit(bp.stop_exit_code())
    bp.done(acc=evaluate())

Values that are not finite (NaN, inf) are dropped from events with one note on stderr per field,
because a diverged loss must not crash the training loop through its logging; values of the wrong
type (a string, a bool) raise `TypeError`, because that is a bug in the script.
"""

from __future__ import annotations

import json
import math
import operator
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

# The contract's names, repeated from `backprop_mcp.core.contract` because this file must not import
# the package; a test asserts they are equal.
ENV_RUN_ID = "BACKPROP_RUN_ID"
ENV_RUN_DIR = "BACKPROP_RUN_DIR"
ENV_CHECKPOINT_DIR = "BACKPROP_CHECKPOINT_DIR"
ENV_ATTEMPT = "BACKPROP_ATTEMPT"
ENV_RESUME_FROM = "BACKPROP_RESUME_FROM"
ENV_DEADLINE = "BACKPROP_DEADLINE"
ENV_CHECKPOINT_EVERY_SECONDS = "BACKPROP_CHECKPOINT_EVERY_SECONDS"
ENV_FRAMEWORK = "BACKPROP_FRAMEWORK"
ENV_GPU_MEMORY_LIMIT_MB = "BACKPROP_GPU_MEMORY_LIMIT_MB"
ENV_GPU_MEMORY_FRACTION = "BACKPROP_GPU_MEMORY_FRACTION"
ENV_STOP_SIGNAL = "BACKPROP_STOP_SIGNAL"
ENV_SWEEP_ID = "BACKPROP_SWEEP_ID"
ENV_PARAMS = "BACKPROP_PARAMS"

EVENT_PROGRESS = "progress"
EVENT_METRIC = "metric"
EVENT_CHECKPOINT = "checkpoint_saved"
EVENT_DONE = "done"

# should_stop() turns true this share of the time box before the deadline, but never more than
# STOP_MARGIN_SECONDS before it, so the script can write a checkpoint before the supervisor's stop
# signal arrives (the grace period after the signal, 30 s by default, is then spare time rather
# than a race). A share, so that a short box is not cut in half: an 18 s box stops 1.8 s early;
# ten seconds is ample to save a checkpoint, so a long box loses no more than that.
STOP_MARGIN_SHARE = 0.1
STOP_MARGIN_SECONDS = 10.0

# Outside backprop, checkpoints go here (relative to the working directory).
DEFAULT_CHECKPOINT_DIR = "checkpoints"

# Exit status for a script that stopped itself because the deadline was near: 124, as GNU
# `timeout` uses, so "ran out of time" reads the same everywhere; backprop records it as
# `timed_out` (reason `deadline`). A stop signal gives 128 + its number.
EXIT_DEADLINE = 124

# JAX's share of the GPU to preallocate: the old name, which every JAX reads, and the newer one.
_XLA_MEM_FRACTION = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION")
_XLA_PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"


class _State:
    """This process's contract state (module-level, as signal handlers need it)."""

    def __init__(self) -> None:
        self.stop_signum: int | None = None
        # The time box is measured from here (the deadline minus the helper's import), the
        # earliest moment a script can know about: it sets the default margin of should_stop().
        self.started = time.time()
        # The interval of should_checkpoint() counts from start-up and from each reported checkpoint.
        self.last_checkpoint = time.monotonic()
        self.warned: set[str] = set()


_state = _State()
_stop_lock = threading.Lock()
_write_lock = threading.Lock()


def run_id() -> str | None:
    """The run's id, or None outside backprop."""
    return os.environ.get(ENV_RUN_ID) or None


def run_dir() -> str:
    """The run's directory in the experiment store (record, logs); the working directory outside backprop."""
    return os.environ.get(ENV_RUN_DIR) or os.getcwd()


def checkpoint_dir() -> str:
    """The absolute directory to write checkpoints in, created if missing.

    Outside backprop: `./checkpoints`.
    """
    path = os.path.abspath(os.environ.get(ENV_CHECKPOINT_DIR) or DEFAULT_CHECKPOINT_DIR)
    os.makedirs(path, exist_ok=True)
    return path


def attempt() -> int:
    """The attempt number, from 1 (each resume of the run is a new attempt); 1 outside backprop."""
    value = _env_float(ENV_ATTEMPT)
    return int(value) if value is not None and value >= 1 and value.is_integer() else 1


def resume_from() -> str | None:
    """The checkpoint to resume from, or None when the script should start fresh."""
    return os.environ.get(ENV_RESUME_FROM) or None


def params() -> dict[str, Any]:
    """A sweep trial's parameters (also given as `--name value` arguments); {} outside a sweep."""
    try:
        value = json.loads(os.environ.get(ENV_PARAMS) or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def deadline() -> float | None:
    """When the time box ends (Unix time), or None when there is no deadline.

    Fixed when the attempt starts: if backprop pauses the run, the real deadline moves later, so
    this is the earliest the time box can end.
    """
    return _env_float(ENV_DEADLINE)


def time_left() -> float | None:
    """Seconds until the deadline (never negative), or None when there is no deadline."""
    end = deadline()
    return None if end is None else max(0.0, end - time.time())


def checkpoint_every_seconds() -> float | None:
    """How often the run asked for checkpoints, in seconds; None when it did not ask."""
    value = _env_float(ENV_CHECKPOINT_EVERY_SECONDS)
    return value if value is not None and value > 0 else None


def framework() -> str:
    """The framework the run declared: pytorch, tensorflow, jax or none."""
    return (os.environ.get(ENV_FRAMEWORK) or "none").strip().lower()


def gpu_memory_limit_mb() -> float | None:
    """The GPU memory this run may use, in MiB, or None when unlimited."""
    value = _env_float(ENV_GPU_MEMORY_LIMIT_MB)
    return value if value is not None and value > 0 else None


def gpu_memory_fraction() -> float | None:
    """The share of the GPU's memory this run may use (0 to 1], or None when not given as a share."""
    value = _env_float(ENV_GPU_MEMORY_FRACTION)
    return value if value is not None and 0 < value <= 1 else None


def progress(step: int, total: int | None = None, loss: float | None = None, **metrics: float) -> None:
    """Print a progress event; extra keyword arguments are metrics (other than step, total, loss).

    `{"event": "progress", "step": 120, "total": 1000, "loss": 0.41, "metrics": {"acc": 0.88}}`
    """
    event: dict[str, Any] = {"event": EVENT_PROGRESS, "step": _step("step", step)}
    if total is not None:
        event["total"] = _step("total", total)
        if event["total"] == 0:
            raise ValueError("total must be at least 1 (leave it out when unknown)")
    if loss is not None:
        value = _finite("loss", loss)
        if value is not None:
            event["loss"] = value
    if metrics:
        event["metrics"] = _finite_metrics(metrics)
    _emit(event)


def metric(name: str, value: float, step: int | None = None) -> None:
    """Print a metric event: `{"event": "metric", "name": "val_loss", "value": 0.52, "step": 120}`.

    Nothing is printed when the value is not finite.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"metric name must be a non-empty string, got {name!r}")
    number = _finite(name, value)
    if number is None:
        return
    event: dict[str, Any] = {"event": EVENT_METRIC, "name": name, "value": number}
    if step is not None:
        event["step"] = _step("step", step)
    _emit(event)


def checkpoint_saved(path: str | os.PathLike[str], step: int | None = None) -> None:
    """Print a checkpoint event: `{"event": "checkpoint_saved", "path": "...", "step": 120}`.

    Call it after the file is completely written (and renamed into place): backprop resumes from
    the newest reported checkpoint that exists. Relative paths are resolved against the working
    directory. It also restarts the interval of `should_checkpoint()`.
    """
    text = os.fspath(path)
    if not isinstance(text, str) or not text or "\0" in text:
        raise ValueError(f"checkpoint path must be a non-empty string without NUL, got {path!r}")
    event: dict[str, Any] = {"event": EVENT_CHECKPOINT, "path": text}
    if step is not None:
        event["step"] = _step("step", step)
    _emit(event)
    _state.last_checkpoint = time.monotonic()


def done(**metrics: float) -> None:
    """Print the final event with the run's final metrics: `{"event": "done", "metrics": {...}}`."""
    _emit({"event": EVENT_DONE, "metrics": _finite_metrics(metrics)})


def install_stop_handler() -> None:
    """Turn the stop signal into a flag that `should_stop()` reports, instead of KeyboardInterrupt.

    Handles SIGINT, SIGTERM and the run's configured stop signal, so the training loop can finish
    its step, checkpoint and exit. A second stop signal means "now": SIGINT then raises
    KeyboardInterrupt and other signals SystemExit(128 + signal), so `finally:` blocks still run.
    Call it from the main thread (Python only lets the main thread set signal handlers).
    """
    for signum in _stop_signals():
        signal.signal(signum, _on_stop_signal)


def ignore_stop_signals() -> None:
    """Ignore the stop signals from now on: for a script that is about to exit after a stop.

    As Python shuts down it puts the default handlers back, so a stop signal arriving then (the
    supervisor's own, at the deadline) would kill the script mid-exit and hide its exit status;
    an ignored signal stays ignored. A script that hangs is still ended: backprop sends SIGKILL
    after the grace period. Call it from the main thread.
    """
    for signum in _stop_signals():
        signal.signal(signum, signal.SIG_IGN)


def restore_default_sigint() -> None:
    """Re-arm Python's default SIGINT handler (KeyboardInterrupt), e.g. after a library replaced it."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def stop_margin() -> float | None:
    """How long before the deadline `should_stop()` turns true by default: `STOP_MARGIN_SHARE` of
    the time box (as seen from this module's import), at most `STOP_MARGIN_SECONDS`; None without
    a deadline."""
    end = deadline()
    if end is None:
        return None
    return min(STOP_MARGIN_SECONDS, max(end - _state.started, 0.0) * STOP_MARGIN_SHARE)


def should_stop(margin_seconds: float | None = None) -> bool:
    """True once a stop signal arrived (see `install_stop_handler`) or the deadline is within
    `margin_seconds` (default `stop_margin()`: 10% of the time box, at most 10 s)."""
    if _state.stop_signum is not None:
        return True
    left = time_left()
    if left is None:
        return False
    margin = stop_margin() if margin_seconds is None else margin_seconds
    return margin is not None and left < margin


def stop_exit_code() -> int:
    """The exit status for a script that stopped early: 128 + the stop signal, or 124 near the deadline."""
    signum = _state.stop_signum
    return EXIT_DEADLINE if signum is None else 128 + signum


def should_checkpoint() -> bool:
    """True when the run's checkpoint interval has passed since start-up or the last checkpoint.

    Always False when the run set no interval (`BACKPROP_CHECKPOINT_EVERY_SECONDS`). Returning
    True restarts the interval, as does `checkpoint_saved()`.
    """
    every = checkpoint_every_seconds()
    if every is None:
        return False
    now = time.monotonic()
    if now - _state.last_checkpoint < every:
        return False
    _state.last_checkpoint = now
    return True


def apply_gpu_memory_limit() -> bool:
    """Cap this process's GPU memory at the run's limit, in each framework the script uses.

    PyTorch: `torch.cuda.set_per_process_memory_fraction` on each visible GPU, from
    BACKPROP_GPU_MEMORY_FRACTION or from BACKPROP_GPU_MEMORY_LIMIT_MB over the GPU's total.
    TensorFlow: a logical device with `memory_limit` in MiB (a share is turned into MiB with the
    GPU's total memory from nvidia-smi; call it before TensorFlow touches the GPU).
    JAX: XLA_PYTHON_CLIENT_MEM_FRACTION (and its newer name), which JAX reads when its backend
    starts, so call it before `import jax`; backprop sets it itself for runs declared `jax`.
    Keras 3: its backend's (KERAS_BACKEND), so after `import keras` on TensorFlow or PyTorch, and
    before it on JAX.
    Never imports a framework; returns True when a limit was applied, False otherwise (no limit,
    no framework, no GPU), and says on stderr why when a limit could not be applied.
    """
    fraction = gpu_memory_fraction()
    limit_mb = gpu_memory_limit_mb()
    if fraction is None and limit_mb is None:
        return False
    total = _GpuTotal()
    applied = False
    torch = sys.modules.get("torch")
    if torch is not None:
        applied = _limit_torch(torch, fraction, limit_mb) or applied
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        applied = _limit_tensorflow(tf, fraction, limit_mb, total) or applied
    jax = _limit_jax(fraction, limit_mb, total)
    if torch is None and tf is None and jax is None:
        _note(
            "apply_gpu_memory_limit() found no framework to limit: call it after importing "
            "PyTorch, TensorFlow or Keras (on its TensorFlow or PyTorch backend), or before JAX"
        )
    return bool(jax) or applied


class _GpuTotal:
    """The total memory of the GPUs this process sees, in MiB (the smallest, when several), from
    nvidia-smi, asked at most once and only when a limit needs it; None when unknown."""

    def __init__(self) -> None:
        self._asked = False
        self._mb: float | None = None

    def __call__(self) -> float | None:
        if not self._asked:
            self._asked = True
            self._mb = _visible_gpu_total_mb()
        return self._mb


# nvidia-smi answers in well under a second; a hung driver must not hang the script's start.
NVIDIA_SMI_SECONDS = 10.0


def _visible_gpu_total_mb() -> float | None:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return None  # no GPU visible: nothing to size
    import shutil  # only here: most scripts never need them
    import subprocess

    program = shutil.which("nvidia-smi")
    if program is None:
        return None
    try:
        done = subprocess.run(
            [program, "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=NVIDIA_SMI_SECONDS,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    totals: list[tuple[str, str, float]] = []
    for line in done.stdout.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 3:
            try:
                totals.append((fields[0], fields[1], float(fields[2])))
            except ValueError:
                continue
    if visible is not None:
        # CUDA takes indices, UUIDs and unique UUID prefixes.
        wanted = [token.strip() for token in visible.split(",") if token.strip()]
        totals = [
            t
            for t in totals
            if any(w == t[0] or (w.startswith("GPU-") and t[1].startswith(w)) for w in wanted)
        ]
    finite = [mb for _, _, mb in totals if math.isfinite(mb) and mb > 0]
    return min(finite) if finite else None


def _limit_torch(torch: Any, fraction: float | None, limit_mb: float | None) -> bool:
    try:
        if not torch.cuda.is_available():
            return False
        for index in range(torch.cuda.device_count()):
            share = fraction
            if share is None:
                total_mb = torch.cuda.get_device_properties(index).total_memory / (1024 * 1024)
                share = min(1.0, float(limit_mb or 0) / total_mb)
            torch.cuda.set_per_process_memory_fraction(share, index)
    except (RuntimeError, ValueError, AttributeError) as exc:
        _note(f"could not apply the GPU memory limit in PyTorch: {exc}")
        return False
    return True


def _limit_tensorflow(tf: Any, fraction: float | None, limit_mb: float | None, total: _GpuTotal) -> bool:
    try:
        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            return False
        if limit_mb is None and fraction is not None:
            # TensorFlow caps only in MiB and cannot tell a GPU's size before it starts on it.
            total_mb = total()
            limit_mb = fraction * total_mb if total_mb else None
        for gpu in gpus:
            if limit_mb is None:
                # Growing on demand at least keeps it from taking the whole GPU up front.
                tf.config.experimental.set_memory_growth(gpu, True)
            else:
                config = tf.config.LogicalDeviceConfiguration(memory_limit=int(limit_mb))
                tf.config.set_logical_device_configuration(gpu, [config])
    except (RuntimeError, ValueError, AttributeError) as exc:
        # RuntimeError: TensorFlow had already initialised the GPU.
        _note(f"could not apply the GPU memory limit in TensorFlow: {exc}")
        return False
    if limit_mb is None:
        _note(
            f"TensorFlow cannot be held to {fraction:.0%} of the GPU without its total memory "
            "(nvidia-smi did not say): it grows on demand instead; give the limit in GB to cap it"
        )
        return False
    return True


def _limit_jax(fraction: float | None, limit_mb: float | None, total: _GpuTotal) -> bool | None:
    """True or False when JAX is the script's (imported, declared, or Keras's backend): whether
    its limit holds; None when JAX is not in use as far as can be told."""
    # An imported Keras on JAX has imported JAX; before it, KERAS_BACKEND says what it will use.
    uses_jax = "jax" in sys.modules or "jax" in (framework(), os.environ.get("KERAS_BACKEND"))
    if any(name in os.environ for name in _XLA_MEM_FRACTION):
        # Set before the start (by backprop for a run declared `jax`, or by the user): it holds.
        return True if uses_jax else None
    if "jax" in sys.modules:
        _note(
            "JAX was imported before apply_gpu_memory_limit(), too late to limit its GPU memory: "
            "call it before `import jax` (and before `import keras` on JAX), or run with -f jax"
        )
        return False
    if fraction is None and uses_jax:
        total_mb = total()
        if total_mb:
            fraction = min(1.0, float(limit_mb or 0) / total_mb)
        else:
            # JAX takes only shares; without the GPU's size, at least do not preallocate 75% of it.
            os.environ.setdefault(_XLA_PREALLOCATE, "false")
            _note(
                f"JAX cannot be held to {limit_mb:g} MiB without the GPU's total memory (nvidia-smi "
                f"did not say): it allocates on demand instead ({_XLA_PREALLOCATE}=false)"
            )
            return False
    if fraction is None:
        return None
    for name in _XLA_MEM_FRACTION:
        os.environ[name] = f"{fraction:.4f}"
    return True if uses_jax else None


def _stop_signals() -> list[int]:
    signums: list[int] = [signal.SIGINT, signal.SIGTERM]
    configured = (os.environ.get(ENV_STOP_SIGNAL) or "").strip().upper()
    if configured:
        name = configured if configured.startswith("SIG") else "SIG" + configured
        extra = getattr(signal, name, None)
        if isinstance(extra, signal.Signals) and extra not in signums:
            signums.append(extra)
    return signums


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    with _stop_lock:
        first = _state.stop_signum is None
        if first:
            _state.stop_signum = signum
    if first:
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _emit(event: Mapping[str, Any]) -> None:
    line = json.dumps(event, allow_nan=False, separators=(",", ":")) + "\n"
    # One write per line under a lock: print() writes the text and the newline separately, and
    # two threads would interleave them into lines that are not JSON.
    with _write_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def _step(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        # operator.index accepts NumPy and PyTorch integers but not floats.
        number = operator.index(value)  # type: ignore[arg-type]  # checked at run time
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if number < 0:
        raise ValueError(f"{name} must not be negative, got {number}")
    return number


def _finite(name: str, value: object) -> float | None:
    if isinstance(value, bool | str | bytes):
        raise TypeError(f"{name} must be a number, got {value!r}")
    as_float: Callable[[], float] | None = getattr(value, "__float__", None)
    if as_float is None:
        raise TypeError(f"{name} must be a number, got {value!r}")
    number = float(as_float())
    if not math.isfinite(number):
        if name not in _state.warned:
            _state.warned.add(name)
            _note(f"{name}={number} is not finite; it is left out of events")
        return None
    return number


def _finite_metrics(metrics: Mapping[str, object]) -> dict[str, float]:
    kept: dict[str, float] = {}
    for name, value in metrics.items():
        number = _finite(name, value)
        if number is not None:
            kept[name] = number
    return kept


def _env_float(name: str) -> float | None:
    text = os.environ.get(name)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        _note(f"ignoring {name}={text!r}: not a number")
        return None
    return value if math.isfinite(value) else None


def _note(message: str) -> None:
    print(f"backprop: {message}", file=sys.stderr, flush=True)
