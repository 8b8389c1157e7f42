"""A run's lab notebook: its notes and tags, kept in `runs/<id>/notes.jsonl` (append only, the
truth) and mirrored in the store's tag index `tags.jsonl` (what `list --tag` filters by).

Neither file is ever written by a run's supervisor, which keeps the run's record in memory and
rewrites `run.json` and its index rows from it: a note or a tag kept in those would be lost at its
next write. Here every change is one O_APPEND line under the run's lock (which only processes other
than the supervisor take), so any number of writers and a live supervisor lose nothing. A line:

    {"at": "2025-01-01T12:00:00.000Z", "source": "cli", "note": "lr 0.1 diverges?",
     "tag": ["baseline"], "untag": ["draft"]}

The tag index holds, per change, a run's whole set of tags after it (`{"run_id", "created_at",
"tags"}`, the newest line of a run wins; `created_at` tells a run from an earlier one that had the
same id). It is derived: rebuilt from the notebooks with the run index (`Store.rebuild_index`).

Stdlib only: `backprop list` imports it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

# pydantic needs typing_extensions.TypedDict on Python < 3.12 to read nested TypedDicts.
from typing_extensions import TypedDict

from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.errors import BackpropError, StoreError, UsageError
from backprop_mcp.core.files import all_lines, append_line, atomic_write, file_lock, storage_error

NOTES_FILE = "notes.jsonl"
TAG_INDEX_FILE = "tags.jsonl"
TAG_INDEX_LOCK = "tags.lock"
# Bounds of one run's notebook: a note is a paragraph, not a log (get_logs has the output), and a
# notebook stays small enough to read whole at every `status`. Beyond them a change is refused
# (said clearly) rather than an old note dropped: the file is append only, shared by many writers.
MAX_NOTE_CHARS = 2000
MAX_NOTES = 200
MAX_NOTEBOOK_BYTES = 256 * 1024
MAX_TAGS = 32
MAX_TAG_CHARS = 64
# Used with fullmatch (see `store.RUN_ID_RE`).
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:=+-]{0,63}")
SOURCES = ("cli", "mcp")
# Compact the tag index when it holds this many lines per tagged run (plus slack).
TAG_INDEX_RATIO = 4
TAG_INDEX_SLACK = 1000
# Control characters other than newline and tab make a note that cannot be shown safely.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

_TAG_RULE = (
    f"a tag is 1 to {MAX_TAG_CHARS} letters, digits or _ . : = + -, starting with a letter or digit "
    "(e.g. baseline, lr=0.1, exp:42)"
)


class Store(Protocol):
    """What the notebook needs of `core.store.Store` (which imports this module to rebuild the
    tag index with the run index)."""

    home: Path
    runs: Path

    def read(self, run_id: str) -> Mapping[str, object]: ...

    def run_dir(self, run_id: str) -> Path: ...

    def run_lock(self, run_id: str) -> contextlib.AbstractContextManager[bool]: ...

    def ensure(self) -> Any: ...


class Note(TypedDict):
    """One note of a run's notebook."""

    at: str
    """When it was written, ISO 8601 UTC."""
    source: str
    """Who wrote it: cli (the `backprop` command) or mcp (an agent, through the MCP server)."""
    text: str
    """The note."""


class Notebook(TypedDict):
    """A run's notes and tags."""

    run_id: str
    """Run id."""
    tags: list[str]
    """Its tags now, in the order they were added."""
    notes: list[Note]
    """Its notes, oldest first."""


def check_tag(tag: object) -> str:
    """A tag, checked: a UsageError says what is allowed."""
    if not isinstance(tag, str) or TAG_RE.fullmatch(tag) is None:
        raise UsageError(f"invalid tag {_shown(tag)}; {_TAG_RULE}")
    return tag


def check_tags(tags: Iterable[object]) -> list[str]:
    """Tags, checked, without repeats, in their order; at most MAX_TAGS."""
    if isinstance(tags, str):
        raise UsageError(f"tags must be a list of tags, got the string {_shown(tags)}")
    checked = list(dict.fromkeys(check_tag(tag) for tag in tags))
    if len(checked) > MAX_TAGS:
        raise UsageError(f"a run has at most {MAX_TAGS} tags; {len(checked)} were given")
    return checked


def split_tags(tags: Iterable[str]) -> tuple[list[str], list[str]]:
    """Tags to add and tags to remove, from a list where "-T" removes T (a tag never starts with "-")."""
    listed = list(tags)
    return [t for t in listed if not t.startswith("-")], [t[1:] for t in listed if t.startswith("-")]


def check_note(note: object) -> str:
    """A note, checked: text of 1 to MAX_NOTE_CHARS characters, newlines and tabs allowed."""
    if not isinstance(note, str) or not note.strip():
        raise UsageError(f"a note must be non-empty text, got {_shown(note)}")
    if len(note) > MAX_NOTE_CHARS:
        raise UsageError(
            f"a note is at most {MAX_NOTE_CHARS} characters; this one has {len(note)}",
            hint="split it into several notes, or keep the details in a file of the project",
        )
    if _CONTROL_RE.search(note):
        raise UsageError("a note cannot contain control characters other than newline and tab")
    return note


def notes_path(store: Store, run_id: str) -> Path:
    return store.run_dir(run_id) / NOTES_FILE


def entry(
    source: str, note: str | None = None, tags: Iterable[str] = (), untag: Iterable[str] = ()
) -> dict[str, Any]:
    """A notebook line: checked note and tags (refused with a UsageError before anything is written)."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}")
    line: dict[str, Any] = {"at": now_iso(), "source": source}
    if note is not None:
        line["note"] = check_note(note)
    added, removed = check_tags(tags), check_tags(untag)
    if added:
        line["tag"] = added
    if removed:
        line["untag"] = removed
    if len(line) == 2:
        raise UsageError("give a note, tags to add or tags to remove")
    return line


def fold(lines: Iterable[bytes], run_id: str) -> Notebook:
    """The notebook that `lines` (of notes.jsonl) write; a line that is not a valid entry is skipped."""
    tags: dict[str, None] = {}
    notes: list[Note] = []
    for raw in lines:
        try:
            line = json.loads(raw)
        except (ValueError, RecursionError):
            continue
        if not isinstance(line, dict) or not isinstance(line.get("at"), str):
            continue
        for tag in _tags(line.get("tag")):
            tags[tag] = None
        for tag in _tags(line.get("untag")):
            tags.pop(tag, None)
        if isinstance(line.get("note"), str):
            source = line.get("source")
            notes.append(
                Note(at=line["at"], source=source if isinstance(source, str) else "", text=line["note"])
            )
    return Notebook(run_id=run_id, tags=list(tags), notes=notes)


def read(store: Store, run_id: str) -> Notebook:
    """The run's notebook (empty when it has none); the caller checks that the run exists."""
    return fold(_lines(notes_path(store, run_id)), run_id)


def write(store: Store, run_id: str, created_at: str, line: Mapping[str, Any]) -> Notebook:
    """Append `line` (from `entry`) to the run's notebook under its lock, within the bounds, and
    record the run's tags in the tag index when they changed; returns the notebook after it."""
    path = notes_path(store, run_id)
    with store.run_lock(run_id):
        raw = _lines(path)
        before = fold(raw, run_id)
        after = fold([*raw, json.dumps(line).encode("utf-8")], run_id)
        if "note" in line and len(before["notes"]) >= MAX_NOTES:
            raise UsageError(
                f"run {run_id} has {MAX_NOTES} notes, the most a run keeps; nothing was added",
                hint="note the rest on a new run, or in a file of the project",
            )
        if len(after["tags"]) > MAX_TAGS:
            raise UsageError(
                f"a run has at most {MAX_TAGS} tags; run {run_id} has {len(before['tags'])} "
                "and this would make it more; nothing was added",
                hint="remove some first (`backprop tag RUN_ID TAG --remove`, or a '-' before the tag)",
            )
        size = sum(len(r) + 1 for r in raw) + len(json.dumps(line, separators=(",", ":"))) + 1
        if size > MAX_NOTEBOOK_BYTES:
            raise UsageError(
                f"the notebook of run {run_id} would pass {MAX_NOTEBOOK_BYTES // 1024} KiB; nothing was added"
            )
        _end_torn_line(path)
        append_line(path, line)
        if after["tags"] != before["tags"]:
            # Under the run's lock still: the index gets this run's sets in the notebook's order.
            index_tags(store, run_id, created_at, after["tags"])
    return after


# -- the tag index ----------------------------------------------------------------------------------


def index_tags(store: Store, run_id: str, created_at: str, tags: list[str]) -> None:
    """Record the run's whole set of tags in the tag index."""
    store.ensure()
    with file_lock(store.home / TAG_INDEX_LOCK):
        _end_torn_line(store.home / TAG_INDEX_FILE)
        append_line(store.home / TAG_INDEX_FILE, {"run_id": run_id, "created_at": created_at, "tags": tags})


def tag_map(store: Store) -> dict[str, tuple[str, list[str]]]:
    """Each run's tags from the tag index: run id -> (its creation time, its tags). One read of a
    file of a line per tag change (compacted here when it holds many more lines than runs)."""
    path = store.home / TAG_INDEX_FILE
    if not path.exists() and store.runs.is_dir():
        # Lost, or a store of a version without it: built once from the runs that have notebooks
        # (a scandir and a stat per run). A rebuilt index exists even when empty. A store this
        # process cannot write is listed all the same, without tags.
        with contextlib.suppress(StoreError):
            rebuild_tag_index(store, _noted_runs(store))
    lines = _lines(path)
    latest = tag_map_of(lines)
    if len(lines) > len(latest) * TAG_INDEX_RATIO + TAG_INDEX_SLACK:
        with contextlib.suppress(StoreError):  # compacted by a later listing
            _compact(store)
    return latest


def tags_of(tags: Mapping[str, tuple[str, list[str]]], run_id: str, created_at: str) -> list[str]:
    """The tags of the run `run_id` created at `created_at` (not of an earlier run of that id)."""
    found = tags.get(run_id)
    return found[1] if found is not None and found[0] == created_at else []


def rebuild_tag_index(store: Store, runs: Iterable[tuple[str, str]]) -> None:
    """Rewrite the tag index from the notebooks of `runs` (run id, creation time)."""
    # The notebooks are read under the index's lock: a change whose notebook line this misses
    # waits for the lock to append its row, after the new file is in place.
    with file_lock(store.home / TAG_INDEX_LOCK):
        rows = []
        for run_id, created_at in runs:
            try:
                tags = read(store, run_id)["tags"]
            except StoreError:
                continue  # its notebook cannot be read: unlisted by tag; `note RUN_ID` says why
            if tags:
                rows.append({"run_id": run_id, "created_at": created_at, "tags": tags})
        data = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows)
        atomic_write(store.home / TAG_INDEX_FILE, data.encode("utf-8"))


def _noted_runs(store: Store) -> Iterator[tuple[str, str]]:
    """(run id, creation time) of each run folder that holds a notebook and a readable record."""
    try:
        with os.scandir(store.runs) as entries:
            folders = [
                entry.name for entry in entries if os.path.exists(os.path.join(entry.path, NOTES_FILE))
            ]
    except OSError:
        return
    for run_id in folders:
        try:
            created = store.read(run_id)["created_at"]
        except BackpropError:
            continue  # no longer a run (moved aside, removed): nothing to list it by
        if isinstance(created, str):
            yield run_id, created


def _compact(store: Store) -> None:
    with file_lock(store.home / TAG_INDEX_LOCK, blocking=False) as got:
        if not got:
            return  # another process writes it now: compacted another time
        # Read again under the lock: a change appended since the caller's read must survive.
        fresh = tag_map_of(_lines(store.home / TAG_INDEX_FILE))
        rows = [{"run_id": r, "created_at": c, "tags": t} for r, (c, t) in fresh.items() if t]
        data = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows)
        atomic_write(store.home / TAG_INDEX_FILE, data.encode("utf-8"))


def tag_map_of(lines: Iterable[bytes]) -> dict[str, tuple[str, list[str]]]:
    """The runs' latest tag sets in tag-index `lines`."""
    latest: dict[str, tuple[str, list[str]]] = {}
    for raw in lines:
        try:
            row = json.loads(raw)
            run_id, created, tags = row["run_id"], row["created_at"], row["tags"]
        except (ValueError, RecursionError, TypeError, KeyError):
            continue
        if isinstance(run_id, str) and isinstance(created, str) and isinstance(tags, list):
            latest[run_id] = (created, _strings(tags))
    return latest


def _lines(path: Path) -> list[bytes]:
    """The lines of a notebook or of the tag index; one that cannot be read is a StoreError."""
    try:
        return all_lines(path)
    except OSError as exc:
        raise storage_error("read", path, exc) from None


def _end_torn_line(path: Path) -> None:
    """End a last line that a writer which died mid-line left without its newline (called under
    the file's lock): the next line appended would join it and be lost with it."""
    try:
        with path.open("rb") as file:
            file.seek(-1, os.SEEK_END)
            torn = file.read(1) != b"\n"
    except FileNotFoundError:
        return
    except OSError as exc:  # empty (the seek fails): nothing torn; else the append says why
        if exc.errno == errno.EINVAL:
            return
        raise storage_error("read", path, exc) from None
    if torn:
        try:
            with path.open("ab") as file:
                file.write(b"\n")
        except OSError as exc:
            raise storage_error("append to", path, exc) from None


def _tags(value: object) -> list[str]:
    """The valid tags of a notebook line: one no command could have written (the file was edited)
    is ignored, since no command could remove it either."""
    return [tag for tag in _strings(value) if TAG_RE.fullmatch(tag)]


def _strings(value: object) -> list[str]:
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
