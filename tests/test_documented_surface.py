"""Documented behaviour of the CLI that no other test ran (issue 15, point 4): a log rotating at its
size limit, the value of `eta_seconds`, the progress bar on a terminal and the plain progress line
without one, `logs --attempt` and paging with `list --cursor`."""

from __future__ import annotations

import os
import pty
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from backprop_mcp.core import files as files_module
from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.records import RunRecord, new_record, row_of
from backprop_mcp.core.store import Store
from backprop_mcp.runs.requests import RunRequest
from backprop_mcp.runs.service import Service
from tests.helpers import FIXTURES, WAIT_SECONDS, cli, cli_json, unique_id, wait_for_end, wait_until

TOLD = FIXTURES / "reports_progress_when_told.py"


def no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr


# -- log rotation -----------------------------------------------------------------------------------


def test_a_log_past_its_size_limit_keeps_one_bounded_rotated_file_and_the_newest_output(
    env: dict[str, str], tmp_path: Path
) -> None:
    # 256 KiB, four times the most the supervisor reads from the script at once (64 KiB): each file
    # stays within the limit, and the rotated one holds at least 192 KiB.
    limit = 262144
    env = {**env, "BACKPROP_LOG_ROTATE_BYTES": str(limit)}
    run_id = unique_id("rotates")
    count = 10_000  # ~1 MB of output: about 4 rotations
    done = cli(
        env, "run", str(FIXTURES / "floods_past_log_rotation.py"), "--run-id", run_id, "--detach",
        "--", str(count), "0", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=tmp_path)
    assert wait_for_end(service, run_id)["status"] == "completed"

    logs = Path(env["BACKPROP_HOME"]) / "runs" / run_id / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["attempt-1.log", "attempt-1.log.1"]
    current, rotated = logs / "attempt-1.log", logs / "attempt-1.log.1"
    assert 0 < current.stat().st_size <= limit and 0 < rotated.stat().st_size <= limit
    expected = [f"line {n:05d} {'x' * 80}" for n in range(count)] + ["the end"]
    expected.insert(count // 2 + 1, "colour \x1b[31mred\x1b[0m and\ta tab")
    # The newest output, whole and in order across the two files: more than one file's worth (the
    # write that rotated the log did not fit in the rotated file).
    kept = (rotated.read_bytes() + current.read_bytes()).decode("utf-8").split("\n")
    assert limit < current.stat().st_size + rotated.stat().st_size
    first = kept[1]  # the rotated file may start in the middle of a line
    assert kept[1:] == expected[expected.index(first) :]
    assert kept[0] and expected[expected.index(first) - 1].endswith(kept[0])

    # `backprop logs` reads on across the rotation: the last N lines, even when fewer are in the
    # current file than asked for.
    in_current = len(current.read_bytes().split(b"\n"))
    asked = in_current + 5
    shown = cli(env, "logs", run_id, "--tail", str(asked))
    no_traceback(shown)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == expected[-asked:]
    answer = cli_json(env, "logs", run_id, "--tail", "3")
    assert answer["lines"] == expected[-3:] and answer["truncated"] is True


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=120), st.integers(min_value=0, max_value=120), st.integers(min_value=1, max_value=16)
)
def test_a_log_and_its_rotated_part_are_read_backwards_as_one_file(data: bytes, cut: int, block: int) -> None:
    """The rotation cuts anywhere, even inside a line: the two parts read as the whole would."""
    with tempfile.TemporaryDirectory() as folder:
        rotated, current = Path(folder) / "log.1", Path(folder) / "log"
        rotated.write_bytes(data[:cut])
        current.write_bytes(data[cut:])
        whole = Path(folder) / "whole"
        whole.write_bytes(data)
        original = files_module._REVERSE_BLOCK
        files_module._REVERSE_BLOCK = block
        try:
            got = list(files_module.reverse_lines(current, before=rotated))
            expected = list(files_module.reverse_lines(whole))
        finally:
            files_module._REVERSE_BLOCK = original
    assert got == expected == [line for line in reversed(data.split(b"\n")) if line.strip()]


# -- eta_seconds ------------------------------------------------------------------------------------


def start_told(service: Service, run_id: str, folder: Path, total: str, work: float) -> None:
    folder.mkdir()
    args = (str(folder), total, str(work))
    service.start(RunRequest(script=str(TOLD), args=args, run_id=run_id))


def step_seen(service: Service, run_id: str, step: int) -> RunRecord:
    def seen() -> RunRecord | None:
        record = service.get(run_id)
        return record if record["step"] == step else None

    return wait_until(seen, what=f"step {step} in the record of {run_id}")


def test_eta_is_the_steps_left_at_the_attempts_rate_since_its_first_progress(
    service: Service, tmp_path: Path
) -> None:
    """eta_seconds = (total - step) / rate, rate = steps since the attempt's first progress line
    per second since the supervisor read it. The test knows when each line could have been sent
    and read (it opens the gates and sees the record), which bounds the seconds between them."""
    run_id = unique_id("eta")
    gates = tmp_path / "gates"
    start_told(service, run_id, gates, "100", 2.0)
    gate_0 = time.time()
    (gates / "go-0").touch()
    first = step_seen(service, run_id, 0)
    seen_0 = time.time()
    assert first["eta_seconds"] is None  # one progress line gives no rate yet
    gate_1 = time.time()
    (gates / "go-1").touch()
    record = step_seen(service, run_id, 80)
    seen_1 = time.time()
    (gates / "finish").touch()

    # Step 0 was read between its gate and the record showing it; step 80 at least the script's
    # 2 s of work after its gate, and before the record showed it.
    shortest, longest = gate_1 + 2.0 - seen_0, seen_1 - gate_0
    step, total, first_step = record["step"], record["total"], first["step"]
    assert (step, total, first_step) == (80, 100, 0)
    assert step is not None and total is not None and first_step is not None
    left_per_step = (total - step) / (step - first_step)
    eta = record["eta_seconds"]
    assert eta is not None
    assert left_per_step * shortest - 0.05 <= eta <= left_per_step * longest + 0.05, (eta, shortest, longest)
    ended = wait_for_end(service, run_id)
    assert ended["status"] == "completed" and ended["eta_seconds"] is None


def test_eta_is_none_when_the_script_reports_no_total(service: Service, tmp_path: Path) -> None:
    run_id = unique_id("eta-none")
    gates = tmp_path / "gates"
    start_told(service, run_id, gates, "none", 0.0)
    (gates / "go-0").touch()
    step_seen(service, run_id, 0)
    (gates / "go-1").touch()
    record = step_seen(service, run_id, 80)
    (gates / "finish").touch()
    assert record["total"] is None and record["eta_seconds"] is None
    assert wait_for_end(service, run_id)["status"] == "completed"


# -- the foreground view's progress -----------------------------------------------------------------

# The bar at step 80 of 100: 19 of 24 cells, then step/total, loss, metrics, ETA and the box left.
BAR = re.compile(r"\r\x1b\[K\[#{19}\.{5}\]  80%  80/100  loss 0\.25  acc 0\.75  ETA \d+s  box \d+m\d\ds left")
EMPTY_BAR = "\r\x1b[K[" + "." * 24 + "]  0/100  loss 1  box "
PLAIN = re.compile(r"^step 0/100  loss 1  box \d+m\d\ds left$", re.MULTILINE)


class Reader:
    """Everything a child writes to one file descriptor, read on a thread as it comes."""

    def __init__(self, fd: int) -> None:
        self.fd, self.chunks = fd, [b""]
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: the terminal's other end closed
                return
            if not chunk:
                return
            self.chunks.append(chunk)

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")


def foreground(env: dict[str, str], tmp_path: Path, run_id: str, stdout: int) -> subprocess.Popen[bytes]:
    gates = tmp_path / "gates"
    gates.mkdir()
    return subprocess.Popen(
        [sys.executable, "-m", "backprop_mcp", "run", str(TOLD), "--run-id", run_id,
         "--", str(gates), "100", "0"],
        env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_the_foreground_run_draws_a_progress_bar_on_a_terminal(env: dict[str, str], tmp_path: Path) -> None:
    run_id = unique_id("bar")
    master, slave = pty.openpty()
    proc = foreground(env, tmp_path, run_id, slave)
    os.close(slave)
    reader = Reader(master)
    gates = tmp_path / "gates"
    try:
        (gates / "go-0").touch()
        # Step 0 drawn: an empty bar. Step 80 comes after it, so there is a rate and an ETA.
        wait_until(lambda: EMPTY_BAR in reader.text(), what="the progress bar at step 0")
        (gates / "go-1").touch()
        wait_until(lambda: BAR.search(reader.text()), what="the progress bar at step 80")
        (gates / "finish").touch()
        assert proc.wait(timeout=WAIT_SECONDS) == 0
        reader.thread.join(timeout=WAIT_SECONDS)
    finally:
        proc.kill()
        os.close(master)
        if proc.stderr is not None:
            proc.stderr.close()
    text = reader.text()
    assert "finished" in text and "status     completed" in text
    assert not PLAIN.search(text)


def test_without_a_terminal_the_foreground_run_prints_the_plain_progress_line(
    env: dict[str, str], tmp_path: Path
) -> None:
    run_id = unique_id("plain")
    proc = foreground(env, tmp_path, run_id, subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    reader = Reader(proc.stdout.fileno())
    gates = tmp_path / "gates"
    try:
        (gates / "go-0").touch()
        wait_until(lambda: PLAIN.search(reader.text()), what="the plain progress line at step 0")
        (gates / "go-1").touch()
        (gates / "finish").touch()
        assert proc.wait(timeout=WAIT_SECONDS) == 0, proc.stderr.read()
        reader.thread.join(timeout=WAIT_SECONDS)
    finally:
        proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    text = reader.text()
    assert "\r" not in text and "\x1b" not in text and "[" + "." * 24 + "]" not in text
    assert f"[{run_id}] running" in text.splitlines() and "finished" in text.splitlines()


# -- logs --attempt ---------------------------------------------------------------------------------


def test_logs_of_an_attempt_show_that_attempts_output_only(env: dict[str, str], tmp_path: Path) -> None:
    run_id = unique_id("attempts")
    script = str(FIXTURES / "prints_each_argument_as_a_line.py")
    first = cli(env, "run", script, "--run-id", run_id, "--", "marker-of-attempt-1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = cli(env, "resume", run_id, "--from-scratch", "--", "marker-of-attempt-2", cwd=tmp_path)
    assert second.returncode == 0, second.stderr

    for attempt in ("1", "2"):
        shown = cli(env, "logs", run_id, "--attempt", attempt)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.splitlines() == [f"marker-of-attempt-{attempt}"]
        answer = cli_json(env, "logs", run_id, "--attempt", attempt)
        assert answer["attempt"] == int(attempt) and answer["lines"] == [f"marker-of-attempt-{attempt}"]
    latest = cli(env, "logs", run_id)
    assert latest.stdout.splitlines() == ["marker-of-attempt-2"]
    for beyond in ("3", "0"):
        bad = cli(env, "logs", run_id, "--attempt", beyond)
        no_traceback(bad)
        assert bad.returncode == 2 and bad.stdout == ""
        assert f"run {run_id} has attempts 1 to 2; got attempt {beyond}" in bad.stderr


# -- list --cursor ----------------------------------------------------------------------------------


def add_runs(env: dict[str, str], prefix: str, count: int) -> list[str]:
    """Finished runs stored the way the service stores them, one second apart; newest first."""
    store = Store(Path(env["BACKPROP_HOME"])).ensure()
    base = time.time() - count
    for n in range(count):
        record = new_record(
            run_id=f"{prefix}-{n}", script=str(TOLD), created_at=now_iso(base + n),
            status="completed", termination_reason="exit_zero",
        )  # fmt: skip
        store.create(record)
        store.index_append(row_of(record), new=True)
    return [f"{prefix}-{n}" for n in reversed(range(count))]


def test_list_pages_through_every_run_once_in_order_by_its_cursor(
    env: dict[str, str], tmp_path: Path
) -> None:
    newest_first = add_runs(env, unique_id("paged"), 7)
    seen: list[str] = []
    command = ["list", "--limit", "3"]
    pages = 0
    while True:
        done = cli(env, *command)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        more = lines[-1] if lines[-1].startswith("more: ") else None
        rows = lines[1 : -1 if more else None]  # below the header, above the next page's command
        seen += [row.split()[0] for row in rows]
        pages += 1
        if more is None:
            break
        words = shlex.split(more.removeprefix("more: "))
        assert words[:2] == ["backprop", "list"]
        command = words[1:]  # the next page's command, as printed
    assert seen == newest_first and pages == 3

    # The same through --json: next_cursor, until there is none.
    seen, cursor = [], None
    while True:
        page = cli_json(env, "list", "--limit", "3", *(["--cursor", cursor] if cursor else []))
        seen += [row["run_id"] for row in page["runs"]]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    assert seen == newest_first


def test_a_bad_list_cursor_is_a_usage_error(env: dict[str, str], tmp_path: Path) -> None:
    add_runs(env, unique_id("cursor"), 2)
    for cursor in ("abc", "-1", "1.5", ""):
        done = cli(env, "list", "--cursor", cursor)
        no_traceback(done)
        assert done.returncode == 2 and done.stdout == "", (cursor, done.stdout)
        assert f"invalid cursor {cursor!r}; pass the next_cursor of a previous page" in done.stderr
