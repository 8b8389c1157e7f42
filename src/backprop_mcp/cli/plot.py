"""`backprop plot`: the metric curves of runs, or of a sweep's trials, drawn into a PNG file
(`sweeps.curves.plot`, `runs.plots`), whose path it prints; what was left out goes to stderr."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from backprop_mcp.cli.render import clean, print_json
from backprop_mcp.core.errors import UsageError


def plot_command(service: Any, ns: argparse.Namespace) -> int:
    from backprop_mcp.sweeps.curves import plot

    if not ns.run_ids and ns.sweep is None:
        raise UsageError("give the run ids to plot, or --sweep SWEEP_ID (or both)")
    path = Path(ns.output).expanduser()
    if path.is_dir():
        raise UsageError(
            f"-o {ns.output!r} is a folder; give the PNG file's name, e.g. {path / 'curves.png'}"
        )
    if path.suffix.lower() != ".png":
        raise UsageError(f"-o names the PNG file to write: give a name ending in .png, got {ns.output!r}")
    drawn = plot(service, ns.run_ids, sweep_id=ns.sweep, metrics=ns.metrics)
    written = _write(path, drawn["png"])
    if ns.json:
        shown = {key: value for key, value in drawn.items() if key != "png"}
        print_json({"path": str(written), "bytes": len(drawn["png"]), **shown})
        return 0
    print(clean(written))
    for note in drawn["notes"]:
        sys.stderr.write(clean(f"backprop: note: {note}") + "\n")
    return 0


def _write(path: Path, png: bytes) -> Path:
    """`png` written to `path` whole (a temporary file beside it, then renamed), so a failure
    leaves an earlier picture of that name as it was; its absolute path. The temporary name is
    short: a file name that fits the system's limit must not fail for what is added to it."""
    absolute = path.absolute()
    temporary = absolute.with_name(f".plot-{os.getpid()}.tmp")
    try:
        temporary.write_bytes(png)
        os.replace(temporary, absolute)
    except OSError as exc:
        with contextlib.suppress(OSError):  # its own failure must not hide why the write failed
            temporary.unlink(missing_ok=True)
        raise UsageError(f"cannot write the plot to {absolute}: {exc.strerror or exc}") from None
    return absolute
