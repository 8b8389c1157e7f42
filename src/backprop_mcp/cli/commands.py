"""The `backprop` command line: parses arguments, calls the service, renders the result."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from backprop_mcp import __version__
from backprop_mcp.core.errors import BackpropError, UsageError

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


def _int(text: str) -> int:
    """argparse's int, but ASCII only: int() also reads other scripts' digits."""
    if not text.isascii():
        raise ValueError(text)
    return int(text)


_int.__name__ = "int"  # argparse names the type in its message: "invalid int value: '...'"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        from backprop_mcp.cli.render import clean

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
    _add_options(run, _RUN_OPTIONS + _LIMIT_OPTIONS)

    resume = add_command("resume", "start the next attempt of a run from its latest checkpoint")
    resume.add_argument("run_id")
    resume.add_argument("--from-scratch", action="store_true", help="resume without a checkpoint")
    resume.add_argument("--python", help="interpreter for the script")
    resume.add_argument("--cwd", help="working directory of the script")
    resume.add_argument("--detach", action="store_true", help="print the run id and return at once")
    resume.add_argument(
        "--dry-run", action="store_true", help="show what the next attempt would do; change nothing"
    )
    _add_options(resume, _RUN_OPTIONS + _LIMIT_OPTIONS)

    status = add_command("status", "the machine and its runs, or one run")
    status.add_argument("run_id", nargs="?")
    _add_options(status, _LIMIT_OPTIONS)

    lst = add_command("list", "past and present runs, newest first")
    lst.add_argument("--status", help="only runs in this state")
    lst.add_argument("--name", help="only runs whose name matches this glob")
    lst.add_argument("--limit", type=_int, default=20, help="at most this many (default 20)")
    lst.add_argument("--cursor", help="continue after a previous page")

    logs = add_command("logs", "a run's output")
    logs.add_argument("run_id")
    logs.add_argument("--tail", type=_int, default=50, help="last N lines (default 50)")
    logs.add_argument("--attempt", type=_int, help="which attempt (default the latest)")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new output until the run ends"
    )

    stop = add_command("stop", "stop a run gracefully (the script can checkpoint)")
    stop.add_argument("run_id")
    stop.add_argument("--force", action="store_true", help="kill at once, without the grace period")

    compare = add_command("compare", "runs side by side on a metric")
    compare.add_argument("run_ids", nargs="+")
    compare.add_argument("--metric", default="loss")

    legacy = add_command("import-legacy", "import the seed's ~/.backprop/experiments.json")
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
    _show_warnings()
    try:
        return _dispatch(ns, script_args)
    except BackpropError as exc:
        from backprop_mcp.cli.render import clean

        # Messages quote what was given (ids, paths, names): escaped, so they cannot forge lines.
        hint = f"\n{clean(exc.hint)}" if exc.hint else ""
        sys.stderr.write(f"backprop: error: {clean(exc.message)}{hint}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


class _Warnings(logging.Handler):
    """Warnings of the library (an ignored config key, an unreadable GPU) as `backprop: warning:`
    lines on the stderr of the moment (tests swap sys.stderr between calls)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(f"backprop: warning: {record.getMessage()}\n")


def _show_warnings() -> None:
    logger = logging.getLogger("backprop_mcp")
    if not any(isinstance(h, _Warnings) for h in logger.handlers):
        logger.addHandler(_Warnings(logging.WARNING))
        logger.propagate = False


def _explicit_config(raw: str) -> Path:
    from backprop_mcp.core.config import read_file
    from backprop_mcp.core.errors import ConfigError

    path = Path(raw).expanduser().absolute()
    try:
        read_file(path)  # now, for every command: a file asked for by name must exist and be valid
    except ConfigError as exc:
        raise ConfigError(f"--config {exc}") from None
    return path


def _print_settings(settings: Any, origins: dict[str, str]) -> None:
    from backprop_mcp.core.settings import FIELDS, RUN_DEFAULTS

    rows = [(f.key, f.name) for f in FIELDS] + [(k.key, k.name) for k in RUN_DEFAULTS]
    width = max(len(key) for key, _ in rows)
    lines = ["backprop: configuration (setting, value, where it came from):"]
    for key, name in rows:
        value = json.dumps(getattr(settings, name))
        lines.append(f"  {key:<{width}}  {value}  ({_escape(origins.get(name, 'default'))})")
    files = ", ".join(settings.sources) or "none"
    lines.append(f"  config files read, lowest precedence first: {_escape(files)}")
    sys.stderr.write("\n".join(lines) + "\n")


def _escape(text: str) -> str:
    # Paths come from the file system: a control character in one must not drive the terminal.
    return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in text)


def _dispatch(ns: argparse.Namespace, script_args: list[str]) -> int:
    from backprop_mcp.runs.requests import RunRequest
    from backprop_mcp.runs.service import Service

    service = Service(config_file=_explicit_config(ns.config) if ns.config is not None else None)
    if ns.verbose:
        service.on_settings = _print_settings
        if ns.command not in ("run", "resume") and not (ns.command == "status" and not ns.run_id):
            service.settings()  # commands that read no settings still show them when asked
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
            file_defaults=True,
        )
        if ns.dry_run:
            report = service.dry_run(request)
            if out:
                _print_json(report)
            else:
                from backprop_mcp.cli.render import dry_run_text

                print(dry_run_text(dict(report)))
            return 0
        record = service.start(request)
        return _after_start(service, record, detach=ns.detach, out=out)
    if ns.command == "resume" and ns.dry_run:
        preview = service.resume_dry_run(
            ns.run_id, options=_options(ns), from_scratch=ns.from_scratch, python=ns.python, cwd=ns.cwd
        )
        if out:
            _print_json(preview)
        else:
            from backprop_mcp.cli.render import dry_run_text

            print(dry_run_text(dict(preview)))
        return 0
    if ns.command == "resume":
        record = service.resume(
            ns.run_id, options=_options(ns), from_scratch=ns.from_scratch, python=ns.python, cwd=ns.cwd
        )
        return _after_start(service, record, detach=ns.detach, out=out)
    if ns.command == "status":
        from backprop_mcp.cli import render

        if ns.run_id:
            record = service.get(ns.run_id)
            _print_json(record) if out else print(render.record_text(record))
            return 0
        status = service.system_status(_options(ns))
        _print_json(status) if out else print(render.status_text(status))
        return 0
    if ns.command == "list":
        from backprop_mcp.cli import render

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
        if out:
            _print_json(tail)
        else:
            from backprop_mcp.cli.render import clean_log

            sys.stdout.write("".join(clean_log(line) + "\n" for line in tail["lines"]))
        return 0
    if ns.command == "stop":
        record = service.stop(ns.run_id, force=ns.force)
        if out:
            _print_json(record)
        else:
            from backprop_mcp.cli.render import clean

            print(clean(f"stop requested for {ns.run_id}; it is {record['status']}"))
        return 0
    if ns.command == "compare":
        comparison = service.compare(ns.run_ids, metric=ns.metric)
        if out:
            _print_json(comparison)
        else:
            from backprop_mcp.cli.render import clean, number

            metric = comparison["metric"]
            better = "lower" if comparison["lower_is_better"] else "higher"
            print(clean(f"ranked by the last reported {metric} ({better} is better)"))
            for row in comparison["runs"]:
                mark = "*" if row["run_id"] == comparison["top_run_id"] else " "
                last = number(row["last_value"])
                print(clean(f"{mark} {row['run_id']:<40} {row['status']:<10} last {metric} {last}"))
        return 0
    if ns.command == "import-legacy":
        imported = service.import_legacy(Path(ns.path) if ns.path else None)
        if out:
            _print_json(imported)
        else:
            from backprop_mcp.cli.render import clean

            print(clean(f"imported {len(imported['imported'])} run(s) from {imported['source']}"))
            for line in imported["skipped"]:
                print(clean(f"  skipped {line}"))
        return 0
    raise UsageError(f"unknown command {ns.command!r}")


def _after_start(service: Any, record: Any, *, detach: bool, out: bool) -> int:
    from backprop_mcp.cli.render import clean, config_files_text

    if not out:
        # Say which config files set this run's options (a folder's backprop.config.json can
        # change the time box); on stderr with --detach, whose stdout is the run id alone.
        stream = sys.stderr if detach else sys.stdout
        stream.write(f"config: {clean(config_files_text(record.get('config_files') or []))}\n")
    if record["status"] == "rejected":
        if out:
            _print_json(record)
        sys.stderr.write(
            clean(f"backprop: run {record['run_id']} rejected: {record['status_detail']}") + "\n"
        )
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
    from backprop_mcp.cli import render
    from backprop_mcp.core.records import TERMINAL_STATES
    from backprop_mcp.runs.events import parse_line

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
    from backprop_mcp.runs.runlog import LogFollower

    record = service.get(run_id)
    follower = LogFollower(service.store.log_path(run_id, record["attempt"]))
    last_state: tuple[str, str | None] | None = None
    last_plain = 0.0
    try:
        while True:
            record = service.get(run_id)
            state = (record["status"], record["status_detail"])
            if state != last_state:
                last_state = state
                detail = f": {record['status_detail']}" if record["status_detail"] else ""
                header = render.clean(f"[{run_id}] {record['status']}{detail}")
                stream.write(("\r\x1b[K" if tty else "") + header + "\n")
            # Once the run has ended its log is complete: read it to the end, last unended line too.
            ended = record["status"] in TERMINAL_STATES
            for raw in follower.lines(final=ended):
                if not show_progress or not parse_line(raw).events:
                    text = render.clean_log(raw.decode("utf-8", "replace").removesuffix("\r"))
                    stream.write(("\r\x1b[K" if tty else "") + text + "\n")
            if ended:
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
        follower.close()
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
