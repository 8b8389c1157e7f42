"""The sweep commands of `backprop` (`sweep`, `sweep-status`, `sweep-stop`, `sweep-resume`): one
`Sweeps` call each, the sweep's table, and the live view that follows a sweep to its end (Ctrl-C
stops the sweep gracefully; its runner goes on without this view otherwise)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

from backprop_mcp.cli.parser import options
from backprop_mcp.cli.render import clean, number, print_json, step_text
from backprop_mcp.core.errors import BackpropError
from backprop_mcp.sweeps.shapes import SweepAnswer, SweepRow

# The live view re-reads the sweep this often: trials last seconds to minutes.
FOLLOW_POLL_SECONDS = 0.5
# How a followed sweep's end maps to the command's exit status (as `backprop run` does for runs).
SWEEP_EXIT_CODES = {"completed": 0, "failed": 1, "lost": 1, "stopped": 5}


def dispatch_sweep(service: Any, ns: argparse.Namespace, script_args: list[str]) -> int:
    from backprop_mcp.sweeps.service import SweepRequest, Sweeps
    from backprop_mcp.sweeps.space import parse_cli_param

    sweeps = Sweeps(service)
    out = ns.json
    if ns.command == "sweep":
        params: dict[str, object] = {}
        for text in ns.param:
            name, spec = parse_cli_param(text)
            if name in params:
                sys.stderr.write(
                    f"backprop: error: --param {name} is given twice; give each parameter once\n"
                )
                return 2
            params[name] = spec
        if not params:
            sys.stderr.write("backprop: error: give at least one --param NAME=VALUES or NAME=DISTRIBUTION\n")
            return 2
        answer = sweeps.start(
            SweepRequest(
                script=ns.script,
                params=params,
                metric=ns.metric,
                mode=ns.mode,
                method=ns.method,
                max_trials=ns.trials,
                args=script_args,
                name=ns.name,
                sweep_id=ns.sweep_id,
                cwd=ns.cwd,
                python=ns.python,
                options=options(ns),
                seed=ns.seed,
                parallel=ns.parallel,
                budget_minutes=ns.budget_minutes,
                objective=ns.objective,
                prune=not ns.no_prune,
                tags=ns.tags,
                note=ns.note,
            )
        )
        return _after_start(sweeps, answer, detach=ns.detach, out=out)
    if ns.command == "sweep-resume":
        answer = sweeps.resume(
            ns.sweep_id, max_trials=ns.trials, budget_minutes=ns.budget_minutes, options=options(ns)
        )
        return _after_start(sweeps, answer, detach=ns.detach, out=out)
    if ns.command == "sweep-stop":
        answer = sweeps.stop(ns.sweep_id)
        print_json(answer) if out else print(clean(f"stop requested for sweep {ns.sweep_id}"))
        return 0
    if ns.sweep_id is None:
        rows = sweeps.list()
        print_json(rows) if out else print(list_text(rows))
        return 0
    answer = sweeps.get(ns.sweep_id, all_trials=ns.all)
    print_json(answer) if out else print(sweep_text(answer))
    return 0


def _after_start(sweeps: Any, answer: SweepAnswer, *, detach: bool, out: bool) -> int:
    if detach:
        print_json(answer) if out else print(answer["sweep_id"])
        return 0
    # The id first, on stderr: whoever started the view can find the sweep if the view goes away.
    sys.stderr.write(
        clean(f"sweep {answer['sweep_id']}: {answer['status_detail'] or answer['status']}") + "\n"
    )
    return follow_sweep(sweeps, answer["sweep_id"], out=out)


def follow_sweep(sweeps: Any, sweep_id: str, *, out: bool) -> int:
    """Show the sweep's table until it ends (redrawn on a terminal, a line per change otherwise)."""
    tty = sys.stdout.isatty() and not out
    stream = sys.stderr if out else sys.stdout
    asked = False

    def on_interrupt(signum: int, frame: object) -> None:
        nonlocal asked
        if asked:
            return
        asked = True
        try:
            sweeps.stop(sweep_id)
        except BackpropError:
            return
        stream.write("\nstopping the sweep: running trials stop gracefully\n")

    previous = signal.signal(signal.SIGINT, on_interrupt)
    drawn = 0
    seen: dict[int, str] = {}
    try:
        while True:
            answer = sweeps.get(sweep_id)
            if tty:
                text = sweep_text(answer)
                stream.write(("\x1b[F\x1b[K" * drawn) + text + "\n")
                drawn = text.count("\n") + 1
            else:
                for trial in answer["trials"]:
                    state = f"{trial['status']} {trial.get('reason') or ''}".strip()
                    if seen.get(trial["number"]) != state:
                        seen[trial["number"]] = state
                        stream.write(clean(f"trial {trial['number']} {trial['run_id']}: {state}") + "\n")
            stream.flush()
            if answer["status"] != "running":
                break
            time.sleep(FOLLOW_POLL_SECONDS)
    finally:
        signal.signal(signal.SIGINT, previous)
    final = sweeps.get(sweep_id)
    if out:
        print_json(final)
    elif not tty:
        stream.write(sweep_text(final) + "\n")
    return SWEEP_EXIT_CODES.get(final["status"], 1)


def _params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def sweep_text(answer: SweepAnswer) -> str:
    """A sweep as people read it: its state, the trials table, the best and the parameters."""
    metric = answer["metric"]
    best = answer["best"]
    detail = f": {answer['status_detail']}" if answer["status_detail"] else ""
    lines = [f"sweep {answer['sweep_id']} {answer['status']}{detail}"]
    budget = answer["budget"]
    lines.append(
        f"{answer['method']}, {budget['started']} of {budget['max_trials']} trials started, "
        f"{budget['parallel']} at once, {metric} ({answer['mode']})"
    )
    head = ("", "#", "RUN ID", "STATUS", "STEP", metric.upper(), "PARAMS")
    body = [
        (
            "*" if best and t["number"] == best["number"] else "",
            str(t["number"]),
            t["run_id"],
            t["status"] + (f" ({t['reason']})" if t.get("reason") in ("pruned", "deadline") else ""),
            step_text(t.get("step"), None),
            number(t["objective"]),
            _params_text(t["params"]),
        )
        for t in answer["trials"]
    ]
    rows = [tuple(clean(c) for c in row) for row in (head, *body)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    if answer["trials_left_out"]:
        lines.append(f"({answer['trials_left_out']} more trials: sweep-status --all)")
    if answer["spread"]:
        s = answer["spread"]
        lines.append(
            f"{metric}: min {number(s['min'])}, median {number(s['median'])}, max {number(s['max'])} "
            f"over {s['scored']} scored trials"
        )
    for name, summary in answer["param_summary"].items():
        rho = f", rank correlation {summary['rho']:+.2f}" if "rho" in summary else ""
        lines.append(f"  {name}: best {summary['best']}{rho}")
    lines.append(f"next: {answer['next_step']}")
    return "\n".join(clean(line) for line in lines)


def list_text(rows: list[SweepRow]) -> str:
    if not rows:
        return "no sweeps"
    head = ("SWEEP ID", "NAME", "STATUS", "TRIALS", "METRIC", "BEST", "CREATED")
    body = [
        (
            r["sweep_id"],
            r["name"] or "",
            r["status"],
            str(r["trials"]),
            f"{r['metric']} ({r['mode']})",
            number(r["best_objective"]),
            r["created_at"][:19].replace("T", " "),
        )
        for r in rows
    ]
    cells = [tuple(clean(c) for c in row) for row in (head, *body)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )
