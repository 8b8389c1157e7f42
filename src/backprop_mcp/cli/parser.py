"""The `backprop` argument parser: every command, its options (run options and governor limits
named, described and checked by the settings table) and the global `--config` and `--verbose`."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from backprop_mcp import __version__

# Run options shared by `run` and `resume`: (flags, config field, argparse kwargs).
_RUN_OPTIONS: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
    (("-m", "--max-run-minutes"), "max_run_minutes", {"metavar": "MIN"}),
    (("--max-wall-minutes",), "max_wall_minutes", {"metavar": "MIN"}),
    (("-f", "--framework"), "framework", {"metavar": "NAME"}),
    (("-c", "--checkpoint-every-minutes"), "checkpoint_every_minutes", {"metavar": "MIN"}),
    (("-g", "--gpu-memory-limit"), "gpu_memory_limit", {"metavar": "LIMIT"}),
    (("--grace-seconds",), "grace_seconds", {"metavar": "S"}),
    (("--stop-signal",), "stop_signal", {"metavar": "SIG"}),
    (("--snapshot",), "snapshot", {"metavar": "GLOB", "action": "append"}),
    (("--snapshot-max-mb",), "snapshot_max_mb", {"metavar": "MB"}),
    (("--queue-timeout",), "queue_timeout_minutes", {"metavar": "MIN"}),
    (("--gpus",), "gpus", {"metavar": "LIST"}),
    (("--no-gpu",), "use_gpu", {"action": "store_const", "const": False}),
    (("--no-queue",), "queue", {"action": "store_const", "const": False}),
    (("--argv-compat",), "argv_compat", {"action": "store_const", "const": True}),
    (("--ray-storage",), "ray_storage", {"metavar": "DIR"}),
]
# Where a new run goes, also taken by `status` so it can show that cluster (docs/cluster.md).
_BACKEND_OPTIONS: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
    (("--backend",), "backend", {"metavar": "NAME"}),
    (("--ray-address",), "ray_address", {"metavar": "URL"}),
]
# Governor limits, also taken by `status` so it can show the verdict under them.
_LIMIT_OPTIONS: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
    (("-p", "--max-parallel"), "max_parallel", {"metavar": "N"}),
    (("--min-free-ram",), "min_free_ram_gb", {"metavar": "GB"}),
    (("--max-cpu-percent",), "max_cpu_percent", {"metavar": "PCT"}),
    (("--gpu-probe",), "gpu_probe", {"metavar": "PROBE"}),
    (("--gpu-min-vram",), "gpu_min_free_vram_mb", {"metavar": "MB"}),
    (("--gpu-max-temp",), "gpu_max_temp_c", {"metavar": "C"}),
    (("--gpu-resume-below",), "gpu_resume_below_c", {"metavar": "C"}),
]


def _int(text: str) -> int:
    """argparse's int, but ASCII only: int() also reads other scripts' digits."""
    if not text.isascii():
        raise ValueError(text)
    return int(text)


_int.__name__ = "int"  # argparse names the type in its message: "invalid int value: '...'"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        from backprop_mcp.cli.render import clean

        if message.startswith("argument --sort: expected one argument"):
            # argparse takes "-val_acc" after a space for an option of its own.
            message += "; for a descending sort write it with '=': --sort=-val_acc"
        self.print_usage(sys.stderr)
        self.exit(2, f"backprop: error: {clean(message)}\n")  # it may quote what was typed


def _add_options(
    parser: argparse.ArgumentParser, specs: list[tuple[tuple[str, ...], str, dict[str, Any]]]
) -> None:
    from backprop_mcp.core.settings import FIELDS_BY_NAME

    for flags, name, extra in specs:
        # argparse formats help with %: a literal one ('"80%" of the GPU') must be doubled.
        text = FIELDS_BY_NAME[name].help.replace("%", "%%")
        parser.add_argument(*flags, dest=f"opt_{name}", default=None, help=text, **extra)


def _add_notebook_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--tag", dest="tags", action="append", default=[], metavar="TAG", help=f"tag {what} (repeat for more)"
    )
    parser.add_argument("--note", metavar="TEXT", help=f"a first note on {what}: why it is started")


def _add_global_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    # The same options on the main parser and on every command, so `backprop --config x run` and
    # `backprop run --config x` both work. On the commands their default is SUPPRESS: an option
    # not repeated after the command keeps the value given before it.
    parser.add_argument("-V", "--version", action="version", version=f"backprop {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=default,
        help="use this config file instead of the project's backprop.config.json",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=default,
        help="print the resolved configuration, and where each setting came from, to stderr",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="backprop", description="Safe, time-boxed, resumable ML training runs.")
    _add_global_options(parser, default=None)
    common = _Parser(add_help=False)
    _add_global_options(common, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add_command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, parents=[common])

    run = add_command("run", "start a training script (arguments for it go after --)")
    run.add_argument(
        "script", nargs="?", help='the training script (default: "trainingScriptPath" of the config file)'
    )
    run.add_argument("-n", "--name", help="a human-readable name")
    run.add_argument("--run-id", help="a unique id (letters, digits, -_.); generated if omitted")
    run.add_argument("-r", "--resume-from", metavar="PATH", help="start from this checkpoint")
    run.add_argument("--python", help="interpreter for the script")
    run.add_argument("--cwd", help="working directory of the script (default: here)")
    run.add_argument("--detach", action="store_true", help="print the run id and return at once")
    run.add_argument("--dry-run", action="store_true", help="show the decision, command and environment only")
    _add_notebook_options(run, "the run")
    _add_options(run, _RUN_OPTIONS + _BACKEND_OPTIONS + _LIMIT_OPTIONS)

    resume = add_command(
        "resume", "start the next attempt of a run from its latest checkpoint (new script arguments after --)"
    )
    resume.add_argument("run_id")
    resume.add_argument("--from-scratch", action="store_true", help="resume without a checkpoint")
    resume.add_argument("--python", help="interpreter for the script")
    resume.add_argument("--cwd", help="working directory of the script")
    resume.add_argument("--detach", action="store_true", help="print the run id and return at once")
    resume.add_argument(
        "--dry-run", action="store_true", help="show what the next attempt would do; change nothing"
    )
    _add_options(resume, _RUN_OPTIONS + _BACKEND_OPTIONS + _LIMIT_OPTIONS)

    status = add_command("status", "the machine and its runs, or one run")
    status.add_argument("run_id", nargs="?")
    _add_options(status, _BACKEND_OPTIONS + _LIMIT_OPTIONS)

    lst = add_command("list", "past and present runs, newest first or sorted")
    lst.add_argument(
        "--sort",
        metavar="KEY",
        help="order by a metric's last value (loss: lowest first; --sort=-val_acc: highest first), "
        "or by created, name or step; runs without it come last",
    )
    lst.add_argument("--status", help="only runs in this state")
    lst.add_argument("--name", help="only runs whose name matches this glob")
    lst.add_argument("--limit", type=_int, default=20, help="at most this many (default 20)")
    lst.add_argument("--cursor", help="continue after a previous page")
    lst.add_argument(
        "--tag",
        dest="tags",
        action="append",
        default=[],
        metavar="TAG",
        help="only runs with this tag (repeat: all of them)",
    )

    logs = add_command("logs", "a run's output")
    logs.add_argument("run_id")
    logs.add_argument("--tail", type=_int, default=50, help="last N lines (default 50)")
    logs.add_argument("--attempt", type=_int, help="which attempt (default the latest)")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new output until the run ends"
    )

    stop = add_command("stop", "stop runs gracefully (the script can checkpoint)")
    stop.add_argument("run_ids", nargs="+", metavar="run_id")
    stop.add_argument("--force", action="store_true", help="kill at once, without the grace period")

    compare = add_command("compare", "runs side by side on a metric")
    compare.add_argument("run_ids", nargs="+")
    compare.add_argument("--metric", default="loss")
    compare.add_argument(
        "--by", choices=("last", "best"), default="last", help="rank by the last value (default) or the best"
    )

    metrics = add_command("metrics", "runs' metric histories: last, best and a curve of each metric")
    metrics.add_argument("run_ids", nargs="+")
    metrics.add_argument(
        "--metric",
        dest="metrics",
        action="append",
        metavar="NAME",
        help="a metric to show (repeat for more; default: the loss and a few others)",
    )
    metrics.add_argument("--points", type=_int, default=50, help="points per curve, 1 to 1000 (default 50)")

    plot = add_command("plot", "draw runs' metric curves into a PNG (needs backprop-mcp[plot])")
    plot.add_argument("run_ids", nargs="*", metavar="run_id")
    plot.add_argument(
        "--metric",
        dest="metrics",
        action="append",
        metavar="NAME",
        help="a metric to draw, one panel each (repeat for more, 6 at most; default: loss, val_* metrics, 4)",
    )
    plot.add_argument("--sweep", metavar="SWEEP_ID", help="draw this sweep's trials (its best 20 when more)")
    plot.add_argument(
        "-o", "--output", metavar="PATH", default="curves.png", help="the PNG to write (default curves.png)"
    )

    note = add_command("note", "add a note (and tags) to a run's notebook, or show it")
    note.add_argument("run_id")
    note.add_argument("text", nargs="?", help="the note (quote it); without it and --tag: show the notebook")
    note.add_argument(
        "--tag", dest="tags", action="append", default=[], metavar="TAG", help="add a tag (repeat)"
    )

    tag = add_command("tag", "add tags to a run, or remove them")
    tag.add_argument("run_id")
    tag.add_argument("tags", nargs="+", metavar="tag")
    tag.add_argument("--remove", action="store_true", help="remove these tags instead")

    legacy = add_command("import-legacy", "import the seed's ~/.backprop/experiments.json")
    legacy.add_argument("path", nargs="?")
    lst.add_argument("--sweep", metavar="SWEEP_ID", help="only the trials of this sweep")

    sweeps = _add_sweep_commands(add_command)
    from backprop_mcp.cli.provenance import add_commands

    provenance = add_commands(add_command)
    for command in (
        run,
        resume,
        status,
        lst,
        logs,
        stop,
        compare,
        metrics,
        plot,
        note,
        tag,
        legacy,
        *sweeps,
        *provenance,
    ):
        command.add_argument("--json", action="store_true", help="print JSON (the MCP tools' shapes)")
    return parser


def _add_sweep_commands(add_command: Any) -> list[argparse.ArgumentParser]:
    sweep = add_command(
        "sweep", "search hyperparameters: many short runs of a script (script arguments after --)"
    )
    sweep.add_argument("script", help="the training script")
    sweep.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="a parameter: values (layers=1,2,3) or a distribution (lr=loguniform(1e-4,1e-1)); "
        "uniform, loguniform, int, intlog, choice",
    )
    sweep.add_argument("--metric", default="loss", help="the metric to optimise (default loss)")
    sweep.add_argument("--mode", default="min", help="min (lower is better, the default) or max")
    sweep.add_argument("--method", help="grid, random or tpe (default: grid for lists only, else random)")
    sweep.add_argument(
        "--trials", type=_int, help="at most this many trials (default: the whole grid, or 10)"
    )
    sweep.add_argument("--seed", type=_int, help="makes random and tpe sweeps reproducible")
    sweep.add_argument(
        "--parallel", type=_int, help="at most this many trials at once (default: max-parallel)"
    )
    sweep.add_argument("--budget-minutes", type=float, metavar="MIN", help="stop the sweep after this long")
    sweep.add_argument("--objective", default="final", help="score by the final (default) or best value")
    sweep.add_argument("--no-prune", action="store_true", help="never stop a trial early (median rule)")
    sweep.add_argument("-n", "--name", help="a human-readable name")
    sweep.add_argument("--sweep-id", help="a unique id (letters, digits, -_.); generated if omitted")
    sweep.add_argument("--python", help="interpreter for the script")
    sweep.add_argument("--cwd", help="working directory of the script (default: here)")
    sweep.add_argument("--detach", action="store_true", help="print the sweep id and return at once")
    _add_notebook_options(sweep, "each trial")
    _add_options(sweep, _RUN_OPTIONS + _BACKEND_OPTIONS + _LIMIT_OPTIONS)

    status = add_command("sweep-status", "a sweep's trials and best result, or the list of sweeps")
    status.add_argument("sweep_id", nargs="?")
    status.add_argument("--all", action="store_true", help="every trial, not only the best and active ones")

    stop = add_command("sweep-stop", "stop a sweep: no new trials; running ones stop gracefully")
    stop.add_argument("sweep_id")

    resume = add_command("sweep-resume", "continue an ended sweep: its unfinished trials, then new ones")
    resume.add_argument("sweep_id")
    resume.add_argument("--trials", type=_int, help="raise the sweep's number of trials to this")
    resume.add_argument("--budget-minutes", type=float, metavar="MIN", help="a new time budget")
    resume.add_argument("--detach", action="store_true", help="print the sweep id and return at once")
    _add_options(resume, _RUN_OPTIONS + _BACKEND_OPTIONS + _LIMIT_OPTIONS)
    return [sweep, status, stop, resume]


def options(ns: argparse.Namespace) -> dict[str, object]:
    return {k[4:]: v for k, v in vars(ns).items() if k.startswith("opt_") and v is not None}
