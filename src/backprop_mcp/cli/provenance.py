"""The commands about which code runs ran: `show` (a run, its attempts and what each ran), `diff`
(two attempts' code, arguments and options; exit 0 same, 1 different, like diff(1)) and `rerun`
(a new run of an attempt's snapshot); and their text."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from backprop_mcp.cli.render import clean, clean_log, print_json, record_text
from backprop_mcp.core.answers import RunDiff, RunShow
from backprop_mcp.core.provenance import CodeFile, Provenance

COMMANDS = ("show", "diff", "rerun")


def add_commands(add_command: Any) -> list[argparse.ArgumentParser]:
    show = add_command("show", "everything about a run: its record, its attempts and the code each ran")
    show.add_argument("run_id")
    diff = add_command(
        "diff",
        "the code, argument and option differences of two runs or attempts (RUN or RUN:N); exit 1 if any",
    )
    diff.add_argument("run_a", metavar="RUN_A")
    diff.add_argument("run_b", metavar="RUN_B")
    rerun = add_command(
        "rerun", "start a new run of a run's script snapshot (RUN or RUN:N), arguments and options"
    )
    rerun.add_argument("run_ref", metavar="RUN_ID")
    rerun.add_argument("-n", "--name", help="the new run's name")
    rerun.add_argument("--run-id", help="the new run's id (generated if omitted)")
    rerun.add_argument("--detach", action="store_true", help="print the run id and return at once")
    return [show, diff, rerun]


def dispatch(service: Any, ns: argparse.Namespace, after_start: Callable[..., int]) -> int:
    if ns.command == "show":
        shown = service.show(ns.run_id)
        print_json(shown) if ns.json else print(show_text(shown))
        return 0
    if ns.command == "diff":
        found: RunDiff = service.diff(ns.run_a, ns.run_b)
        print_json(found) if ns.json else sys.stdout.write(diff_text(found))
        return 0 if found["same"] else 1
    record = service.rerun(ns.run_ref, name=ns.name, run_id=ns.run_id)
    if not ns.json:
        stream = sys.stderr if ns.detach else sys.stdout
        rerun = record["rerun_of"]
        how = "its stored copy" if rerun["script"] != record["script"] else "the script (unchanged since)"
        stream.write(clean(f"rerun of {rerun['run_id']}:{rerun['attempt']}, from {how}") + "\n")
    return after_start(service, record, detach=ns.detach, out=ns.json)


# Sections of `show`, in order: each takes the answer and gives its text ("" to leave it out).
def _run_section(shown: RunShow) -> str:
    return record_text(shown["run"])


def _code_section(shown: RunShow) -> str:
    lines = []
    summaries = {a["attempt"]: a for a in shown["run"]["attempts"]}
    for kept in shown["code"]:
        summary = summaries.get(kept["attempt"])
        changed = (
            " (script changed since the attempt before)" if summary and summary.get("code_changed") else ""
        )
        lines.append(clean(f"attempt {kept['attempt']} code{changed}"))
        lines.extend("  " + line for line in code_lines(kept))
    return "\n".join(lines)


def _notebook_section(shown: RunShow) -> str:
    from backprop_mcp.cli.notes import notebook_text

    return notebook_text(shown["notebook"]).rstrip("\n")


SHOW_SECTIONS: list[Callable[[RunShow], str]] = [_run_section, _code_section, _notebook_section]


def show_text(shown: RunShow) -> str:
    return "\n\n".join(text for section in SHOW_SECTIONS if (text := section(shown)))


def code_lines(kept: Provenance) -> list[str]:
    from backprop_mcp.runs.provenance import git_summary

    env = kept["env"]
    lines = [f"script   {_file_text(kept['script'])}"]
    lines += [f"file     {_file_text(f)}" for f in kept["files"]]
    lines.append(f"copied   {kept['copied_bytes']} of at most {kept['limit_bytes']} bytes")
    lines.append(f"git      {git_summary(kept['git'])}")
    version = env["python_version"] or f"unknown ({env.get('error', 'not asked')})"
    lines.append(f"python   {version} ({env['python']})")
    if env["packages"]:
        lines.append("packages " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()))
    if "gpu" in env:
        lines.append(
            f"gpu      {env['gpu']}" + (f", driver {env['gpu_driver']}" if "gpu_driver" in env else "")
        )
    lines.append(f"backprop {env['backprop']}")
    lines += [f"note     {note}" for note in kept["notes"]]
    return [clean(line) for line in lines]


def _file_text(file: CodeFile) -> str:
    sha = (file["sha256"] or "-")[:12]
    kept = "copied" if file["copied"] else file.get("note", "not copied")
    return f"{file['path']}  sha256 {sha}  {file['bytes']} bytes, {kept}"


def diff_text(found: RunDiff) -> str:
    if found["same"]:
        return clean(f"{found['a']} and {found['b']} ran the same code, arguments and options") + "\n"
    lines = [clean(f"{found['a']} and {found['b']} differ:")]
    lines += ["  " + clean(line) for line in found["changed_files"]]
    lines += [clean(f"  option {name}: {a!r} -> {b!r}") for name, (a, b) in found["options"].items()]
    lines += ["  note: " + clean(note) for note in found["notes"]]
    text = "\n".join(lines) + "\n"
    if found["diff"]:
        # The diff itself as it is (a patch can be applied), control characters escaped.
        text += "".join(clean_log(line) + "\n" for line in found["diff"].splitlines())
    return text
