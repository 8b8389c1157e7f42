"""The use-cases that read what runs left behind, beside `control.RunControl`'s reading of the runs
themselves: log tails, comparisons, metric histories, curves, which code each attempt ran (show,
diff), and the import of the seed's store. `Service` (in `service`) adds starting and resuming."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from backprop_mcp.core.answers import Comparison, ImportReport, LogTail, MetricsAnswer, Plot, RunDiff, RunShow
from backprop_mcp.core.errors import UsageError
from backprop_mcp.core.files import tail_lines
from backprop_mcp.runs.control import RunControl
from backprop_mcp.runs.runlog import empty_note, rotated_path

MAX_LOG_TAIL = 10_000
# Log lines returned are cut to this many characters: a tail must stay bounded in size.
MAX_LOG_LINE_CHARS = 2000


class RunViews(RunControl):
    """Reading runs' logs, metrics, curves and code; holds nothing beyond `RunControl`."""

    def logs(self, run_id: str, *, tail: int = 100, attempt: int | None = None) -> LogTail:
        """The last lines of a run's log (bounded)."""
        record = self.get(run_id)
        if isinstance(tail, bool) or not isinstance(tail, int) or not 1 <= tail <= MAX_LOG_TAIL:
            raise UsageError(f"tail must be a whole number from 1 to {MAX_LOG_TAIL}, got {tail!r}")
        which = record["attempt"] if attempt is None else attempt
        if not 1 <= which <= record["attempt"]:
            raise UsageError(f"run {run_id} has attempts 1 to {record['attempt']}; got attempt {which}")
        path = self.backend.log_path(self.store, run_id, which)
        raw = tail_lines(path, tail + 1, before=rotated_path(path))  # a rotation cuts no tail short
        lines = [line.decode("utf-8", "replace")[:MAX_LOG_LINE_CHARS] for line in raw]
        truncated = len(lines) > tail
        answer = LogTail(
            run_id=run_id, attempt=which, lines=lines[-tail:], truncated=truncated, path=str(path)
        )
        if not lines:
            answer["note"] = empty_note(record, which, path)
        return answer

    def compare(
        self, run_ids: Sequence[str], *, metric: str = "loss", by: Literal["last", "best"] = "last"
    ) -> Comparison:
        """Runs side by side on one metric, ranked by each run's last or best value."""
        from backprop_mcp.runs.compare import compare_runs

        return compare_runs(self.get, self.store, run_ids, metric, by)

    def metrics(
        self, run_ids: Sequence[str], *, metrics: Sequence[str] | None = None, points: int = 50
    ) -> MetricsAnswer:
        """The runs' metric histories, each curve downsampled to at most `points` points."""
        from backprop_mcp.runs.metrics import run_metrics

        return run_metrics(self.get, self.store, run_ids, metrics=metrics, points=points)

    def show(self, run_id: str) -> RunShow:
        """A run's record and what each of its attempts ran."""
        from backprop_mcp.runs import reproduce

        return reproduce.show(self.get, self.store, run_id)

    def diff(self, ref_a: str, ref_b: str) -> RunDiff:
        """What differs between two attempts (RUN or RUN:N): code, arguments, options."""
        from backprop_mcp.runs import reproduce

        return reproduce.diff(self.get, self.store, ref_a, ref_b)

    def import_legacy(self, path: Path | None = None) -> ImportReport:
        """Import the seed's ~/.backprop/experiments.json."""
        from backprop_mcp.runs.legacy import import_experiments

        source = path or Path(self.env.get("HOME", str(Path.home()))) / ".backprop" / "experiments.json"
        return import_experiments(self.store, source)

    def plot(
        self,
        run_ids: Sequence[str],
        *,
        metrics: Sequence[str] | None = None,
        labels: Mapping[str, str] | None = None,
        title: str | None = None,
        lead: str | None = None,
    ) -> Plot:
        """The runs' metric curves drawn as one PNG (`runs.plots`; needs the `plot` extra)."""
        from backprop_mcp.runs.plots import plot_runs

        return plot_runs(
            self.get, self.store, run_ids, metrics=metrics, labels=labels, title=title, lead=lead
        )
