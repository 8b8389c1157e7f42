"""Metric histories for a terminal: unicode sparklines, the `metrics` table, the `compare` ranking
and the curve line of `status RUN_ID` (rendering only; the answers come from the service)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from backprop_mcp.cli.render import clean, number

if TYPE_CHECKING:
    from backprop_mcp.core.answers import Comparison, MetricsAnswer, Series

# Eight heights, lowest first: one character per point of the curve.
_BARS = "▁▂▃▄▅▆▇█"
# Marks where an attempt (a resume) begins on a curve.
_JOIN = "|"
# Significant digits of the values shown: those the service's answer keeps (`runs.metrics`), so a
# value is never rounded twice (0.187449 -> 0.18745 -> 0.1875).
DIGITS = 5
# Points of the curve in `status RUN_ID`: one line of a terminal, beside its label and figures.
STATUS_CURVE_POINTS = 40


def sparkline(steps: Sequence[float], values: Sequence[float], joins: Sequence[float] = ()) -> str:
    """One character per value, scaled between the curve's lowest and highest; `|` before the
    first point of each attempt that joins the curve."""
    if not values:
        return ""
    # Halved: the span of two finite floats (-1e308 to 1e308) can pass the largest float.
    low, high = min(values) / 2, max(values) / 2
    span = high - low
    pending = sorted(joins)
    out: list[str] = []
    for step, value in zip(steps, values, strict=True):
        while pending and step >= pending[0]:
            pending.pop(0)
            if out:
                out.append(_JOIN)
        level = 3 if span == 0 else round((value / 2 - low) / span * (len(_BARS) - 1))
        out.append(_BARS[level])
    return "".join(out)


def _best(series: Series) -> str:
    return f"{number(series['best'], DIGITS)} @ {number(series['best_step'], 9)}"


def metrics_text(answer: MetricsAnswer) -> str:
    lines: list[str] = []
    for run in answer["runs"]:
        lines.append(clean(run["run_id"]) + (f"  ({clean(run['note'])})" if "note" in run else ""))
        rows = [("METRIC", "LAST", "BEST @ STEP", "REPORTED", "CURVE")]
        for name, series in run["metrics"].items():
            rows.append(
                (
                    clean(name),
                    number(series["last"], DIGITS),
                    _best(series),
                    str(series["reported"]),
                    sparkline(series["steps"], series["values"], run["joins"]),
                )
            )
        if len(rows) > 1:
            widths = [max(len(row[i]) for row in rows) for i in range(4)]
            lines += [
                "  " + "".join(c.ljust(w + 2) for c, w in zip(row, widths, strict=False)) + row[4]
                for row in rows
            ]
        if run["joins"]:
            lines.append(
                f"  {_JOIN} a resumed attempt joins at step " + ", ".join(number(j, 9) for j in run["joins"])
            )
        if run["missing"]:
            available = ", ".join(run.get("available", [])) or "none"
            lines.append(clean(f"  not reported: {', '.join(run['missing'])} (it reported: {available})"))
        if not run["metrics"] and not run["missing"]:
            lines.append("  no metrics reported yet")
    return "\n".join(lines)


def comparison_text(comparison: Comparison) -> str:
    metric, by = comparison["metric"], comparison["ranked_by"]
    better = "lower" if comparison["lower_is_better"] else "higher"
    head = f"the last reported {metric}" if by == "last" else f"the best {metric} seen"
    lines = [clean(f"ranked by {head} ({better} is better)")]
    for row in comparison["runs"]:
        mark = "*" if row["run_id"] == comparison["top_run_id"] else " "
        figure = f"{by} {metric} {number(row['value'])}"
        if by == "best":
            figure += f" (last {number(row['last_value'])})"
        early = "  ended early" if row["ended_early"] else ""
        lines.append(clean(f"{mark} {row['run_id']:<40} {row['status']:<10} {figure}{early}"))
    return "\n".join(lines)


def curve_line(answer: MetricsAnswer) -> str | None:
    """`status RUN_ID`'s curve: the first metric shown (the loss when reported), when it has at
    least two points."""
    for run in answer["runs"]:
        for name, series in run["metrics"].items():
            if len(series["values"]) < 2:
                return None
            curve = sparkline(series["steps"], series["values"], run["joins"])
            return clean(f"curve      {name} {curve}  best {_best(series)}")
    return None
