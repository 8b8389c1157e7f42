"""The event parser and line splitter of the script contract, against friendly and hostile output."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backprop_mcp.runs.events import (
    MAX_EVENT_BYTES,
    CheckpointEvent,
    DoneEvent,
    Event,
    LineSplitter,
    MetricEvent,
    Oversized,
    ParseResult,
    ProgressEvent,
    parse_line,
    resolve_checkpoint,
)

ACCEPTED = [
    pytest.param(
        b'{"event": "progress", "step": 120, "total": 1000, "loss": 0.41, "metrics": {"acc": 0.88}}',
        (ProgressEvent(step=120, total=1000, loss=0.41, metrics={"acc": 0.88}),),
        id="progress",
    ),
    pytest.param(
        b'{"event": "metric", "step": 120, "name": "val_loss", "value": 0.52}',
        (MetricEvent(name="val_loss", value=0.52, step=120),),
        id="metric",
    ),
    pytest.param(
        b'{"event": "checkpoint_saved", "path": "ckpt/step120.pt", "step": 120}',
        (CheckpointEvent(path="ckpt/step120.pt", step=120),),
        id="checkpoint",
    ),
    pytest.param(
        b'{"event": "done", "metrics": {"val_acc": 0.91}}',
        (DoneEvent(metrics={"val_acc": 0.91}),),
        id="done",
    ),
    pytest.param(
        b'{"step": 120, "loss": 0.41}',
        (ProgressEvent(step=120, total=None, loss=0.41, metrics={}),),
        id="seed progress form",
    ),
    pytest.param(
        b'{"event": "checkpoint_saved", "path": "/tmp/ckpt.pt"}',
        (CheckpointEvent(path="/tmp/ckpt.pt", step=None),),
        id="seed checkpoint form",
    ),
    pytest.param(
        b'{"event": "checkpoint_saved", "path": "/tmp/c.pt", "step": 7, "loss": 0.3}',
        (ProgressEvent(step=7, total=None, loss=0.3, metrics={}), CheckpointEvent(path="/tmp/c.pt", step=7)),
        id="checkpoint with loss is also progress",
    ),
    pytest.param(
        b'  \t{"loss": 1}  ',
        (ProgressEvent(step=None, total=None, loss=1.0, metrics={}),),
        id="surrounding whitespace, int loss",
    ),
    pytest.param(
        b'{"step": 3, "loss": 0.5}\r',
        (ProgressEvent(step=3, total=None, loss=0.5, metrics={}),),
        id="trailing CR",
    ),
    pytest.param(
        b'{"step": 3.0, "extra": {"nested": [1, 2]}, "loss": null}',
        (ProgressEvent(step=3, total=None, loss=None, metrics={}),),
        id="integral float step and extra keys",
    ),
    pytest.param(
        b'{"event": "done"}',
        (DoneEvent(metrics={}),),
        id="done without metrics",
    ),
    pytest.param(
        '{"event": "metric", "name": "précision", "value": -2}'.encode(),
        (MetricEvent(name="précision", value=-2.0, step=None),),
        id="unicode metric name, negative int value",
    ),
    pytest.param(
        b'{"event": "checkpoint_saved", "path": "../ckpt/a b.pt"}',
        (CheckpointEvent(path="../ckpt/a b.pt", step=None),),
        id="relative path with dots and spaces",
    ),
]


@pytest.mark.parametrize(("line", "events"), ACCEPTED)
def test_a_valid_event_line_yields_its_events(line: bytes, events: tuple[Event, ...]) -> None:
    assert parse_line(line) == ParseResult(events, None)


LOG_LINES = [
    pytest.param(b"", id="empty"),
    pytest.param(b"epoch 1: loss 0.41", id="text"),
    pytest.param(b"[1, 2, 3]", id="json array"),
    pytest.param(b'"{not an event}"', id="json string"),
    pytest.param(b"\xff\xfe garbage", id="binary"),
    pytest.param(b"\x00\x00{", id="NUL first"),
    pytest.param(b"x" * (MAX_EVENT_BYTES * 3), id="huge text"),
]


@pytest.mark.parametrize("line", LOG_LINES)
def test_a_line_not_starting_with_a_brace_is_ordinary_output(line: bytes) -> None:
    assert parse_line(line) == ParseResult((), None)


REJECTED = [
    pytest.param(b"{", "not valid JSON", id="truncated"),
    pytest.param(b"{'step': 1}", "not valid JSON", id="python dict repr"),
    pytest.param(b'{"step": 1} trailing', "not valid JSON", id="trailing garbage"),
    pytest.param(b'{"step": 1, "loss": 0.5\x00}', "not valid JSON", id="raw NUL"),
    pytest.param(b'{"step": 1, "loss": "\xff"}', "UTF-8", id="invalid UTF-8"),
    pytest.param(b'{"loss": NaN}', "finite", id="NaN"),
    pytest.param(b'{"loss": Infinity}', "finite", id="Infinity"),
    pytest.param(b'{"loss": -Infinity}', "finite", id="-Infinity"),
    pytest.param(b'{"loss": 1e999}', "finite", id="float overflow"),
    pytest.param(b'{"step": ' + b"9" * 5000 + b"}", "too large", id="5000-digit int"),
    pytest.param(b'{"step": 9223372036854775808}', "non-negative integer", id="step past int64"),
    pytest.param(b'{"step": -1}', "non-negative integer", id="negative step"),
    pytest.param(b'{"step": 1.5}', "non-negative integer", id="fractional step"),
    pytest.param(b'{"step": true}', "non-negative integer", id="bool step"),
    pytest.param(b'{"step": "12"}', "non-negative integer", id="string step"),
    pytest.param(b'{"loss": false}', "finite number", id="bool loss"),
    pytest.param(b'{"event": "progress", "total": 0}', "positive", id="zero total"),
    pytest.param(b'{"a": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "too deeply", id="deep nesting"),
    pytest.param(b'{"lr": 0.1, "batch": 32}', '"event" key', id="json without event or step"),
    pytest.param(b'{"event": "launch", "step": 1}', "unknown event", id="unknown event"),
    pytest.param(b'{"event": ["progress"]}', "unknown event", id="event not a string"),
    pytest.param(b'{"event": "metric", "name": "x"}', '"value" is required', id="metric without value"),
    pytest.param(b'{"event": "metric", "name": "", "value": 1}', '"name"', id="metric empty name"),
    pytest.param(b'{"event": "metric", "name": "a\\u0000b", "value": 1}', '"name"', id="metric NUL name"),
    pytest.param(b'{"event": "metric", "name": 3, "value": 1}', '"name"', id="metric name not a string"),
    pytest.param(b'{"event": "checkpoint_saved"}', '"path" is required', id="checkpoint without path"),
    pytest.param(b'{"event": "checkpoint_saved", "path": ""}', '"path" is required', id="empty path"),
    pytest.param(b'{"event": "checkpoint_saved", "path": 5}', '"path" is required', id="path not a string"),
    pytest.param(b'{"event": "checkpoint_saved", "path": "a\\u0000b"}', "NUL", id="path with NUL"),
    pytest.param(b'{"event": "checkpoint_saved", "path": "\\ud800"}', "surrogate", id="path lone surrogate"),
    pytest.param(
        b'{"event": "checkpoint_saved", "path": "' + b"a" * 4097 + b'"}', "at most 4096", id="path too long"
    ),
    pytest.param(b'{"event": "done", "metrics": [1, 2]}', '"metrics" must be an object', id="metrics list"),
    pytest.param(
        b'{"step": 1, "pad": "' + b"x" * MAX_EVENT_BYTES + b'"}', "at most 65536", id="over MAX_EVENT_BYTES"
    ),
]


@pytest.mark.parametrize(("line", "reason"), REJECTED)
def test_a_bad_event_line_yields_an_error_saying_what_was_wrong_and_no_events(
    line: bytes, reason: str
) -> None:
    result = parse_line(line)
    assert result.events == ()
    assert result.error is not None
    assert reason in result.error


@pytest.mark.parametrize("depth", [sys.getrecursionlimit() - 50, sys.getrecursionlimit() - 5])
def test_nesting_just_under_the_recursion_limit_does_not_raise(depth: int) -> None:
    for key in (b"step", b"metrics", b"event"):
        line = b'{"' + key + b'": ' + b"[" * depth + b"]" * depth + b', "loss": 1}'
        result = parse_line(line)
        assert result.events == ()
        assert result.error is not None


def test_an_unknown_event_error_lists_the_allowed_events() -> None:
    error = parse_line(b'{"event": "finished"}').error
    assert error is not None
    assert all(name in error for name in ("progress", "metric", "checkpoint_saved", "done"))


def test_non_numeric_metric_entries_are_dropped_with_a_warning_and_the_rest_kept() -> None:
    line = b'{"step": 5, "loss": 0.2, "metrics": {"acc": 0.9, "opt": "adam", "ok": true, "n": null, "": 1}}'
    result = parse_line(line)
    assert result.error is None
    assert result.events == (ProgressEvent(step=5, total=None, loss=0.2, metrics={"acc": 0.9}),)
    assert result.warning is not None
    assert '"opt"' in result.warning
    assert '"ok"' in result.warning


def test_an_oversized_marker_is_an_error_only_when_it_looked_like_an_event() -> None:
    assert parse_line(Oversized(length=10**8, head=b"progress bar ====")) == ParseResult((), None)
    result = parse_line(Oversized(length=10**8, head=b'  {"step": 1'))
    assert result.events == ()
    assert result.error is not None
    assert "100000000 bytes" in result.error


def test_a_relative_checkpoint_path_resolves_against_the_run_cwd_without_following_symlinks() -> None:
    assert resolve_checkpoint("ckpt/a.pt", "/runs/x") == "/runs/x/ckpt/a.pt"
    assert resolve_checkpoint("../ckpt/./a.pt", "/runs/x") == "/runs/ckpt/a.pt"
    assert resolve_checkpoint("/abs/b.pt", "/runs/x") == "/abs/b.pt"


def test_resolving_against_a_relative_cwd_is_refused() -> None:
    with pytest.raises(ValueError, match="absolute"):
        resolve_checkpoint("a.pt", "runs/x")


JSON_VALUES: st.SearchStrategy[object] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
EVENT_NAMES = st.sampled_from(["progress", "metric", "checkpoint_saved", "done", "other"])
# Objects built from the contract's own keys, so the validators (not only the JSON decoder) see them.
EVENT_OBJECTS = st.fixed_dictionaries(
    {},
    optional={
        "event": EVENT_NAMES | JSON_VALUES,
        **dict.fromkeys(("step", "total", "loss", "metrics", "name", "value", "path"), JSON_VALUES),
    },
)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_parse_line_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    result = parse_line(data)
    assert isinstance(result, ParseResult)
    assert not (result.events and result.error)
    result = parse_line(b"{" + data)
    assert not (result.events and result.error)


@settings(max_examples=500)
@given(EVENT_OBJECTS)
def test_parse_line_never_raises_on_arbitrary_json_objects(obj: dict[str, object]) -> None:
    line = json.dumps(obj).encode("utf-8")  # NaN and Infinity included: json.dumps writes them
    result = parse_line(line)
    assert (result.error is None) or (result.events == ())
    for event in result.events:
        if isinstance(event, ProgressEvent):
            assert all(isinstance(v, float) for v in event.metrics.values())
        if isinstance(event, MetricEvent):
            assert type(event.value) is float


# The reference meaning of a byte stream: split at newlines, drop one trailing CR, mark long lines.
def _reference_lines(stream: bytes, limit: int) -> list[bytes | Oversized]:
    pieces = stream.split(b"\n")
    lines = pieces[:-1] + ([pieces[-1]] if pieces[-1] else [])
    out: list[bytes | Oversized] = []
    for line in lines:
        body = line[:-1] if line.endswith(b"\r") else line
        out.append(Oversized(len(body), body[:limit]) if len(body) > limit else body)
    return out


def _split(stream: bytes, cuts: list[int], limit: int) -> list[bytes | Oversized]:
    splitter = LineSplitter(limit)
    out: list[bytes | Oversized] = []
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    for start, end in itertools.pairwise(bounds):
        out += splitter.feed(stream[start:end])
    out += splitter.flush()
    return out


STREAM = st.lists(
    st.sampled_from([b"a", b"bc", b"\n", b"\r", b"\r\n", b"{}", b"\xff", b"xxxxxxx"]), max_size=60
)


@settings(max_examples=500)
@given(STREAM.map(b"".join), st.lists(st.integers(min_value=0), max_size=12), st.integers(1, 12))
def test_any_split_of_a_stream_yields_the_same_lines(stream: bytes, cuts: list[int], limit: int) -> None:
    assert _split(stream, cuts, limit) == _reference_lines(stream, limit)


def test_a_line_of_exactly_the_limit_is_kept_even_with_a_crlf_ending() -> None:
    splitter = LineSplitter(4)
    assert splitter.feed(b"abcd\r") == []
    assert splitter.feed(b"\nabcde\n") == [b"abcd", Oversized(5, b"abcd")]


def test_crlf_and_lf_line_endings_both_yield_clean_lines() -> None:
    splitter = LineSplitter(100)
    assert splitter.feed(b'{"step": 1}\r\nlog\n{"step"') == [b'{"step": 1}', b"log"]
    assert splitter.feed(b": 2}\r\n") == [b'{"step": 2}']
    assert splitter.flush() == []


def test_flush_returns_the_trailing_partial_line_once() -> None:
    splitter = LineSplitter(100)
    assert splitter.feed(b"a\nno newline at end") == [b"a"]
    assert splitter.flush() == [b"no newline at end"]
    assert splitter.flush() == []


def test_a_50_mb_line_without_newline_is_split_in_constant_memory() -> None:
    chunk = b"z" * (64 * 1024)
    chunks = (50 * 1024 * 1024) // len(chunk)
    splitter = LineSplitter(MAX_EVENT_BYTES)
    tracemalloc.start()
    try:
        for _ in range(chunks):
            assert splitter.feed(chunk) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The line is 50 MiB; what the splitter holds stays near one limit's worth.
    assert peak < 4 * MAX_EVENT_BYTES
    (item,) = splitter.flush()
    assert item == Oversized(length=chunks * len(chunk), head=b"z" * MAX_EVENT_BYTES)
    assert splitter.feed(b'{"step": 1}\n') == [b'{"step": 1}']


def test_an_oversized_line_is_reported_once_when_it_ends_and_the_next_line_is_intact() -> None:
    splitter = LineSplitter(8)
    out = splitter.feed(b"{" + b"x" * 100) + splitter.feed(b"y" * 100 + b"\nok\n")
    assert out == [Oversized(length=201, head=b"{xxxxxxx"), b"ok"]


def test_the_parser_imports_only_the_standard_library() -> None:
    code = (
        "import sys; before = set(sys.modules); import backprop_mcp.runs.events; "
        "print('\\n'.join(sorted(set(sys.modules) - before)))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")},
        timeout=30,
        check=True,
    )
    loaded = {name.split(".")[0] for name in proc.stdout.split()}
    assert loaded - set(sys.stdlib_module_names) == {"backprop_mcp"}


@given(
    st.lists(
        st.sampled_from(
            [
                '"event": "progress"',
                '"step": 12',
                '"total": 100',
                '"loss": 0.25',
                '"loss": -1e-05',
                '"step": 0',
                '"loss": 3',
                '"total": 0',
                '"step": 1.5',
                '"loss": 1e999',
                '"x": 1',
            ]
        ),
        min_size=0,
        max_size=5,
    ),
    st.sampled_from(["", " ", "\t"]),
)
def test_the_fast_progress_check_accepts_only_lines_the_parser_reads_as_one_progress_event(
    pairs: list[str], space: str
) -> None:
    from backprop_mcp.runs.events import is_plain_progress

    line = ("{" + space + ("," + space).join(pairs) + space + "}").encode()
    if is_plain_progress(line):
        result = parse_line(line)
        assert result.error is None
        assert len(result.events) == 1 and isinstance(result.events[0], ProgressEvent)


def test_the_fast_progress_check_takes_the_common_forms() -> None:
    from backprop_mcp.runs.events import is_plain_progress

    assert is_plain_progress(b'{"step": 12, "loss": 0.41}')
    assert is_plain_progress(b'{"event": "progress", "step": 120, "total": 1000, "loss": 0.41}')
    assert not is_plain_progress(b'{"event": "progress", "step": 1, "metrics": {"acc": 0.5}}')
    assert not is_plain_progress(b'{"total": 5}')


_LINES = st.sampled_from(
    [
        b'{"step": 12, "loss": 0.41}',
        b' {"event":"progress", "total": 3,"step": 0}\t',
        b'{"total": 5, "loss": -1.5e-3}',
        b'{"total": 5}',
        b'{"total": 5, "total": 6, "event": "progress"}',
        b'{"step": 1}x',
        b'{"step": 1.5}',
        b'{"loss": 1e999}',
        b'{"event": "metric", "name": "acc", "value": 0.5}',
        b"{",
        b"",
        b"epoch 1 done",
        b'{"step": 123456789012345678901}',
    ]
)


@given(st.lists(_LINES, max_size=40), st.booleans())
def test_runs_of_plain_progress_lines_are_the_lines_the_fast_check_accepts(
    lines: list[bytes], oversized: bool
) -> None:
    """The supervisor's batch form of the fast check: same lines, same order, each plain run whole."""
    from backprop_mcp.runs.events import Oversized, is_plain_progress, plain_runs

    items: list[bytes | Oversized] = [*lines, *([Oversized(length=10**6)] if oversized else [])]
    seen: list[bytes | Oversized] = []
    previous_was_run = False
    for item in plain_runs(items):
        if isinstance(item, tuple):
            run, joined = item
            assert run and all(is_plain_progress(line) for line in run) and joined == b"\n".join(run)
            assert not previous_was_run  # a run is as long as the plain lines go
            seen.extend(run)
            previous_was_run = True
        else:
            assert oversized or not is_plain_progress(item)  # type: ignore[arg-type]
            seen.append(item)
            previous_was_run = False
    assert seen == items
