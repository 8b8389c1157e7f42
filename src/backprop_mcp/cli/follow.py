"""The foreground view of a run (`backprop run` without `--detach`, `logs -f`): its output, state
changes and progress until it ends, Ctrl-C once for a graceful stop and twice to kill, and the exit
status that says how it ended."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

from backprop_mcp.cli.render import print_json
from backprop_mcp.core.errors import BackpropError

EXIT_CODES = {"completed": 0, "failed": 1, "lost": 1, "rejected": 3, "timed_out": 4, "stopped": 5}
# How often the foreground view re-reads the record and the log: fast enough to feel live.
FOLLOW_POLL_SECONDS = 0.25
# Without a terminal, a progress line is printed at most this often (logs stay readable).
PLAIN_PROGRESS_EVERY_SECONDS = 10.0


def follow(service: Any, run_id: str, *, out: bool, show_progress: bool) -> int:
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
        print_json(record)
    else:
        stream.write(render.record_text(record) + "\n")
    return EXIT_CODES.get(record["status"], 1)
