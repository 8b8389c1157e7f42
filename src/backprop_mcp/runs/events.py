"""The supervisor's half of the script contract: splitting a script's stdout into lines, parsing events.

Stdlib only: the supervisor imports this at start-up, before the training script runs, and must
start fast. Nothing here raises on script output, whatever its bytes (DESIGN §4: a malformed, huge,
binary or hostile line is logged and skipped, never fatal).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from backprop_mcp.core.contract import EVENT_CHECKPOINT, EVENT_DONE, EVENT_METRIC, EVENT_PROGRESS, EVENTS

# A real event line is well under 1 KiB, even with dozens of metrics. 64 KiB leaves room for
# generous metric dicts while bounding what one line can cost the supervisor in memory and in
# `json.loads` time; longer lines are still logged as output, just never parsed.
MAX_EVENT_BYTES = 64 * 1024

# Checkpoint paths longer than Linux's PATH_MAX cannot be opened anyway.
MAX_CHECKPOINT_PATH_BYTES = 4096

# Metric names become keys of the stored record and columns in listings; a long name is a bug
# in the script (or an attempt to bloat the store), not a metric.
MAX_METRIC_NAME_CHARS = 200

# Steps and totals must fit a signed 64-bit integer (what any consumer can store); digits beyond
# this are rejected before `int()` ever sees them, so a 60 000-digit number costs nothing.
MAX_STEP = 2**63 - 1
_MAX_INT_DIGITS = 40

# How much of an offending value an error message quotes.
_QUOTE_CHARS = 60

_WHITESPACE = b" \t\r\n\f\v"


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """The script reached a step: `{"event": "progress", "step": 120, "total": 1000, "loss": 0.41}`."""

    step: int | None
    total: int | None
    loss: float | None
    metrics: dict[str, float] = field(hash=False)


@dataclass(frozen=True, slots=True)
class MetricEvent:
    """One named value: `{"event": "metric", "name": "val_loss", "value": 0.52, "step": 120}`."""

    name: str
    value: float
    step: int | None


@dataclass(frozen=True, slots=True)
class CheckpointEvent:
    """The script saved a checkpoint; `path` is as printed (resolve it with `resolve_checkpoint`)."""

    path: str
    step: int | None


@dataclass(frozen=True, slots=True)
class DoneEvent:
    """The script finished its work: `{"event": "done", "metrics": {"val_acc": 0.91}}`."""

    metrics: dict[str, float] = field(hash=False)


Event = ProgressEvent | MetricEvent | CheckpointEvent | DoneEvent


@dataclass(frozen=True, slots=True)
class ParseResult:
    """What one stdout line meant.

    `events` is empty for ordinary log output and for rejected lines; `error` (what was wrong and
    what is allowed) is set only for a line that looked like an event (it starts with `{`) but was
    not one. `warning` is set when a valid event had parts dropped (non-numeric metric values).
    """

    events: tuple[Event, ...]
    error: str | None
    warning: str | None = None


@dataclass(frozen=True, slots=True)
class Oversized:
    """A line longer than the splitter's limit: its full `length` in bytes and its first bytes."""

    length: int
    head: bytes = b""


_LOG_LINE = ParseResult((), None)


class _Reject(Exception):
    """A line is not a valid event; the message is the user-facing reason."""


# A plain progress line: one flat object of "event": "progress", "step", "total" and "loss" in any
# order and spacing, each value one that `parse_line` accepts (no null, no metrics, exponents of at
# most two digits so the loss is finite). Such a line is always a valid ProgressEvent, so the
# supervisor may fold a run of them into their last values without parsing each one.
_PLAIN_PAIR = (
    rb'(?:"event"[ \t]*:[ \t]*"progress"'
    rb'|"step"[ \t]*:[ \t]*(?:0|[1-9][0-9]{0,17})'
    rb'|"total"[ \t]*:[ \t]*[1-9][0-9]{0,17}'
    rb'|"loss"[ \t]*:[ \t]*-?(?:0|[1-9][0-9]{0,17})(?:\.[0-9]{1,20})?(?:[eE][-+]?[0-9]{1,2})?)'
)
_PLAIN_PROGRESS = re.compile(
    rb"[ \t]*\{[ \t]*" + _PLAIN_PAIR + rb"(?:[ \t]*,[ \t]*" + _PLAIN_PAIR + rb")*[ \t]*\}[ \t]*"
)


# The same lines, matched many at a time: a run of consecutive plain progress lines joined by "\n".
# A line's pairs are its totals first, then one event, step or loss pair, then any pairs: so it
# needs a step, a loss or an event, as `is_plain_progress` asks, without a second look at it.
_TOTAL = rb'"total"[ \t]*:[ \t]*[1-9][0-9]{0,17}'
_KEYED = (
    rb'"(?:event"[ \t]*:[ \t]*"progress"'
    rb'|step"[ \t]*:[ \t]*(?:0|[1-9][0-9]{0,17})'
    rb'|loss"[ \t]*:[ \t]*-?(?:0|[1-9][0-9]{0,17})(?:\.[0-9]{1,20})?(?:[eE][-+]?[0-9]{1,2})?)'
)
_COMMA = rb"[ \t]*,[ \t]*"
_PLAIN_LINE = (
    rb"[ \t]*\{[ \t]*(?:" + _TOTAL + _COMMA + rb")*+" + _KEYED
    + rb"(?:" + _COMMA + _PLAIN_PAIR + rb")*+[ \t]*\}[ \t]*+(?=\n|\Z)"
)  # fmt: skip
_PLAIN_RUN = re.compile(_PLAIN_LINE + rb"(?:\n" + _PLAIN_LINE + rb")*+")


def is_plain_progress(line: bytes) -> bool:
    """True when `line` is a plain progress line (see `_PLAIN_PROGRESS`), decided in C."""
    return (
        _PLAIN_PROGRESS.fullmatch(line) is not None
        # The short form needs a step or a loss (a bare {"total": 5} is rejected by parse_line).
        and (b'"event"' in line or b'"step"' in line or b'"loss"' in line)
    )


def plain_runs(items: list[bytes | Oversized]) -> Iterator[tuple[list[bytes], bytes] | bytes | Oversized]:
    """`items` in order, each run of consecutive plain progress lines (as `is_plain_progress`
    decides) as one (lines, lines joined by "\\n") pair: one regular expression finds a whole run
    in C, so a flood of progress lines costs no Python work per line."""
    lines = [item for item in items if isinstance(item, bytes)]
    if len(lines) < len(items):  # a line too long to be an event: this batch goes line by line
        yield from items
        return
    joined, position, index = b"\n".join(lines), 0, 0
    while index < len(lines):
        run = _PLAIN_RUN.match(joined, position)
        if run is None:
            yield lines[index]
            position, index = position + len(lines[index]) + 1, index + 1
            continue
        count = joined.count(b"\n", position, run.end()) + 1  # a plain line holds no newline
        yield lines[index : index + count], joined[position : run.end()]
        position, index = run.end() + 1, index + count


def parse_line(line: bytes | Oversized) -> ParseResult:
    """Parse one line of a script's stdout (without its newline); never raises.

    A line that does not start with `{` (after whitespace) is ordinary output. Otherwise it must
    be one JSON object of a known event form, at most `MAX_EVENT_BYTES` long, valid UTF-8, with
    finite numbers only. Unknown keys are ignored. Non-numeric entries of a `metrics` object are
    dropped (with a `warning`) rather than rejecting the whole line, so one stray string does not
    lose the step and loss beside it.
    """
    if isinstance(line, Oversized) or len(line) > MAX_EVENT_BYTES:
        # Look only at the head: stripping a 50 MB log line would copy all of it.
        head, length = (line.head, line.length) if isinstance(line, Oversized) else (line, len(line))
        if not head[:MAX_EVENT_BYTES].lstrip(_WHITESPACE).startswith(b"{"):
            return _LOG_LINE
        return ParseResult((), _too_long(length))
    stripped = line.strip(_WHITESPACE)
    if not stripped.startswith(b"{"):
        return _LOG_LINE
    try:
        text = stripped.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ParseResult((), f"event line is not valid UTF-8 (bad byte at offset {exc.start})")
    try:
        obj = json.loads(
            text, parse_constant=_reject_constant, parse_int=_parse_int, parse_float=_parse_float
        )
    except _Reject as exc:
        return ParseResult((), str(exc))
    except RecursionError:
        return ParseResult((), "event line is nested too deeply to be an event")
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        return ParseResult((), f"event line is not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return ParseResult((), "event line must be a JSON object")
    try:
        return _interpret(obj)
    except _Reject as exc:
        return ParseResult((), str(exc))
    except RecursionError:
        # An object nested just under the parser's limit can still overflow when quoted in a message.
        return ParseResult((), "event line is nested too deeply to be an event")


def resolve_checkpoint(path: str, cwd: str) -> str:
    """The absolute, normalised path of a reported checkpoint; relative paths are against `cwd`.

    Purely lexical: symlinks are not followed (the script may replace them later) and `..` is
    normalised away. `cwd` must be absolute (the run's working directory, not the caller's).
    """
    if not os.path.isabs(cwd):
        raise ValueError(f"cwd must be an absolute path, got {cwd!r}")
    return os.path.normpath(os.path.join(cwd, path))


class LineSplitter:
    """Splits bytes read from a pipe in arbitrary chunks into lines, in bounded memory.

    Lines come back without their `\\n` and without one trailing `\\r`. A line longer than
    `max_line_bytes` is not accumulated: its first bytes are kept, the rest only counted, and
    one `Oversized` marker is returned when it ends (or at `flush`).
    """

    def __init__(self, max_line_bytes: int = MAX_EVENT_BYTES) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be at least 1")
        self._max = max_line_bytes
        # One spare byte so that a line of exactly `max` bytes followed by `\r\n` still fits.
        self._cap = max_line_bytes + 1
        self._buf = bytearray()
        self._length = 0
        self._ends_with_cr = False

    def feed(self, data: bytes) -> list[bytes | Oversized]:
        """The lines completed by `data`, in order."""
        out: list[bytes | Oversized] = []
        view = memoryview(data)
        first = data.find(b"\n")
        if first == -1:
            self._append(view)
            return out
        self._append(view[:first])
        out.append(self._take())
        last = data.rfind(b"\n")
        if last > first:
            # Whole lines inside one chunk are split in C; only long or CR-ended ones take the buffer.
            for line in data[first + 1 : last].split(b"\n"):
                if len(line) > self._max or line.endswith(b"\r"):
                    self._append(memoryview(line))
                    out.append(self._take())
                else:
                    out.append(line)
        self._append(view[last + 1 :])
        return out

    def flush(self) -> list[bytes | Oversized]:
        """The trailing partial line at end of stream, if any; the splitter is then empty."""
        if self._length == 0:
            return []
        return [self._take()]

    def _append(self, piece: memoryview) -> None:
        n = len(piece)
        if n == 0:
            return
        self._length += n
        self._ends_with_cr = piece[-1] == 0x0D
        room = self._cap - len(self._buf)
        if room > 0:
            self._buf += piece[:room]

    def _take(self) -> bytes | Oversized:
        length = self._length - 1 if self._ends_with_cr else self._length
        if length > self._max:
            item: bytes | Oversized = Oversized(length=length, head=bytes(self._buf[: self._max]))
        else:
            item = bytes(self._buf[:length])
        self._buf = bytearray()
        self._length = 0
        self._ends_with_cr = False
        return item


def _too_long(length: int) -> str:
    return f"event line is {length} bytes; event lines may be at most {MAX_EVENT_BYTES} bytes"


def _reject_constant(name: str) -> Any:
    raise _Reject(f"{name} is not allowed in an event: numbers must be finite")


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > _MAX_INT_DIGITS:
        raise _Reject(f"an integer of {len(digits)} digits is too large for an event")
    return int(digits)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Reject(f"{text[:_QUOTE_CHARS]} is not allowed in an event: numbers must be finite")
    return value


def _quote(value: object) -> str:
    # Values came from JSON, so show them as JSON (`true`, not Python's `True`).
    text = json.dumps(value)
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 3] + "..."


def _interpret(obj: dict[str, Any]) -> ParseResult:
    if "event" not in obj:
        # The seed's form: a bare progress line. Requiring step or loss keeps other JSON the
        # script happens to print (a config dump, say) from being taken for progress.
        if "step" not in obj and "loss" not in obj:
            raise _Reject(
                'a JSON line needs an "event" key (one of ' + ", ".join(EVENTS) + ") or, in the short "
                'form, a "step" or "loss" key'
            )
        return _progress(obj)
    name = obj["event"]
    if name == EVENT_PROGRESS:
        return _progress(obj)
    if name == EVENT_METRIC:
        metric = MetricEvent(
            name=_metric_name(obj.get("name")),
            value=_required_number(obj, "value"),
            step=_step(obj, "step"),
        )
        return ParseResult((metric,), None)
    if name == EVENT_CHECKPOINT:
        checkpoint = CheckpointEvent(path=_checkpoint_path(obj.get("path")), step=_step(obj, "step"))
        # The seed's scripts put their loss on the checkpoint line; it counts as progress too.
        if any(obj.get(key) is not None for key in ("loss", "total", "metrics")):
            result = _progress(obj)
            return ParseResult((*result.events, checkpoint), None, result.warning)
        return ParseResult((checkpoint,), None)
    if name == EVENT_DONE:
        metrics, warning = _metrics(obj.get("metrics"))
        return ParseResult((DoneEvent(metrics=metrics),), None, warning)
    raise _Reject(f'unknown event {_quote(name)}; "event" must be one of: ' + ", ".join(EVENTS))


def _progress(obj: dict[str, Any]) -> ParseResult:
    metrics, warning = _metrics(obj.get("metrics"))
    total = _step(obj, "total")
    if total == 0:
        raise _Reject('"total" must be a positive integer, got 0')
    event = ProgressEvent(step=_step(obj, "step"), total=total, loss=_number(obj, "loss"), metrics=metrics)
    return ParseResult((event,), None, warning)


def _is_number(value: object) -> bool:
    # bool is an int subclass in Python, but `true` is not a number in an event.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(obj: dict[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if not _is_number(value):
        raise _Reject(f'"{key}" must be a finite number or null, got {_quote(value)}')
    return float(value)


def _required_number(obj: dict[str, Any], key: str) -> float:
    value = obj.get(key)
    if value is None or not _is_number(value):
        raise _Reject(f'"{key}" is required and must be a finite number, got {_quote(value)}')
    return float(value)


def _step(obj: dict[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    # Integral floats (120.0) are accepted: scripts often compute steps by float arithmetic.
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_STEP:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_STEP:
        raise _Reject(f'"{key}" must be a non-negative integer below 2**63 or null, got {_quote(value)}')
    return value


def _valid_name(name: str) -> bool:
    if not 0 < len(name) <= MAX_METRIC_NAME_CHARS:
        return False
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # JSON allows lone surrogates (\ud800); the store's UTF-8 files do not
        return False
    return True


def _metric_name(name: object) -> str:
    if not isinstance(name, str) or not _valid_name(name):
        raise _Reject(
            f'"name" must be a string of 1 to {MAX_METRIC_NAME_CHARS} characters without control '
            f"characters, got {_quote(name)}"
        )
    return name


def _metrics(value: object) -> tuple[dict[str, float], str | None]:
    if value is None:
        return {}, None
    if not isinstance(value, dict):
        raise _Reject(f'"metrics" must be an object of name to number, got {_quote(value)}')
    metrics: dict[str, float] = {}
    dropped: list[str] = []
    for name, item in value.items():
        if isinstance(name, str) and _valid_name(name) and _is_number(item):
            metrics[name] = float(item)
        else:
            dropped.append(_quote(name))
    if not dropped:
        return metrics, None
    shown = ", ".join(dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
    warning = (
        f"dropped metrics {shown}: metric values must be finite numbers and names 1 to "
        f"{MAX_METRIC_NAME_CHARS} characters without control characters"
    )
    return metrics, warning


def _checkpoint_path(path: object) -> str:
    if not isinstance(path, str) or not path:
        raise _Reject(f'"path" is required and must be a non-empty string, got {_quote(path)}')
    if "\0" in path:
        raise _Reject('"path" must not contain NUL characters')
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        # JSON allows lone surrogates (\ud800), which no file system name can hold.
        raise _Reject('"path" is not valid Unicode (it holds a lone surrogate)') from None
    if size > MAX_CHECKPOINT_PATH_BYTES:
        raise _Reject(f'"path" is {size} bytes; checkpoint paths may be at most {MAX_CHECKPOINT_PATH_BYTES}')
    return path
