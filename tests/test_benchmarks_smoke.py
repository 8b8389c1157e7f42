"""The benchmark suite's quick mode runs end to end and prints its table; no figure is judged here
(timings belong to benchmarks/run.py's report, not to a test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
GROUPS = ("launch", "ingestion", "deadline", "pause", "overhead", "queue", "commands", "mcp")
# The quick suite takes about a minute on a busy 2-core machine; this bounds a hung one.
SUITE_TIMEOUT_SECONDS = 600


def test_the_quick_benchmark_suite_measures_every_group_and_prints_its_table(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    done = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--runs", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=SUITE_TIMEOUT_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for group in GROUPS:
        assert f"[{group}] done in" in done.stderr
    table = done.stdout
    assert table.startswith("figure")
    for figure in (
        "launch latency",
        "event ingestion",
        "deadline precision",
        "pause reaction",
        "supervisor overhead",
        "queue turnaround",
        "`backprop status`",
        "`backprop list`",
        "MCP server: spawn",
    ):
        assert figure in table
    rows = [line for line in table.splitlines() if line.strip()]
    assert not [row for row in rows if "could not measure" in row], table
    assert "seed figure" in table
    assert "<!-- benchmarks:begin" in out.read_text(encoding="utf-8")
