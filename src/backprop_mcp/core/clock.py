"""The one timestamp format of records, events and answers: ISO 8601 UTC with milliseconds, and
reading it back. Stdlib only (`calendar` loaded on first parse)."""

from __future__ import annotations

import time


def now_iso(at: float | None = None) -> str:
    """ISO 8601 UTC with milliseconds."""
    at = time.time() if at is None else at
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"


def parse_iso(value: str | None) -> float | None:
    """Unix time of a `now_iso` string; None for None or anything else."""
    if not value:
        return None
    import calendar

    try:
        base = calendar.timegm(time.strptime(value[:19], "%Y-%m-%dT%H:%M:%S"))
        return base + (float("0" + value[19:-1]) if value[19:20] == "." else 0.0)
    except ValueError:
        return None


def age_seconds(iso: str | None) -> float:
    """Seconds since a `now_iso` time; infinite for one that cannot be read."""
    at = parse_iso(iso)
    return time.time() - at if at is not None else float("inf")
