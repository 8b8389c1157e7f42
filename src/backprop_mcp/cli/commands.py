"""The `backprop` command line: parses arguments (`parser`), calls the service once per command
and renders the result (`render`, `follow`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backprop_mcp.cli.follow import EXIT_CODES, follow
from backprop_mcp.cli.parser import build_parser, options
from backprop_mcp.cli.render import print_json
from backprop_mcp.core.errors import BackpropError, UsageError

# 128 + SIGPIPE, what a shell reports for a program whose reader went away.
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            code = _main(argv)
        except SystemExit as stop:  # argparse: --help, --version and usage errors
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        sys.stdout.flush()  # here, not at exit: a reader that went away is handled below
    except BrokenPipeError:
        # The reader stopped reading (`backprop list | head`): nothing is wrong with the command.
        # Exit as a program killed by SIGPIPE would, and point stdout at /dev/null so that the
        # interpreter's last flush does not fail again with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return code


def _main(argv: Sequence[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    script_args: list[str] | None = None
    if "--" in args:
        cut = args.index("--")
        args, script_args = args[:cut], args[cut + 1 :]
    ns = build_parser().parse_args(args)
    if script_args and ns.command not in ("run", "resume", "sweep"):
        sys.stderr.write(
            "backprop: error: arguments after -- are only for `backprop run`, `resume` and `sweep`\n"
        )
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


def _dispatch(ns: argparse.Namespace, script_args: list[str] | None) -> int:
    from backprop_mcp.runs.requests import RunRequest
    from backprop_mcp.runs.service import Service

    service = Service(config_file=_explicit_config(ns.config) if ns.config is not None else None)
    if ns.verbose:
        service.on_settings = _print_settings
        if ns.command not in ("run", "resume") and not (ns.command == "status" and not ns.run_id):
            service.settings()  # commands that read no settings still show them when asked
    out = ns.json
    if ns.command.startswith("sweep"):
        from backprop_mcp.cli.sweep import dispatch_sweep

        return dispatch_sweep(service, ns, script_args or [])
    if ns.command in ("show", "diff", "rerun"):
        from backprop_mcp.cli.provenance import dispatch

        return dispatch(service, ns, _after_start)
    if ns.command == "run":
        request = RunRequest(
            script=ns.script,
            args=script_args or [],
            name=ns.name,
            run_id=ns.run_id,
            cwd=ns.cwd,
            python=ns.python,
            resume_from=ns.resume_from,
            options=options(ns),
            file_defaults=True,
            tags=ns.tags,
            note=ns.note,
        )
        if ns.dry_run:
            report = service.dry_run(request)
            if out:
                print_json(report)
            else:
                from backprop_mcp.cli.render import dry_run_text

                print(dry_run_text(dict(report)))
            return 0
        record = service.start(request)
        return _after_start(service, record, detach=ns.detach, out=out)
    if ns.command == "resume" and ns.dry_run:
        preview = service.resume_dry_run(
            ns.run_id,
            options=options(ns),
            from_scratch=ns.from_scratch,
            args=script_args,
            python=ns.python,
            cwd=ns.cwd,
        )
        if out:
            print_json(preview)
        else:
            from backprop_mcp.cli.render import dry_run_text

            print(dry_run_text(dict(preview)))
        return 0
    if ns.command == "resume":
        record = service.resume(
            ns.run_id,
            options=options(ns),
            from_scratch=ns.from_scratch,
            args=script_args,
            python=ns.python,
            cwd=ns.cwd,
        )
        return _after_start(service, record, detach=ns.detach, out=out)
    if ns.command == "status":
        from backprop_mcp.cli import render

        if ns.run_id:
            record = service.get(ns.run_id)
            if out:
                print_json(record)
            else:
                from backprop_mcp.cli.curves import STATUS_CURVE_POINTS, curve_line
                from backprop_mcp.cli.notes import notebook_text

                curve = curve_line(service.metrics([ns.run_id], points=STATUS_CURVE_POINTS))
                print(render.record_text(record) + (f"\n{curve}" if curve else ""))
                book, unreadable = service.notebook_beside(ns.run_id)
                print(notebook_text(book, heading=True), end="")
                if unreadable:
                    print(render.clean(f"notes      cannot be read: {unreadable}"))
            return 0
        status = service.system_status(options(ns))
        print_json(status) if out else print(render.status_text(status))
        return 0
    if ns.command == "list":
        from backprop_mcp.cli import render

        page = service.list_runs(
            status=ns.status,
            name=ns.name,
            limit=ns.limit,
            cursor=ns.cursor,
            sort=ns.sort,
            sweep=ns.sweep,
            tags=ns.tags,
        )
        if out:
            print_json(page)
        else:
            print(render.table(page["runs"], sort=ns.sort))
            if page["next_cursor"]:
                shown: dict[str, Any] = {"--sort": ns.sort, "--status": ns.status, "--name": ns.name}
                shown.update({"--sweep": ns.sweep, "--tag": ns.tags, "--limit": ns.limit})
                print(render.next_page_text(shown, page["next_cursor"]))
        return 0
    if ns.command == "logs":
        if ns.follow:
            return follow(service, ns.run_id, out=False, show_progress=False)
        tail = service.logs(ns.run_id, tail=ns.tail, attempt=ns.attempt)
        if out:
            print_json(tail)
        else:
            from backprop_mcp.cli.render import clean_log

            sys.stdout.write("".join(clean_log(line) + "\n" for line in tail["lines"]))
            if "note" in tail:
                sys.stderr.write(f"backprop: {tail['note']}\n")
        return 0
    if ns.command == "stop":
        if len(ns.run_ids) == 1:  # one run: its record, or its error and exit code, as always
            record = service.stop(ns.run_ids[0], force=ns.force)
            if out:
                print_json(record)
            else:
                from backprop_mcp.cli.render import clean

                print(clean(f"stop requested for {ns.run_ids[0]}; it is {record['status']}"))
            return 0
        stops = service.stop_runs(ns.run_ids, force=ns.force)
        if out:
            print_json(stops)
        else:
            from backprop_mcp.cli.render import stop_report_text

            print(stop_report_text(stops))
        return 0 if stops["all_stopped"] else 1
    if ns.command == "compare":
        comparison = service.compare(ns.run_ids, metric=ns.metric, by=ns.by)
        if out:
            print_json(comparison)
        else:
            from backprop_mcp.cli.curves import comparison_text

            print(comparison_text(comparison))
        return 0
    if ns.command == "metrics":
        answer = service.metrics(ns.run_ids, metrics=ns.metrics, points=ns.points)
        if out:
            print_json(answer)
        else:
            from backprop_mcp.cli.curves import metrics_text

            print(metrics_text(answer))
        return 0
    if ns.command in ("note", "tag"):
        from backprop_mcp.cli.notes import dispatch_notes

        return dispatch_notes(service, ns)
    if ns.command == "plot":
        from backprop_mcp.cli.plot import plot_command

        return plot_command(service, ns)
    if ns.command == "import-legacy":
        imported = service.import_legacy(Path(ns.path) if ns.path else None)
        if out:
            print_json(imported)
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
        if record["attempts"][-1].get("code_changed"):
            changed = f"note: {record['script']} changed since attempt {record['attempt'] - 1}"
            stream.write(
                clean(f"{changed}; this attempt runs the new code (`backprop diff` shows how)") + "\n"
            )
    if record["status"] == "rejected":
        if out:
            print_json(record)
        sys.stderr.write(
            clean(f"backprop: run {record['run_id']} rejected: {record['status_detail']}") + "\n"
        )
        return EXIT_CODES["rejected"]
    if detach:
        if out:
            print_json(record)
        else:
            print(record["run_id"])
        return 0
    return follow(service, record["run_id"], out=out, show_progress=True)
