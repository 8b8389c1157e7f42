"""Human-readable rendering of records, rows and status for the CLI (no decisions here), its
`--json` output, and the one escaping of what reaches a terminal (`clean`)."""

from __future__ import annotations

import json
import re
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only annotations: `--version` and `--json` output need not load the shapes
    from backprop_mcp.core.answers import ClusterResources, ClusterView, StopReport, SystemStatus
    from backprop_mcp.core.machine import Decision
    from backprop_mcp.core.records import RunRecord, RunRow

# What must never reach a terminal raw from stored or user-given text: C0 controls (a newline
# forges a row, ESC starts escape codes that set the title or rewrite the screen), DEL, C1 controls
# (U+009B is a one-character CSI), and the Unicode marks that reorder (bidi overrides and isolates)
# or break (line and paragraph separators) what is shown.
_BIDI_AND_SEPARATORS = "\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI_AND_SEPARATORS}]")
# A script's log lines keep their tabs (columns of numbers); everything else above is escaped.
_UNSAFE_IN_LOG = re.compile(f"[\x00-\x08\x0a-\x1f\x7f-\x9f{_BIDI_AND_SEPARATORS}]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")


def clean(text: object) -> str:
    """`text` as one safe terminal line: every control character shown as an escape (\\n, \\x1b)."""
    return _UNSAFE.sub(_escaped, str(text))


def clean_log(text: str) -> str:
    """A script's log line for a terminal: like `clean`, but tabs are kept."""
    return _UNSAFE_IN_LOG.sub(_escaped, text)


def _lines(lines: list[str]) -> str:
    # Each line is of our making; escaping it whole escapes every field in it.
    return "\n".join(clean(line) for line in lines)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def step_text(step: int | None, total: int | None) -> str:
    if step is None:
        return "-"
    return f"{step}/{total}" if total else str(step)


def bar(step: int | None, total: int | None, width: int = 24) -> str:
    if not step or not total:
        return "[" + "." * width + "]"
    done = min(int(width * step / total), width)
    return "[" + "#" * done + "." * (width - done) + f"] {min(100 * step / total, 100):3.0f}%"


def progress_line(record: RunRecord, time_left: float | None, *, with_bar: bool) -> str:
    parts = [
        bar(record["step"], record["total"])
        if with_bar
        else f"step {step_text(record['step'], record['total'])}"
    ]
    if with_bar:
        parts.append(step_text(record["step"], record["total"]))
    parts.append(f"loss {number(record['loss'])}")
    for name, value in list(record["metrics"].items())[:3]:
        parts.append(f"{name} {number(value)}")
    if record["eta_seconds"] is not None:
        parts.append(f"ETA {duration(record['eta_seconds'])}")
    if time_left is not None:
        parts.append(f"box {duration(time_left)} left")
    return clean("  ".join(parts))


def config_files_text(files: list[str]) -> str:
    """The config files that applied, or that none did."""
    return ", ".join(files) or "(defaults, no config file)"


def record_text(record: RunRecord, now: float | None = None) -> str:
    lines = [
        f"run        {record['run_id']}" + (f"  ({record['name']})" if record["name"] else ""),
        f"status     {record['status']}"
        + (f"  {record['status_detail']}" if record["status_detail"] else ""),
        f"attempt    {record['attempt']}",
        f"script     {record['script']} {' '.join(record['args'])}".rstrip(),
        f"python     {record['python']} ({record['python_source']})",
        f"cwd        {record['cwd']}",
        f"framework  {record['framework']}",
        f"step       {step_text(record['step'], record['total'])}    loss {number(record['loss'])}",
    ]
    if record["metrics"]:
        lines.append("metrics    " + "  ".join(f"{k} {number(v)}" for k, v in record["metrics"].items()))
    lines.append(
        f"time box   {record['max_run_minutes']:g} min"
        + (f", deadline {record['deadline']}" if record["deadline"] else "")
    )
    if "config_files" in record:  # absent from records written before it was kept
        lines.append(f"config     {config_files_text(record['config_files'])}")
    if record["paused_seconds"]:
        lines.append(f"paused     {duration(record['paused_seconds'])} (not charged to the box)")
    if record["cuda_visible_devices"] is not None:
        lines.append(f"gpu        CUDA_VISIBLE_DEVICES={record['cuda_visible_devices'] or '(none)'}")
    if record["latest_checkpoint"]:
        lines.append(f"checkpoint {record['latest_checkpoint']}")
    if record["termination_reason"]:
        code = f", exit code {record['exit_code']}" if record["exit_code"] is not None else ""
        sig = f", signal {record['signal']}" if record["signal"] else ""
        lines.append(f"ended      {record['termination_reason']}{code}{sig} at {record['ended_at']}")
    if record["bad_event_lines"]:
        lines.append(f"warnings   {record['bad_event_lines']} bad event line(s) skipped (see the log)")
    if len(record["attempts"]) > 1:
        lines.append(
            "attempts   "
            + ", ".join(
                f"#{a['attempt']} {a['status']}"
                + (f" ({a['termination_reason']})" if a["termination_reason"] else "")
                for a in record["attempts"]
            )
        )
    return _lines(lines)


# The ARGS column of `list` shows at most this many characters of a run's arguments: a table row
# stays one readable line, and `status RUN_ID` (or --json) shows them whole.
MAX_ARGS_CELL = 40
# `list` sorted by a metric other than loss shows that metric's column.
_FIELD_SORTS = ("loss", "created", "name", "step")


def shortened(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def table(rows: list[RunRow], *, sort: str | None = None) -> str:
    if not rows:
        return "no runs"
    metric = (sort or "").removeprefix("-")
    shown = metric if metric and metric not in _FIELD_SORTS else None
    tagged = any(r.get("tags") for r in rows)
    head = (
        "RUN ID",
        "NAME",
        "STATUS",
        "ATT",
        "STEP",
        "LOSS",
        *([shown] if shown else []),
        "ARGS",
        *(["TAGS"] if tagged else []),
        "CREATED",
        "REASON",
    )
    body = [
        tuple(
            clean(cell)
            for cell in (
                r["run_id"],
                r["name"] or "",
                r["status"],
                str(r["attempt"]),
                step_text(r["step"], r["total"]),
                number(r["loss"]),
                *([number((r.get("metrics") or {}).get(shown))] if shown else []),
                shortened(" ".join(r.get("args") or []), MAX_ARGS_CELL),
                *([shortened(",".join(r.get("tags") or []), MAX_ARGS_CELL)] if tagged else []),
                r["created_at"][:19].replace("T", " "),
                r["termination_reason"] or r.get("note") or "",
            )
        )
        for r in rows
    ]
    head = tuple(clean(cell) for cell in head)
    widths = [max(len(str(row[i])) for row in (head, *body)) for i in range(len(head))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in (head, *body)
    )


def next_page_text(options: dict[str, str | int | list[str] | None], cursor: str) -> str:
    """The `backprop list` line that shows the next page with the same options (a list: the
    option repeated)."""
    import shlex

    words = ["backprop", "list"]
    for flag, given in options.items():
        for value in given if isinstance(given, list) else [given]:
            if value is not None and not (flag == "--limit" and value == 20):
                # "--sort=-val_acc": argparse would take "-val_acc" after a space for an option.
                words.append(f"{flag}={value}")
    words += ["--cursor", cursor]
    return clean("more: " + shlex.join(words))


def stop_report_text(report: StopReport) -> str:
    """One line per run asked to stop: its state now, or why it could not be stopped."""
    lines = []
    for result in report["runs"]:
        record = result["record"]
        if result["error"] is None:
            lines.append(
                f"stop requested for {result['run_id']}; it is {record['status'] if record else '?'}"
            )
        else:
            lines.append(f"could not stop {result['run_id']}: {result['error']}")
    return _lines(lines)


def decision_text(decision: Decision) -> str:
    verdict = "a new run can start now" if decision["allowed"] else "a new run would wait"
    lines = [f"verdict    {verdict}"]
    lines += [f"  - {reason}" for reason in decision["reasons"]]
    if decision["gpu"]:
        lines.append(
            f"  GPU chosen: {decision['gpu']['index']} {decision['gpu']['name']} ({decision['gpu']['uuid']})"
        )
    return _lines(lines)


def status_text(status: SystemStatus) -> str:
    snap = status["snapshot"]
    cpu = "unknown" if snap["cpu_percent"] is None else f"{snap['cpu_percent']:.0f}%"
    ram = (
        "unknown"
        if snap["ram_available_gb"] is None
        else f"{snap['ram_available_gb']:.1f} GB free of {snap['ram_total_gb'] or 0:.1f} GB"
    )
    lines = [
        f"cpu        {cpu} of {snap['cpu_count']} cores (limit {status['limits']['max_cpu_percent']:g}%)",
        f"ram        {ram} (need {status['limits']['min_free_ram_gb']:g} GB)",
    ]
    if snap["gpus"] is None:
        lines.append(f"gpus       unknown ({snap['gpu_error']})")
    elif not snap["gpus"]:
        lines.append(f"gpus       none (probe: {snap['gpu_probe']})")
    for gpu in snap["gpus"] or []:
        lines.append(
            f"gpu {gpu['index']}      {gpu['name']}: {number(gpu['memory_free_mb'], 6)} MB free of "
            f"{number(gpu['memory_total_mb'], 6)} MB, {number(gpu['temperature_c'], 3)} C, "
            f"{number(gpu['utilization_pct'], 3)}% busy"
        )
    if "cluster" in status:
        lines += cluster_lines(status["cluster"])
    lines.append(f"live runs  {len(status['live_runs'])} (max parallel {status['limits']['max_parallel']})")
    lines += [
        f"  - {r['run_id']} {r['status']} step {step_text(r['step'], r['total'])}"
        for r in status["live_runs"]
    ]
    lines.append(f"queued     {len(status['queued_runs'])}")
    lines += [f"  {i}. {r['run_id']}" for i, r in enumerate(status["queued_runs"], 1)]
    return _lines(lines) + "\n" + decision_text(status["verdict"])


def cluster_lines(cluster: ClusterView) -> list[str]:
    """The Ray cluster of a status: its free resources in all, then per node, the freest first."""

    def free(of: ClusterResources) -> str:
        return (
            f"{of['cpus_free']:g} of {of['cpus_total']:g} CPU, {of['gpus_free']:g} of {of['gpus_total']:g} "
            f"GPU, {of['memory_free_gb']:.1f} of {of['memory_total_gb']:.1f} GB memory free"
        )

    if cluster["error"]:
        return [f"ray        {cluster['address']}: unknown ({cluster['error']})"]
    count = len(cluster["nodes"]) + cluster["nodes_left_out"]
    lines = [f"ray        {cluster['address']}: {free(cluster)} on {count} node(s)"]
    lines += [f"  - {n['node']}{' (head)' if n['head'] else ''}: {free(n)}" for n in cluster["nodes"]]
    if cluster["nodes_left_out"]:
        lines.append(f"  ... and {cluster['nodes_left_out']} more node(s)")
    return lines


def seconds_until(iso: str | None, now: float | None = None) -> float | None:
    from backprop_mcp.core.clock import parse_iso

    at = parse_iso(iso)
    return None if at is None else at - (time.time() if now is None else now)


def _resume_line(environment: dict[str, str]) -> list[str]:
    attempt, checkpoint = environment.get("BACKPROP_ATTEMPT", "1"), environment.get("BACKPROP_RESUME_FROM")
    if attempt == "1" and checkpoint is None:
        return []
    return [f"attempt    {attempt}, from {checkpoint or 'scratch (no checkpoint)'}"]


def dry_run_text(report: dict[str, Any]) -> str:
    import shlex

    lines = [
        f"command    {shlex.join(report['command'])}",
        f"cwd        {report['cwd']}",
        f"python     {report['python']} ({report['python_source']})",
        *_resume_line(report["environment"]),
        "environment (added to the inherited one):",
        *[f"  {k}={v}" for k, v in report["environment"].items()],
        f"config     {config_files_text(report['config_files'])}",
    ]
    return _lines(lines) + "\n" + decision_text(report["decision"]) + "\nnothing was started (--dry-run)"


def print_json(data: object) -> None:
    """`--json` output: the MCP tools' shapes, indented."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
