"""The `backprop` command line: parses arguments, calls the service, renders the result."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from backprop_mcp import __version__
from backprop_mcp.errors import BackpropError, UsageError

EXIT_CODES = {"completed": 0, "failed": 1, "lost": 1, "rejected": 3, "timed_out": 4, "stopped": 5}
# How often the foreground view re-reads the record and the log: fast enough to feel live.
FOLLOW_POLL_SECONDS = 0.25
# Without a terminal, a progress line is printed at most this often (logs stay readable).
PLAIN_PROGRESS_EVERY_SECONDS = 10.0

# Run options shared by `run` and `resume`: (flags, config field, argparse kwargs).
_RUN_OPTIONS: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
    (("-m", "--max-run-minutes"), "max_run_minutes", {"metavar": "MIN"}),
    (("--max-wall-minutes",), "max_wall_minutes", {"metavar": "MIN"}),
    (("-f", "--framework"), "framework", {"metavar": "NAME"}),
    (("-c", "--checkpoint-every-minutes"), "checkpoint_every_minutes", {"metavar": "MIN"}),
    (("-g", "--gpu-memory-limit"), "gpu_memory_limit", {"metavar": "LIMIT"}),
    (("--grace-seconds",), "grace_seconds", {"metavar": "S"}),
    (("--stop-signal",), "stop_signal", {"metavar": "SIG"}),
    (("--queue-timeout",), "queue_timeout_minutes", {"metavar": "MIN"}),
    (("--gpus",), "gpus", {"metavar": "LIST"}),
    (("--no-gpu",), "use_gpu", {"action": "store_const", "const": False}),
    (("--no-queue",), "queue", {"action": "store_const", "const": False}),
    (("--argv-compat",), "argv_compat", {"action": "store_const", "const": True}),
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"backprop: error: {message}\n")


def _add_options(
    parser: argparse.ArgumentParser, specs: list[tuple[tuple[str, ...], str, dict[str, Any]]]
) -> None:
    from backprop_mcp.config import FIELDS_BY_NAME

    for flags, name, extra in specs:
        parser.add_argument(*flags, dest=f"opt_{name}", default=None, help=FIELDS_BY_NAME[name].help, **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="backprop", description="Safe, time-boxed, resumable ML training runs.")
    parser.add_argument("--version", action="version", version=f"backprop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="start a training script (arguments for it go after --)")
    run.add_argument("script", help="the training script")
    run.add_argument("-n", "--name", help="a human-readable name")
    run.add_argument("--run-id", help="a unique id (letters, digits, -_.); generated if omitted")
    run.add_argument("-r", "--resume-from", metavar="PATH", help="start from this checkpoint")
    run.add_argument("--python", help="interpreter for the script")
    run.add_argument("--cwd", help="working directory of the script (default: here)")
    run.add_argument("--detach", action="store_true", help="print the run id and return at once")
    run.add_argument("--dry-run", action="store_true", help="show the decision, command and environment only")
    _add_options(run, _RUN_OPTIONS + _LIMIT_OPTIONS)

    resume = sub.add_parser("resume", help="start the next attempt of a run from its latest checkpoint")
    resume.add_argument("run_id")
    resume.add_argument("--from-scratch", action="store_true", help="resume without a checkpoint")
    resume.add_argument("--python", help="interpreter for the script")
    resume.add_argument("--cwd", help="working directory of the script")
    resume.add_argument("--detach", action="store_true", help="print the run id and return at once")
    _add_options(resume, _RUN_OPTIONS + _LIMIT_OPTIONS)

    status = sub.add_parser("status", help="the machine and its runs, or one run")
    status.add_argument("run_id", nargs="?")
    _add_options(status, _LIMIT_OPTIONS)

    lst = sub.add_parser("list", help="past and present runs, newest first")
    lst.add_argument("--status", help="only runs in this state")
    lst.add_argument("--name", help="only runs whose name matches this glob")
    lst.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    lst.add_argument("--cursor", help="continue after a previous page")

    logs = sub.add_parser("logs", help="a run's output")
    logs.add_argument("run_id")
    logs.add_argument("--tail", type=int, default=50, help="last N lines (default 50)")
    logs.add_argument("--attempt", type=int, help="which attempt (default the latest)")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new output until the run ends"
    )

    stop = sub.add_parser("stop", help="stop a run gracefully (the script can checkpoint)")
    stop.add_argument("run_id")
    stop.add_argument("--force", action="store_true", help="kill at once, without the grace period")

    compare = sub.add_parser("compare", help="runs side by side on a metric")
    compare.add_argument("run_ids", nargs="+")
    compare.add_argument("--metric", default="loss")

    legacy = sub.add_parser("import-legacy", help="import the seed's ~/.backprop/experiments.json")
    legacy.add_argument("path", nargs="?")

    for command in (run, resume, status, lst, logs, stop, compare, legacy):
        command.add_argument("--json", action="store_true", help="print JSON (the MCP tools' shapes)")
    return parser


def _options(ns: argparse.Namespace) -> dict[str, object]:
    return {k[4:]: v for k, v in vars(ns).items() if k.startswith("opt_") and v is not None}


def _print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    script_args: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, script_args = args[:cut], args[cut + 1 :]
    ns = build_parser().parse_args(args)
    if script_args and ns.command != "run":
        sys.stderr.write("backprop: error: arguments after -- are only for `backprop run`\n")
        return 2
    try:
        return _dispatch(ns, script_args)
    except BackpropError as exc:
        sys.stderr.write(f"backprop: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _dispatch(ns: argparse.Namespace, script_args: list[str]) -> int:
    from backprop_mcp.service import RunRequest, Service

    service = Service()
    out = ns.json
    if ns.command == "run":
        request = RunRequest(
            script=ns.script,
            args=script_args,
            name=ns.name,
            run_id=ns.run_id,
            cwd=ns.cwd,
            python=ns.python,
            resume_from=ns.resume_from,
            options=_options(ns),
        )
        if ns.dry_run:
            report = service.dry_run(request)
            if out:
                _print_json(report)
            else:
                from backprop_mcp.render import dry_run_text

                print(dry_run_text(dict(report)))
            return 0
        record = service.start(request)
        return _after_start(service, record, detach=ns.detach, out=out)
    if ns.command == "resume":
        record = service.resume(
            ns.run_id, options=_options(ns), from_scratch=ns.from_scratch, python=ns.python, cwd=ns.cwd
        )
        return _after_start(service, record, detach=ns.detach, out=out)
    if ns.command == "status":
        from backprop_mcp import render

        if ns.run_id:
            record = service.get(ns.run_id)
            _print_json(record) if out else print(render.record_text(record))
            return 0
        status = service.system_status(_options(ns))
        _print_json(status) if out else print(render.status_text(status))
        return 0
    if ns.command == "list":
        from backprop_mcp import render

        page = service.list_runs(status=ns.status, name=ns.name, limit=ns.limit, cursor=ns.cursor)
        if out:
            _print_json(page)
        else:
            print(render.table(page["runs"]))
            if page["next_cursor"]:
                print(f"more: backprop list --cursor {page['next_cursor']}")
        return 0
    if ns.command == "logs":
        if ns.follow:
            return _follow(service, ns.run_id, out=False, show_progress=False)
        tail = service.logs(ns.run_id, tail=ns.tail, attempt=ns.attempt)
        _print_json(tail) if out else sys.stdout.write("".join(line + "\n" for line in tail["lines"]))
        return 0
    if ns.command == "stop":
        record = service.stop(ns.run_id, force=ns.force)
        if out:
            _print_json(record)
        else:
            print(f"stop requested for {ns.run_id}; it is {record['status']}")
        return 0
    if ns.command == "compare":
        comparison = service.compare(ns.run_ids, metric=ns.metric)
        if out:
            _print_json(comparison)
        else:
            from backprop_mcp.render import number

            for row in comparison["runs"]:
                mark = "*" if row["run_id"] == comparison["best_run_id"] else " "
                print(
                    f"{mark} {row['run_id']:<40} {row['status']:<10} {comparison['metric']} "
                    f"{number(row['metric'])} (best {number(row['best_metric'])})"
                )
        return 0
    if ns.command == "import-legacy":
        imported = service.import_legacy(Path(ns.path) if ns.path else None)
        if out:
            _print_json(imported)
        else:
            print(f"imported {len(imported['imported'])} run(s) from {imported['source']}")
            for line in imported["skipped"]:
                print(f"  skipped {line}")
        return 0
    raise UsageError(f"unknown command {ns.command!r}")


def _after_start(service: Any, record: Any, *, detach: bool, out: bool) -> int:
    if not out:
        from backprop_mcp.render import config_files_text

        # Say which config files set this run's options (a folder's backprop.config.json can
        # change the time box); on stderr with --detach, whose stdout is the run id alone.
        stream = sys.stderr if detach else sys.stdout
        stream.write(f"config: {config_files_text(record.get('config_files') or [])}\n")
    if record["status"] == "rejected":
        if out:
            _print_json(record)
        sys.stderr.write(f"backprop: run {record['run_id']} rejected: {record['status_detail']}\n")
        return EXIT_CODES["rejected"]
    if detach:
        if out:
            _print_json(record)
        else:
            print(record["run_id"])
        return 0
    return _follow(service, record["run_id"], out=out, show_progress=True)


def _follow(service: Any, run_id: str, *, out: bool, show_progress: bool) -> int:
    """Show a run until it ends: its output, state changes and progress. Ctrl-C once asks for a
    graceful stop (the script can checkpoint); twice kills it."""
    from backprop_mcp import render
    from backprop_mcp.events import parse_line
    from backprop_mcp.models import TERMINAL_STATES

    tty = sys.stdout.isatty() and not out
    stream = sys.stderr if out else sys.stdout
    interrupts = 0

    def on_interrupt(signum: int, frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        try:
            service.stop(run_id, force=interrupts > 1)
        except BackpropError:
            return
        stream.write("\nstopping gracefully (Ctrl-C again to kill)\n" if interrupts == 1 else "\nkilling\n")

    previous = signal.signal(signal.SIGINT, on_interrupt)
    record = service.get(run_id)
    attempt, offset = record["attempt"], 0
    log_path = service.store.log_path(run_id, attempt)
    last_state: tuple[str, str | None] | None = None
    last_plain = 0.0
    try:
        while True:
            record = service.get(run_id)
            state = (record["status"], record["status_detail"])
            if state != last_state:
                last_state = state
                detail = f": {record['status_detail']}" if record["status_detail"] else ""
                stream.write(("\r\x1b[K" if tty else "") + f"[{run_id}] {record['status']}{detail}\n")
            if log_path.exists():
                with log_path.open("rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read(1 << 20)
                cut = chunk.rfind(b"\n") + 1
                offset += cut
                for line in chunk[:cut].splitlines():
                    if not show_progress or not parse_line(line).events:
                        stream.write(("\r\x1b[K" if tty else "") + line.decode("utf-8", "replace") + "\n")
            if record["status"] in TERMINAL_STATES:
                break
            if show_progress and record["status"] == "running" and record["step"] is not None:
                left = render.seconds_until(record["deadline"])
                line = render.progress_line(record, left, with_bar=tty)
                if tty:
                    stream.write("\r\x1b[K" + line)
                elif time.monotonic() - last_plain >= PLAIN_PROGRESS_EVERY_SECONDS:
                    last_plain = time.monotonic()
                    stream.write(line + "\n")
            stream.flush()
            time.sleep(FOLLOW_POLL_SECONDS)
    finally:
        signal.signal(signal.SIGINT, previous)
    if tty:
        stream.write("\r\x1b[K")
    if out:
        _print_json(record)
    else:
        stream.write(render.record_text(record) + "\n")
    return EXIT_CODES.get(record["status"], 1)


if __name__ == "__main__":
    raise SystemExit(main())
