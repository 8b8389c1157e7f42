"""A tiny, exactly resumable training script following the script contract, standard library only.

It fits a logistic regression by mini-batch SGD on data generated from a seed, prints progress,
metric and checkpoint events on stdout, checkpoints every BACKPROP_CHECKPOINT_EVERY_SECONDS and
when stopped, and resumes from BACKPROP_RESUME_FROM with the same weights, step and random state,
so an interrupted-then-resumed run ends with exactly the weights of an uninterrupted one.
It imports nothing from backprop_mcp, so it runs under any Python 3.11+.

    backprop run examples/train_tiny.py -- --steps 5000 --lr 0.05
    python examples/train_tiny.py --steps 500          # outside backprop: ./checkpoints

Exit status: 0 when training finished; 128 + signal number (130 for SIGINT, 143 for SIGTERM)
when a stop signal ended it early after writing a checkpoint, as a shell reports a run killed by
that signal, so an interrupted run is never mistaken for a finished one; 2 for bad arguments or
an unusable checkpoint to resume from.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

CHECKPOINT_VERSION = 1
# Outside backprop (no BACKPROP_CHECKPOINT_EVERY_SECONDS), checkpoint this often.
DEFAULT_CHECKPOINT_EVERY_SECONDS = 2.0


@dataclass
class State:
    """Everything a step changes; a checkpoint holds exactly this."""

    step: int
    weights: list[float]
    bias: float
    rng: random.Random


class StopFlag:
    """Records the first stop signal so the loop can finish its step and checkpoint."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C means now
        self.signum = signum


def emit(event: dict[str, Any]) -> None:
    print(json.dumps(event, allow_nan=False), flush=True)


def make_data(seed: int, samples: int, features: int) -> list[tuple[list[float], int]]:
    """Linearly separable-ish points labelled by a hidden weight vector plus noise."""
    rng = random.Random(seed)
    hidden = [rng.gauss(0.0, 1.0) for _ in range(features)]
    data = []
    for _ in range(samples):
        x = [rng.gauss(0.0, 1.0) for _ in range(features)]
        score = sum(w * v for w, v in zip(hidden, x, strict=True)) + rng.gauss(0.0, 0.5)
        data.append((x, 1 if score > 0 else 0))
    return data


def predict(state: State, x: list[float]) -> float:
    z = sum(w * v for w, v in zip(state.weights, x, strict=True)) + state.bias
    # Split by sign so exp never overflows for large |z|.
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def evaluate(state: State, data: list[tuple[list[float], int]]) -> tuple[float, float]:
    """Mean log loss and accuracy."""
    eps = 1e-12
    loss = 0.0
    correct = 0
    for x, y in data:
        p = predict(state, x)
        loss -= math.log(p + eps) if y else math.log(1.0 - p + eps)
        correct += (p >= 0.5) == bool(y)
    return loss / len(data), correct / len(data)


def sgd_step(state: State, data: list[tuple[list[float], int]], batch_size: int, lr: float) -> None:
    grad_w = [0.0] * len(state.weights)
    grad_b = 0.0
    for _ in range(batch_size):
        x, y = data[state.rng.randrange(len(data))]
        err = predict(state, x) - y
        for i, v in enumerate(x):
            grad_w[i] += err * v
        grad_b += err
    scale = lr / batch_size
    state.weights = [w - scale * g for w, g in zip(state.weights, grad_w, strict=True)]
    state.bias -= scale * grad_b
    state.step += 1


def save_checkpoint(state: State, directory: str, config: dict[str, Any], name: str | None = None) -> str:
    """Write the state atomically (temp file in the same folder, then rename) and return its path."""
    version, internal, gauss_next = state.rng.getstate()
    payload = {
        "version": CHECKPOINT_VERSION,
        "step": state.step,
        "weights": state.weights,  # json writes floats with repr: they read back bit for bit
        "bias": state.bias,
        "rng_state": [version, list(internal), gauss_next],
        "config": config,
    }
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name or f"step{state.step:07d}.json")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str, config: dict[str, Any]) -> State:
    with open(path, encoding="utf-8") as f:
        payload = json.load(f)
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint version {payload.get('version')!r} is not {CHECKPOINT_VERSION}")
    if payload.get("config") != config:
        raise ValueError(f"checkpoint was made with {payload.get('config')}, this run uses {config}")
    version, internal, gauss_next = payload["rng_state"]
    rng = random.Random()
    rng.setstate((version, tuple(internal), gauss_next))
    return State(
        step=int(payload["step"]),
        weights=[float(w) for w in payload["weights"]],
        bias=float(payload["bias"]),
        rng=rng,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=3000, help="SGD steps in total (default 3000)")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate (default 0.1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50, help="steps between progress events")
    parser.add_argument(
        "--step-delay",
        type=float,
        default=0.001,
        help="seconds to sleep per step, so a short time box can interrupt it (default 0.001)",
    )
    # The seed's argv flags, passed only in backprop's --argv-compat mode; accepted so this script
    # works in both modes. The environment variables take precedence.
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    parser.add_argument("--max-minutes", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-every-seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--resume-from", help=argparse.SUPPRESS)
    parser.add_argument("--framework", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.features < 1 or args.samples < 2 or args.log_every < 1:
        parser.error(
            "--steps, --batch-size, --features and --log-every must be positive, --samples at least 2"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = StopFlag()
    stop.install()

    config = {
        "seed": args.seed,
        "samples": args.samples,
        "features": args.features,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "steps": args.steps,
    }
    data = make_data(args.seed, args.samples, args.features)
    split = max(1, len(data) * 4 // 5)
    train, val = data[:split], data[split:] or data[:1]

    checkpoint_dir = os.path.abspath(os.environ.get("BACKPROP_CHECKPOINT_DIR") or "checkpoints")
    every = float(
        os.environ.get("BACKPROP_CHECKPOINT_EVERY_SECONDS")
        or args.checkpoint_every_seconds
        or DEFAULT_CHECKPOINT_EVERY_SECONDS
    )
    resume = os.environ.get("BACKPROP_RESUME_FROM") or args.resume_from

    if resume:
        try:
            state = load_checkpoint(resume, config)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"train_tiny: cannot resume from {resume}: {exc}", file=sys.stderr)
            return 2
        print(f"train_tiny: resumed from {resume} at step {state.step}", file=sys.stderr)
    else:
        state = State(step=0, weights=[0.0] * args.features, bias=0.0, rng=random.Random(args.seed + 1))

    def checkpoint(name: str | None = None) -> None:
        path = save_checkpoint(state, checkpoint_dir, config, name)
        emit({"event": "checkpoint_saved", "path": path, "step": state.step})

    last_checkpoint = time.monotonic()
    while state.step < args.steps:
        sgd_step(state, train, args.batch_size, args.lr)
        if state.step % args.log_every == 0 or state.step == args.steps:
            loss, acc = evaluate(state, train)
            emit(
                {
                    "event": "progress",
                    "step": state.step,
                    "total": args.steps,
                    "loss": loss,
                    "metrics": {"acc": acc},
                }
            )
            if state.step % (args.log_every * 5) == 0:
                _, val_acc = evaluate(state, val)
                emit({"event": "metric", "name": "val_acc", "value": val_acc, "step": state.step})
        if stop.signum is not None:
            # Checked only between steps, so the checkpoint always holds a consistent state.
            checkpoint()
            return 128 + stop.signum
        if time.monotonic() - last_checkpoint >= every:
            checkpoint()
            last_checkpoint = time.monotonic()
        if args.step_delay > 0:
            time.sleep(args.step_delay)

    checkpoint("final.json")
    train_loss, train_acc = evaluate(state, train)
    val_loss, val_acc = evaluate(state, val)
    emit(
        {
            "event": "done",
            "metrics": {
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
            },
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
