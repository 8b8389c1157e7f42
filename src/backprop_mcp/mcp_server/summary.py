"""The one run summary of the MCP answers (start, resume, stop, status, wait, list and compare rows),
the `next_step` advice that is right for a run's state, and the compaction every answer goes
through: no nulls, no empty lists or objects below the top level, numbers rounded where they are a
summary. Agents pay for every byte; the full record stays one `detail=true` away."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from backprop_mcp.core.clock import parse_iso
from backprop_mcp.core.records import ACTIVE_STATES

# Significant digits of a summary's numbers: loss 0.052631578947 becomes 0.052632, enough to rank
# trials of a sweep; get_metrics and detail=true give what the script printed.
DIGITS = 5
# A summary shows this many metrics (the one a listing sorts by always among them); get_metrics and
# detail=true show them all.
SUMMARY_METRICS = 4
# A reason (a queue or pause explanation) is cut to this many characters in a summary.
REASON_CHARS = 160
# The script's arguments in a summary are cut to this many characters in all (each one kept whole
# up to there, then "..."): enough for hyperparameters, bounded for a script given 256 of them.
ARGS_CHARS = 200
# How a run ends when its script never started: its record's status_detail says why (its logs are
# empty), so a summary's reason carries that detail.
NEVER_STARTED = ("start_failed", "queue_error")


def rounded(value: Any) -> Any:
    """A float to DIGITS significant digits (ints, bools and the rest unchanged)."""
    if isinstance(value, float):
        return float(f"{value:.{DIGITS}g}")
    return value


def compact(value: Any, *, top: bool = True) -> Any:
    """An answer without nulls, and without empty lists and objects below its top level (an empty
    `runs` list at the top of a page is an answer; an empty `metrics` inside a row is noise)."""
    if isinstance(value, Mapping):
        out = {}
        for key, raw in value.items():
            item = compact(raw, top=False)
            if item is None or (not top and isinstance(item, dict | list) and not item):
                continue
            out[key] = item
        return out
    if isinstance(value, list | tuple):
        return [compact(item, top=False) for item in value]
    return value


def to_text(answer: Any) -> str:
    """The compact JSON text of an answer: what the agent reads and pays for."""
    return json.dumps(answer, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def size(answer: Any) -> int:
    """Bytes of an answer's text."""
    return len(to_text(answer).encode("utf-8"))


def seconds_left(record: Mapping[str, Any], now: float | None = None) -> float | None:
    """Seconds left in a live attempt's time box, from its deadline."""
    at = parse_iso(record.get("deadline"))
    if record.get("status") not in ACTIVE_STATES or at is None:
        return None
    return round(max(0.0, at - (time.time() if now is None else now)), 1)


def elapsed(record: Mapping[str, Any], now: float | None = None) -> float | None:
    """Running seconds of the current attempt (paused time left out)."""
    start = parse_iso(record.get("started_at"))
    if start is None:
        return None
    end = parse_iso(record.get("ended_at")) or (time.time() if now is None else now)
    return round(max(0.0, end - start - float(record.get("paused_seconds") or 0.0)), 1)


def reason(record: Mapping[str, Any]) -> str | None:
    """Why the run is in its state, short: the queue or pause cause, or how it ended."""
    status = record.get("status")
    if status in ("queued", "paused", "rejected", "unknown", "lost"):
        detail = record.get("status_detail") or record.get("note")
        if detail:
            return _cut(str(detail))
    why = record.get("termination_reason")
    if why is None or status in ACTIVE_STATES:
        return None
    if why in NEVER_STARTED and record.get("status_detail"):
        return _cut(f"{why}: {record['status_detail']}")
    if record.get("signal"):
        return f"{why} ({record['signal']})"
    code = record.get("exit_code")
    return f"{why} (exit {code})" if code not in (None, 0) else str(why)


def _cut(text: str) -> str:
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


def short_args(args: Sequence[str]) -> list[str]:
    """The script's arguments, cut to about ARGS_CHARS characters in all."""
    kept: list[str] = []
    used = 0
    for arg in args:
        used += len(arg) + 1
        if used > ARGS_CHARS:
            kept.append(f"...(+{len(args) - len(kept)} more)")
            break
        kept.append(arg)
    return kept


def key_metrics(metrics: Mapping[str, Any], keep: str | None = None) -> dict[str, Any]:
    """A few metrics, rounded: the first SUMMARY_METRICS reported, and `keep` (the one the answer
    sorts or compares by) whenever the run has it."""
    names = list(metrics)[:SUMMARY_METRICS]
    if keep is not None and keep in metrics and keep not in names:
        names[-1:] = [keep]
    return {name: rounded(metrics[name]) for name in names}


def summary(record: Mapping[str, Any], *, advice: bool = True, keep: str | None = None) -> dict[str, Any]:
    """The summary of a run from its record or its index row (fields a row lacks are left out);
    `advice=False` for rows of a multi-run answer, which has one `next_step` of its own."""
    status = record.get("status")
    checkpoints = record.get("checkpoints")
    live = status in ACTIVE_STATES
    row: dict[str, Any] = {
        "run_id": record.get("run_id"),
        "name": record.get("name"),
        "status": status,
        "reason": reason(record),
        "attempt": record.get("attempt"),
        "step": record.get("step"),
        "total": record.get("total"),
        "loss": rounded(record.get("loss")),
        "metrics": key_metrics(record.get("metrics") or {}, keep),
        "elapsed_s": elapsed(record),
        "left_s": seconds_left(record) if live else None,
        "eta_s": rounded(record.get("eta_seconds")) if live else None,
        "args": short_args(record.get("args") or []),
        "checkpoint": record.get("latest_checkpoint"),
        "checkpoints": len(checkpoints) if isinstance(checkpoints, list) and checkpoints else None,
        "queue_position": record.get("queue_position") if status == "queued" else None,
        "sweep": sweep_of(record),
        "code": code_of(record),
        "tags": record.get("tags"),
    }
    if advice:
        row["next_step"] = next_step(record, row)
        if (row.get("code") or {}).get("changed"):
            row["next_step"] = (
                "Its script changed since the last attempt: it runs the new code. " + row["next_step"]
            )
    compacted: dict[str, Any] = compact(row, top=False)
    return compacted


# The script's hash and the commit in a summary are cut to this many hex digits: enough to tell
# two versions apart at a glance; `backprop show` (and detail=true) has them whole.
SHA_CHARS = 8
COMMIT_CHARS = 7


def code_of(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The current attempt's code in short: {"sha", "commit", "dirty", "changed"} (an index row has
    no attempts, so none)."""
    attempts = record.get("attempts")
    last = attempts[-1] if isinstance(attempts, list) and attempts else {}
    code = last.get("code") if isinstance(last, Mapping) else None
    if not isinstance(code, Mapping) and "code_changed" not in last:
        return None
    short: dict[str, Any] = {}
    if isinstance(code, Mapping):
        short["sha"] = str(code.get("sha") or "")[:SHA_CHARS]
        short["commit"] = str(code["commit"])[:COMMIT_CHARS] if code.get("commit") else None
        short["dirty"] = code.get("dirty")
    if last.get("code_changed"):
        short["changed"] = True  # the script differs from the previous attempt's
    return short


def sweep_of(record: Mapping[str, Any]) -> str | None:
    """The id of the sweep a run is a trial of: a record names it in `sweep.id`, an index row in `sweep`."""
    sweep = record.get("sweep")
    return sweep.get("id") if isinstance(sweep, Mapping) else sweep if isinstance(sweep, str) else None


def next_step(record: Mapping[str, Any], row: Mapping[str, Any] | None = None) -> str:
    """One line of advice that is right for the run's state."""
    row = row if row is not None else summary(record, advice=False)
    # "run_id": the answer names the run already; the model passes it back.
    status, run = row.get("status"), "run_id"
    step, total = row.get("step"), row.get("total")
    at = f" at step {step}" + (f"/{total}" if total else "") if step is not None else ""
    if status == "queued":
        where = f" at position {row['queue_position']}" if row.get("queue_position") else ""
        return f"Queued{where}. wait_for_run({run}) returns when it starts."
    if status == "running":
        eta, left = row.get("eta_s"), row.get("left_s")
        if eta is not None and left is not None and eta > left:
            return (
                f"Warning: its ETA ({eta:.0f}s) is longer than the {left:.0f}s left in its time box, so "
                f"it will time out first; then resume_run({run}) continues from its checkpoint "
                "(max_run_minutes sets a longer box)."
            )
        return f'wait_for_run({run}, until="end") waits for its end; stop_run({run}) stops it early.'
    if status == "paused":
        return f"Paused by the governor (reason says why); paused time is not charged. wait_for_run({run})."
    if status == "completed":
        if isinstance(step, int) and isinstance(total, int) and step < total:
            return f"It exited 0{at}, before its total. get_logs({run}) shows why."
        return (
            "It completed its steps. Rank it with compare_runs or list_experiments(sort=...), see "
            "its curves with get_metrics; to train it longer, give it new args (more steps)."
        )
    if status in ("timed_out", "stopped", "lost"):
        cause = {
            "timed_out": f"Its time box ended{at}.",
            "stopped": f"Stopped on request{at}.",
            "lost": "Its supervisor died (a reboot or a kill).",
        }[status]
        if str(row.get("reason", "")).startswith("pruned"):
            cause = f"Pruned by its sweep{at}: its metric lagged the other trials'."
        if "checkpoints" in record and not row.get("checkpoints"):
            return f"{cause} It saved no checkpoint: resume_run({run}, from_scratch=true) starts it over."
        return (
            f"{cause} resume_run({run}) continues from its latest checkpoint (max_run_minutes: a longer box)."
        )
    if status == "failed" and record.get("termination_reason") in NEVER_STARTED:
        return (
            "Its script never started (reason says why; its log is empty). Fix that, then "
            f"resume_run({run}) or run_training again."
        )
    if status == "failed":
        return (
            f"The script failed (reason). get_logs({run}) shows why; fix it, then resume_run or run_training."
        )
    if status == "rejected" and record.get("termination_reason") == "queue_timeout":
        return (
            "It waited its whole queue timeout without being admitted (reason says why). get_status() "
            "shows the machine; run_training again when runs ahead have ended, or with a longer "
            'options={"queue_timeout_minutes": ...}.'
        )
    if status == "rejected":
        return (
            "The governor refused it and it was not queued (reason lists each failed rule). get_status() "
            'shows the machine; retry with options={"queue": true}.'
        )
    return f"get_status({run}) shows it."


def summaries(records: Iterable[Mapping[str, Any]], keep: str | None = None) -> list[dict[str, Any]]:
    """Rows of a multi-run answer: summaries without their own next_step."""
    return [summary(record, advice=False, keep=keep) for record in records]


def counts(rows: Iterable[Mapping[str, Any]]) -> str:
    """ "4 completed, 2 timed_out": how many runs are in each state."""
    tally = Counter(str(row.get("status")) for row in rows)
    return ", ".join(f"{n} {state}" for state, n in tally.most_common())


def fit(rows: Sequence[Any], budget: int, answer: Mapping[str, Any], key: str = "runs") -> int:
    """How many of `rows` fit in an answer (with its other fields) of at most `budget` bytes."""
    used = size({**answer, key: []})
    for kept, row in enumerate(rows):
        used += size(row) + 1  # the comma
        if used > budget:
            return kept
    return len(rows)
