"""The order of `list`: the sort keys it accepts (`parse_sort`), a row's value under one, the
order of the rows a page is cut from (`ordered`), and completing the rows an earlier version
indexed (`complete_row`). Functions over index rows; `RunControl` reads the rows."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from backprop_mcp.core.errors import BackpropError, UsageError
from backprop_mcp.core.records import RunRecord, row_args, row_metrics

# Keys that name a row's own field rather than a metric.
FIELD_KEYS = ("created", "name", "step")
# A metric name a script may report is at most this long (`events.MAX_METRIC_NAME_CHARS`).
MAX_SORT_KEY_CHARS = 200

_ALLOWED = (
    f"sort by a metric name (1 to {MAX_SORT_KEY_CHARS} characters, no control characters, no "
    "spaces around it) or by created, name or step; prefix '-' for descending, e.g. 'loss' "
    "(lowest first) or '-val_acc' (highest first)"
)


class Order(NamedTuple):
    """A parsed sort key: what to sort by, and which way."""

    key: str
    descending: bool


def parse_sort(sort: object) -> Order | None:
    """The order `sort` asks for; None for the default (newest first). A key no run reported is
    not an error (every run then lacks it); a malformed one is a UsageError saying what is allowed."""
    if sort is None:
        return None
    if not isinstance(sort, str):
        raise UsageError(f"sort must be a string, got {_shown(sort)}; {_ALLOWED}")
    descending = sort.startswith("-")
    key = sort[1:] if descending else sort
    if not key or key != key.strip() or len(key) > MAX_SORT_KEY_CHARS or _has_control(key):
        raise UsageError(f"invalid sort {_shown(sort)}; {_ALLOWED}")
    return Order(key, descending)


def value_of(row: Mapping[str, Any], key: str) -> Any:
    """The row's value under `key`, None when the run has none: `created`, `name` and `step` are
    the row's fields; `loss` is the last loss (else a metric named loss); anything else a metric."""
    if key == "created":
        return row.get("created_at")
    if key in ("name", "step"):
        return row.get(key)
    if key == "loss" and row.get("loss") is not None:
        return row["loss"]
    metrics = row.get("metrics")
    return metrics.get(key) if isinstance(metrics, dict) else None


def needs_metrics(order: Order) -> bool:
    """True when the order reads a row's metrics (rows of an older index must be filled first)."""
    return order.key not in FIELD_KEYS


def ordered(rows: Sequence[dict[str, Any]], order: Order) -> list[dict[str, Any]]:
    """`rows` in `order`: runs without a value for the key last, whichever the direction; ties
    newest first (by creation time, then run id), so paging through a sorted list is stable."""
    newest_first = sorted(rows, key=lambda r: (r["created_at"], r["run_id"]), reverse=True)
    present = [r for r in newest_first if value_of(r, order.key) is not None]
    missing = [r for r in newest_first if value_of(r, order.key) is None]
    # sorted() is stable also with reverse=True: equal values keep the newest-first order.
    present.sort(key=lambda r: value_of(r, order.key), reverse=order.descending)
    return present + missing


def is_old_row(row: Mapping[str, Any]) -> bool:
    """True for a row indexed by a version that did not keep a run's `args` and `metrics`."""
    return "args" not in row or "metrics" not in row


def complete_row(row: dict[str, Any], read: Callable[[str], RunRecord]) -> dict[str, Any]:
    """The row with `args` and `metrics`: an old row takes them from the run's record, `read`
    (empty when it cannot be read)."""
    if not is_old_row(row):
        return row
    try:
        record = read(row["run_id"])
    except BackpropError:
        return {"args": [], "metrics": {}, **row}
    return {**row, "args": row_args(record["args"]), "metrics": row_metrics(record["metrics"])}


def _has_control(text: str) -> bool:
    return any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text)  # as `events` refuses in names


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
