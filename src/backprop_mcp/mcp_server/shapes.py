"""The texts of the MCP server that are not answers: its instructions, and errors rendered as text a
model can act on (a refusal with what to do; bad arguments one per line, each unknown one with the
nearest real name)."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from typing import Any

from backprop_mcp.core.errors import BackpropError, RunNotFound

# Pydantic errors listed in one reply; the rest are counted.
MAX_LISTED_ERRORS = 10

INSTRUCTIONS = """\
backprop runs Python training scripts on this machine: each run is admitted by a resource governor, \
time-boxed (10 minutes by default), stopped gracefully so it can checkpoint, and resumable.
1. run_training(script, args=[...hyperparameters], options={"note": "<your hypothesis>"}) returns a \
run summary at once; dry_run=true previews the command and the governor's verdict. annotate_run notes \
what a run showed: notes outlive this conversation.
2. wait_for_run(run_id) takes one id or a list (until="end", "any" or "change") and reports \
progress; get_status(run_id) shows one run (detail=true: its full record).
3. list_experiments(sort="loss") or compare_runs(run_ids, by="best") ranks runs; get_metrics \
gives their curves (plot_metrics: as an image); get_logs their output.
4. resume_run(run_id) continues a timed-out or stopped run from its checkpoint (max_run_minutes, \
new args allowed).
5. run_sweep(script, params={"lr": "loguniform(1e-4,1e-1)", "width": [32, 64]}, metric="val_loss") \
runs the trials for you; get_sweep(sweep_id, wait_seconds=300) gives the best; resume_run trains it longer.
Every answer has a next_step: follow it. Keep runs short and resume them: sweeps of many short \
runs are the intended use. Scripts print JSON lines such as {"step": 3, "total": 10, "loss": 0.5} \
and {"event": "checkpoint_saved", "path": "ck.pt", "step": 3}, and read BACKPROP_RESUME_FROM.
"""


def render_error(exc: BackpropError, hint: str | None = None) -> str:
    """An error as the model reads it: what was wrong, then what to do."""
    hint = hint or exc.hint
    if hint is None and isinstance(exc, RunNotFound):
        hint = "call list_experiments to see the run ids that exist (newest first)"
    kind = type(exc).__name__
    return f"{kind}: {exc.message}" + (f"\nWhat to do: {hint}" if hint else "")


def render_invalid_arguments(tool: str, errors: list[Any]) -> str:
    """Pydantic's validation errors of a tool's arguments, one line each."""
    lines = [f"Invalid arguments for {tool}:"]
    for error in errors[:MAX_LISTED_ERRORS]:
        # Names and list positions only: pydantic also names the branch of a union it tried
        # ("run_id.list[constrained-str].1"), which tells a model nothing.
        parts = [
            str(part) for part in error.get("loc", ()) if isinstance(part, int) or str(part).isidentifier()
        ]
        where = ".".join(parts) or "(arguments)"
        given = "" if error.get("type") == "missing" else f" (got {_short(error.get('input'))})"
        lines.append(f"- {where}: {error.get('msg', 'invalid')}{given}")
    if len(errors) > MAX_LISTED_ERRORS:
        lines.append(f"- ... and {len(errors) - MAX_LISTED_ERRORS} more")
    lines.append(
        f"What to do: fix these and call {tool} again; its input schema lists every argument with its type."
    )
    return "\n".join(lines)


def render_unknown(
    tool: str,
    unknown: Iterable[str],
    known: Iterable[str],
    given: dict[str, Any],
    options: Iterable[str] = (),
    what: str = "argument",
) -> str:
    """Arguments a tool does not take (or keys of its `options`, with what="option"): each with the
    nearest real name, or the place it moved to (a run option now lives in `options`), and where a
    script's own arguments go."""
    known, movable = sorted(known), set(options)
    lines = [f"{tool}: unknown {what}(s):"]
    for name in unknown:
        if name in movable:
            example = json.dumps({name: given.get(name)}, separators=(",", ":"), default=str)
            lines.append(f"- {name}: it is a run option now; put it in options, e.g. options={example}")
            continue
        near = difflib.get_close_matches(name, [*known, *movable], n=1, cutoff=0.6)
        lines.append(f"- {name}" + (f": did you mean {near[0]}?" if near else ""))
    lines.append(f"The {what}s it takes are: {', '.join(known)}.")
    if "args" in known:
        lines.append('Arguments for the script itself go in args, e.g. args=["--lr", "0.01"].')
    return "\n".join(lines)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
