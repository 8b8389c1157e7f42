"""A tiny PyTorch training script that follows backprop's script contract and resumes exactly.

It trains a small MLP on data generated from a seed (on CUDA when available, else CPU), applies
the run's GPU memory limit, checkpoints with `torch.save` on the run's interval and when asked
to stop, and resumes from BACKPROP_RESUME_FROM with the same weights, optimiser, step and random
state. It uses `backprop_mcp.script` when that is importable and a few stand-ins otherwise.

    backprop run examples/train_torch.py -f pytorch -- --steps 2000

Exit status: 0 when finished; 128 + signal number after a stop signal, or 124 when it stopped
itself because the deadline was near (both after writing a checkpoint); 2 for a bad checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from types import FrameType
from typing import Any

import torch  # type: ignore[import-not-found,unused-ignore]  # optional: not a dependency of backprop-mcp
from torch import nn  # type: ignore[import-not-found,unused-ignore]


class _Fallback:
    """Stand-ins for the few `backprop_mcp.script` functions used here, for interpreters without it."""

    def __init__(self) -> None:
        self._stop: int | None = None
        self._last = time.monotonic()

    def checkpoint_dir(self) -> str:
        path = os.path.abspath(os.environ.get("BACKPROP_CHECKPOINT_DIR") or "checkpoints")
        os.makedirs(path, exist_ok=True)
        return path

    def resume_from(self) -> str | None:
        return os.environ.get("BACKPROP_RESUME_FROM") or None

    def install_stop_handler(self) -> None:
        def handle(signum: int, frame: FrameType | None) -> None:
            self._stop = signum

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, handle)

    def should_stop(self) -> bool:
        return self._stop is not None

    def stop_exit_code(self) -> int:
        return 128 + (self._stop or 0)

    def should_checkpoint(self) -> bool:
        every = float(os.environ.get("BACKPROP_CHECKPOINT_EVERY_SECONDS") or 0)
        if every <= 0 or time.monotonic() - self._last < every:
            return False
        self._last = time.monotonic()
        return True

    def apply_gpu_memory_limit(self) -> bool:
        return False

    def progress(
        self, step: int, total: int | None = None, loss: float | None = None, **metrics: float
    ) -> None:
        self._emit({"event": "progress", "step": step, "total": total, "loss": loss, "metrics": metrics})

    def checkpoint_saved(self, path: str, step: int | None = None) -> None:
        self._emit({"event": "checkpoint_saved", "path": path, "step": step})

    def done(self, **metrics: float) -> None:
        self._emit({"event": "done", "metrics": metrics})

    @staticmethod
    def _emit(event: dict[str, Any]) -> None:
        print(json.dumps(event), flush=True)


try:
    from backprop_mcp import script as bp
except ImportError:  # backprop-mcp is not installed in this interpreter
    bp = _Fallback()  # type: ignore[assignment]  # same functions as the module, duck-typed


def make_data(
    seed: int, samples: int, features: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=g)
    hidden = torch.randn(features, generator=g)
    y = ((x @ hidden + 0.5 * torch.randn(samples, generator=g)) > 0).float()
    return x.to(device), y.to(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tiny PyTorch MLP under backprop's script contract.")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds to sleep per step (default 0)")
    args = parser.parse_args(argv)

    bp.install_stop_handler()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # After `import torch`, before the first allocation, so the cap covers everything.
    bp.apply_gpu_memory_limit()

    x, y = make_data(args.seed, 4096, args.features, device)
    torch.manual_seed(args.seed)  # the initial weights; a resumed run replaces them from the checkpoint
    model = nn.Sequential(nn.Linear(args.features, 32), nn.ReLU(), nn.Linear(32, 1)).to(device)
    optimiser = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.BCEWithLogitsLoss()
    batches = torch.Generator().manual_seed(args.seed + 1)  # CPU generator: its state is portable
    step = 0

    resume = bp.resume_from()
    if resume:
        try:
            # weights_only: a checkpoint is data, never code to run.
            state = torch.load(resume, map_location=device, weights_only=True)
            model.load_state_dict(state["model"])
            optimiser.load_state_dict(state["optimiser"])
            batches.set_state(state["batches"])
            step = int(state["step"])
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            print(f"train_torch: cannot resume from {resume}: {exc}", file=sys.stderr)
            return 2

    def checkpoint(name: str) -> None:
        path = os.path.join(bp.checkpoint_dir(), name)
        tmp = path + ".tmp"
        state = {
            "model": model.state_dict(),
            "optimiser": optimiser.state_dict(),
            "batches": batches.get_state(),
            "step": step,
        }
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a reader never sees half a checkpoint
        bp.checkpoint_saved(path, step=step)

    while step < args.steps:
        idx = torch.randint(0, x.shape[0], (args.batch_size,), generator=batches).to(device)
        optimiser.zero_grad()
        loss = loss_fn(model(x[idx]).squeeze(1), y[idx])
        loss.backward()
        optimiser.step()
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            with torch.no_grad():
                acc = ((model(x).squeeze(1) > 0).float() == y).float().mean().item()
            bp.progress(step, total=args.steps, loss=loss.item(), acc=acc)
        if bp.should_stop():
            checkpoint(f"step{step:07d}.pt")
            return bp.stop_exit_code()
        if bp.should_checkpoint():
            checkpoint(f"step{step:07d}.pt")
        if args.step_delay > 0:
            time.sleep(args.step_delay)

    checkpoint("final.pt")
    with torch.no_grad():
        acc = ((model(x).squeeze(1) > 0).float() == y).float().mean().item()
    bp.done(acc=acc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
