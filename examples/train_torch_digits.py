"""A small PyTorch model on scikit-learn's digits, under backprop's script contract, resuming exactly.

An MLP (64 pixels -> hidden -> 10 classes, with dropout) learns the 8x8 digit images that ship
inside scikit-learn (`sklearn.datasets.load_digits`: package data, no download), on a train and
validation split fixed by a seed of its own. It reports progress (step, total, train loss and
accuracy, learning rate), validation loss and accuracy as metrics every --eval-every steps and at
the end, checkpoints with `torch.save` on the run's interval and when asked to stop (or near the
deadline), and resumes from BACKPROP_RESUME_FROM with everything a step changes: weights,
optimiser, cosine LR schedule, random states (torch, CUDA, Python), the epoch's data order and the
step. A run time-boxed and resumed any number of times on CPU ends with the same weights and
metrics as one uninterrupted run, given the same arguments (--threads included) and PyTorch.

    pip install torch==2.13.0 ".[examples]"   # in a checkout; CPU-only machine, else your torch first
    backprop run examples/train_torch_digits.py -n digits -- --epochs 30 --lr 0.003
    backprop resume RUN_ID                                  # continues from the newest checkpoint
    python examples/train_torch_digits.py --epochs 5       # outside backprop: ./checkpoints

Exit status: 0 when training finished; 128 + signal number after a stop signal, or 124 when it
stopped itself because the deadline was near (both after writing a checkpoint); 2 for bad
arguments, a missing package or a checkpoint it cannot resume from.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import pickle
import random
import sys
import time
from typing import Any

try:
    from backprop_mcp import script as bp
except ImportError:  # backprop-mcp is not installed in the interpreter that runs this script
    sys.stderr.write(
        "train_torch_digits: needs backprop_mcp.script: install backprop-mcp with its examples "
        "extra in this interpreter (pip install '.[examples]' in a checkout), or run the script "
        "with the interpreter backprop is installed in\n"
    )
    sys.exit(2)

NAME = "train_torch_digits"
# How to install what the example needs (backprop-mcp is installed from a checkout).
EXTRA = "pip install torch==2.13.0 '.[examples]' in a checkout; torch pinned on a CPU-only machine"
# Bumped whenever the checkpoint's layout changes, so an old file is refused with a clear message.
CHECKPOINT_FORMAT = f"{NAME}/1"
# The train/validation split has its own seed, so runs with different --seed values (a sweep over
# seeds) are scored on the same validation images.
SPLIT_SEED = 1797
VALIDATION_SHARE = 0.2
# Arguments that shape the training: a checkpoint resumes only under the same values, or the
# resumed run would silently be a different run.
SHAPING = ("epochs", "lr", "weight_decay", "batch_size", "hidden", "dropout", "seed", "threads")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=NAME, description="A small PyTorch MLP on scikit-learn's digits, under backprop."
    )
    parser.add_argument("--epochs", type=positive(int), default=30, help="passes over the data (30)")
    parser.add_argument("--lr", type=positive(float), default=3e-3, help="peak learning rate (3e-3)")
    parser.add_argument("--weight-decay", type=non_negative(float), default=1e-4, help="AdamW's (1e-4)")
    parser.add_argument("--batch-size", type=positive(int), default=64, help="images per step (64)")
    parser.add_argument("--hidden", type=positive(int), default=128, help="hidden units (128)")
    parser.add_argument("--dropout", type=fraction, default=0.2, help="dropout share in [0, 1) (0.2)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights, dropout, data order (0)")
    parser.add_argument("--eval-every", type=positive(int), default=100, help="validate every N steps")
    parser.add_argument("--log-every", type=positive(int), default=10, help="progress every N steps")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(auto)")
    parser.add_argument(
        "--threads",
        type=positive(int),
        default=1,
        help="CPU threads (1): sums are split across threads, so exact resume needs the same count",
    )
    parser.add_argument(
        "--step-delay",
        type=non_negative(float),
        default=0.0,
        help="seconds to wait after each step (0): slows a run down to watch a time box cut it and a "
        "resume continue it, with the same results as at full speed",
    )
    return parser.parse_args(argv)


def positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def non_negative(kind: type[float]) -> Any:
    def parse(text: str) -> float:
        value = kind(text)
        if not (value >= 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a number of at least 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text!r}")
    return value


def load_digits(torch: Any) -> tuple[Any, Any, Any, Any]:
    """(train images, train labels, validation images, validation labels) as CPU tensors."""
    from sklearn.datasets import load_digits as digits  # reads the CSV inside scikit-learn's package

    images, labels = digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16.0  # pixels are 0..16
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    cut = len(y) - round(len(y) * VALIDATION_SHARE)
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def choose_device(torch: Any, wanted: str) -> Any:
    """The device to train on, or None (said on stderr) when --device cuda finds no GPU."""
    if wanted == "cuda" and not torch.cuda.is_available():
        print(
            f"{NAME}: --device cuda, but PyTorch sees no CUDA GPU: use --device cpu or auto", file=sys.stderr
        )
        return None
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)


def weights_digest(model: Any) -> str:
    """A fingerprint of the weights, to compare two runs without loading their checkpoints."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode("utf-8"))
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    # First, before the slow imports below: a stop that arrives while torch loads is then kept as
    # a flag (answered with a checkpoint before the first step) instead of a KeyboardInterrupt.
    bp.install_stop_handler()
    args = parse_args(argv)
    # cuBLAS reads this when it starts; deterministic algorithms need it on CUDA.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        import torch
        from torch import nn
    except ImportError as exc:
        print(f"{NAME}: {exc}: install the examples extra ({EXTRA})", file=sys.stderr)
        return 2
    device = choose_device(torch, args.device)
    if device is None:
        return 2
    # After `import torch`, before the first allocation on the GPU, so the cap covers everything.
    bp.apply_gpu_memory_limit()
    torch.set_num_threads(args.threads)
    # warn_only: a CUDA kernel without a deterministic version warns on stderr instead of failing.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        x_train, y_train, x_val, y_val = load_digits(torch)
    except ImportError as exc:
        print(f"{NAME}: {exc}: install the examples extra ({EXTRA})", file=sys.stderr)
        return 2
    x_train, y_train, x_val, y_val = (t.to(device) for t in (x_train, y_train, x_val, y_val))

    per_epoch = math.ceil(len(y_train) / args.batch_size)
    total = args.epochs * per_epoch
    random.seed(args.seed)
    torch.manual_seed(args.seed)  # initial weights and dropout; a resume replaces both states
    model = nn.Sequential(
        nn.Linear(64, args.hidden), nn.ReLU(), nn.Dropout(args.dropout), nn.Linear(args.hidden, 10)
    ).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=total)
    loss_fn = nn.CrossEntropyLoss()
    # The data order: a CPU generator (its state is portable) that draws each epoch's permutation.
    order = torch.Generator().manual_seed(args.seed + 1)
    perm = torch.arange(len(y_train))
    config = {name: getattr(args, name) for name in SHAPING}
    step = 0
    # Train loss and correct answers summed since the last progress event (kept in checkpoints,
    # so a resumed run reports the same averages too).
    window = torch.zeros(3, dtype=torch.float64, device=device)

    def state() -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config,
            "step": step,
            "model": model.state_dict(),
            "optimiser": optimiser.state_dict(),
            "schedule": schedule.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                "python": random.getstate(),  # unused by this model; kept for edits that use it
            },
            "data": {"order": order.get_state(), "perm": perm},
            "window": window.cpu(),
        }

    def checkpoint(name: str) -> None:
        path = os.path.join(bp.checkpoint_dir(), name)
        tmp = f"{path}.tmp"
        torch.save(state(), tmp)
        os.replace(tmp, path)  # atomic: a reader never sees half a checkpoint
        bp.checkpoint_saved(path, step=step)

    resume = bp.resume_from()
    if resume:
        try:
            # weights_only: a checkpoint is data, never code to run; on the CPU first, because the
            # RNG states must stay CPU tensors (load_state_dict moves the rest to the device).
            saved = torch.load(resume, map_location="cpu", weights_only=True)
            problem = mismatch(saved, config)
            if problem is None:
                model.load_state_dict(saved["model"])
                optimiser.load_state_dict(saved["optimiser"])
                schedule.load_state_dict(saved["schedule"])
                torch.set_rng_state(saved["rng"]["torch"])
                if device.type == "cuda" and saved["rng"]["cuda"]:
                    torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
                random.setstate(saved["rng"]["python"])
                order.set_state(saved["data"]["order"])
                perm = saved["data"]["perm"]
                window = saved["window"].to(device)
                step = int(saved["step"])
        # What torch.load raises for a file that is not a checkpoint (RuntimeError for a bad zip,
        # UnpicklingError for one that holds code), and what a checkpoint of other shapes raises.
        except (
            OSError,
            EOFError,
            RuntimeError,
            pickle.UnpicklingError,
            LookupError,
            TypeError,
            ValueError,
        ) as exc:
            # torch's own words for a cut-short file ("Invalid argument") do not say what is wrong.
            problem = (
                f"{type(exc).__name__}: {exc}: the file is damaged (cut short?) or is not a checkpoint "
                f"of this script; resume from an earlier one (backprop run ... -r PATH) or from scratch"
            )
        if problem is not None:
            print(f"{NAME}: cannot resume from {resume}: {problem}", file=sys.stderr)
            return 2

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            logits = model(x_val)
            loss = loss_fn(logits, y_val).item()
            acc = (logits.argmax(1) == y_val).double().mean().item()
        model.train()
        return loss, acc

    print(
        f"{NAME}: {len(y_train)} training and {len(y_val)} validation images, {total} steps "
        f"({args.epochs} epochs of {per_epoch}) on {device}"
        + (f", resumed at step {step} from {resume}" if resume else ""),
        flush=True,
    )
    model.train()
    evaluated_at = -1
    while step < total:
        if bp.should_stop():
            checkpoint(f"step{step:07d}.pt")
            return bp.stop_exit_code()
        at = step % per_epoch
        if at == 0:
            perm = torch.randperm(len(y_train), generator=order)
        batch = perm[at * args.batch_size : (at + 1) * args.batch_size].to(device)
        optimiser.zero_grad()
        logits = model(x_train[batch])
        loss = loss_fn(logits, y_train[batch])
        loss.backward()
        optimiser.step()
        schedule.step()
        step += 1
        with torch.no_grad():
            window[0] += loss.detach() * len(batch)
            window[1] += (logits.argmax(1) == y_train[batch]).sum()
            window[2] += len(batch)
        if step % args.log_every == 0 or step == total:
            loss_sum, correct, seen = window.tolist()
            bp.progress(
                step, total=total, loss=loss_sum / seen, acc=correct / seen, lr=schedule.get_last_lr()[0]
            )
            window.zero_()
        if step % args.eval_every == 0 or step == total:
            val_loss, val_acc = evaluate()
            evaluated_at = step
            bp.metric("val_loss", val_loss, step=step)
            bp.metric("val_acc", val_acc, step=step)
        if bp.should_checkpoint():
            checkpoint(f"step{step:07d}.pt")
        if args.step_delay:
            time.sleep(args.step_delay)

    checkpoint("final.pt")
    val_loss, val_acc = evaluate()
    if evaluated_at != step:  # resumed from the final checkpoint: the metrics were not yet sent
        bp.metric("val_loss", val_loss, step=step)
        bp.metric("val_acc", val_acc, step=step)
    print(f"{NAME}: weights sha256 {weights_digest(model)}", flush=True)
    bp.done(val_loss=val_loss, val_acc=val_acc)
    return 0


def mismatch(saved: Any, config: dict[str, Any]) -> str | None:
    """Why the checkpoint cannot continue this run, or None when it can."""
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        return f"not a {CHECKPOINT_FORMAT} checkpoint (found {found!r})"
    differ = [
        f"--{name.replace('_', '-')} {saved['config'].get(name)!r} there, {value!r} here"
        for name, value in config.items()
        if saved["config"].get(name) != value
    ]
    if differ:
        return "made with other arguments (" + "; ".join(differ) + "): resume with the same ones"
    return None


if __name__ == "__main__":
    status = main()
    # Python's teardown of torch and scikit-learn takes seconds on a busy machine: long enough for
    # the deadline's stop signal to land in it after the script stopped for the deadline, and kill
    # it mid-exit with its status lost. Ignoring the stop signals from here keeps the status.
    bp.ignore_stop_signals()
    sys.exit(status)
