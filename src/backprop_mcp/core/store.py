"""The JSON experiment store (DESIGN §6): one folder per run, atomic record writes, an append-only
index for fast listing, and the locks that let many processes share it safely.

Layout under the home folder (0700 folders, 0600 files):

    runs/<run_id>/run.json        the record (schema-versioned, replaced atomically)
    runs/<run_id>/events.jsonl    the run's history, append only
    runs/<run_id>/logs/attempt-N.log  combined stdout and stderr of each attempt
    runs/<run_id>/history/N.json  the metric history of attempt N (see runs/history.py)
    runs/<run_id>/code/N/         what attempt N ran: provenance.json, files/ (copies), git.diff
                                  (see runs/provenance.py)
    runs/<run_id>/source/         the snapshot a `rerun` of a changed script runs (runs/reproduce.py)
    runs/<run_id>/lock            flock for read-modify-write by processes other than the supervisor
    runs/<run_id>/supervisor.pid  the supervisor's pid and start time, written by its starter
    runs/<run_id>/stop-request.json  a stop asked for the current attempt (read by its supervisor)
    runs/<run_id>/notes.jsonl     its notes and tag changes, append only (see core/notebook.py)
    index.jsonl                   one row per change of a run's listing fields, newest last
    index.lock                    flock serialising index appends and compaction
    tags.jsonl, tags.lock         the runs' tags for `list --tag` (see core/notebook.py)
    governor/                     the machine-wide queue and slots (see governor/admission.py)

Stdlib only: the supervisor and the CLI's fast paths import it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from backprop_mcp.core import files, notebook
from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.errors import RunNotFound, StoreCorrupt, StoreError, UsageError
from backprop_mcp.core.files import all_lines, append_line, atomic_write, file_lock, storage_error, tail_lines
from backprop_mcp.core.ids import check_run_id, valid_run_id
from backprop_mcp.core.records import SCHEMA_VERSION, RunRecord, RunRow, row_of
from backprop_mcp.core.stored import Invalid, check_record, check_row, salvage_row, stored_version

log = logging.getLogger(__name__)

# Where `stop` leaves its request, for a supervisor whose pid was not known yet when it came.
STOP_REQUEST_FILE = "stop-request.json"
# Where the local backend's starter records the supervisor it spawned (see `backends.local`).
SUPERVISOR_PID_FILE = "supervisor.pid"
# Compact the index when it holds this many times more lines than runs (plus slack), so listing
# stays proportional to the number of runs rather than to the number of state changes ever made.
COMPACT_RATIO = 4
COMPACT_SLACK = 1000
# An index row (with a few script arguments and metrics) is about this long; used to estimate the
# line count from the file size.
_TYPICAL_ROW_BYTES = 320


def default_home(env: os._Environ[str] | dict[str, str]) -> Path:
    """BACKPROP_HOME, else the platform's user data folder."""
    if env.get("BACKPROP_HOME"):
        return Path(env["BACKPROP_HOME"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("backprop-mcp", appauthor=False))


class Store:
    """The experiment store rooted at `home`."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.runs = home / "runs"
        self.index_path = home / "index.jsonl"
        self.index_lock = home / "index.lock"
        self.governor_dir = home / "governor"
        # Set when a listing skipped a bad index line: the caller rebuilds the index once.
        self.index_damaged = False

    def ensure(self) -> Store:
        """Create the folders (0700) if needed."""
        for folder in (self.home, self.runs, self.governor_dir):
            try:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise storage_error("create", folder, exc) from None
        return self

    # -- runs -----------------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        return self.runs / check_run_id(run_id)

    def record_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "run.json"

    def events_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "events.jsonl"

    def log_path(self, run_id: str, attempt: int) -> Path:
        return self.run_dir(run_id) / "logs" / f"attempt-{attempt}.log"

    def exists(self, run_id: str) -> bool:
        return self.record_path(run_id).is_file()

    def create(self, record: RunRecord) -> None:
        """Store a new run; fails if the id is taken (the folder is created exclusively)."""
        self.ensure()
        folder = self.run_dir(record["run_id"])
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            raise UsageError(
                f"run id {record['run_id']!r} is already taken; choose another --run-id, "
                f"or use `backprop resume {record['run_id']}`"
            ) from None
        except OSError as exc:
            raise storage_error("create", folder, exc) from None
        try:
            (folder / "logs").mkdir(mode=0o700)
            (folder / "checkpoints").mkdir(mode=0o700)
            self.write(record, index=False)  # the caller appends the creation row
        except BaseException:
            # Leave no half-created run behind: an empty folder would make the id unusable.
            for child in sorted(folder.rglob("*"), reverse=True):
                with contextlib.suppress(OSError):
                    child.rmdir() if child.is_dir() else child.unlink()
            with contextlib.suppress(OSError):
                folder.rmdir()
            raise

    def remove_run(self, run_id: str, index_since: int) -> None:
        """Undo the creation of a run that never started: its folder and its index rows (those
        appended at or after byte `index_since`). Best effort and quiet: it runs while an error is
        already on its way to the caller, often on a full disk."""
        shutil.rmtree(self.run_dir(run_id), ignore_errors=True)
        with contextlib.suppress(StoreError):
            self.drop_index_rows(run_id, index_since)

    @contextlib.contextmanager
    def restorable(self, run_id: str) -> Iterator[None]:
        """Put the run back as it was if the block raises: its record, its history and its index
        rows. Nothing in the undo needs free space (a hard link kept aside, a truncation, an
        in-place rewrite that shrinks a file), so it also works when the disk just filled up."""
        path = self.record_path(run_id)
        kept = path.with_name(path.name + ".undo")
        with contextlib.suppress(FileNotFoundError):
            kept.unlink()  # left by a crash during an earlier resume
        old: bytes | None = None
        try:
            os.link(path, kept)
        except OSError:
            try:
                old = path.read_bytes()  # a file system without hard links: keep the bytes instead
            except OSError as exc:
                raise storage_error("read", path, exc) from None
        events = self.events_path(run_id)
        events_size = events.stat().st_size if events.exists() else 0
        index_since = self.index_size()
        try:
            yield
        except BaseException:
            with contextlib.suppress(OSError, StoreError):
                if old is None:
                    os.replace(kept, path)
                else:
                    atomic_write(path, old)
            with contextlib.suppress(OSError):
                os.truncate(events, events_size)
            with contextlib.suppress(StoreError):
                self.drop_index_rows(run_id, index_since)
            raise
        finally:
            with contextlib.suppress(OSError):
                kept.unlink()

    def read(self, run_id: str) -> RunRecord:
        """The stored record, checked; an invalid one is moved aside and reported (StoreCorrupt),
        one of a newer schema is left alone and reported (StoreError)."""
        path = self.record_path(run_id)
        return self._decode(run_id, path, self._read_bytes(run_id, path))

    def _read_bytes(self, run_id: str, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise RunNotFound(
                f"no run with id {run_id!r}",
                hint="list runs with `backprop list` (or the list_experiments tool)",
            ) from None
        except IsADirectoryError:
            raise self._corrupt(run_id, path, "it is a folder, not a file") from None
        except OSError as exc:
            raise storage_error("read", path, exc) from None

    def _decode(self, run_id: str, path: Path, raw: bytes) -> RunRecord:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data, why = None, "it is not valid JSON"
        else:
            ours = isinstance(data, dict) and data.get("run_id") == run_id
            why = "" if ours else "it is not this run's record"
        version = stored_version(data)
        if not why and version is not None and version > SCHEMA_VERSION:
            # Written by a newer backprop: not damage, so it stays where it is.
            raise StoreError(
                f"run {run_id!r} was written by a newer backprop (record schema {version}; "
                f"this one reads schema {SCHEMA_VERSION})",
                hint="upgrade backprop-mcp to read it",
            )
        if not why:
            try:
                return check_record(data)
            except Invalid as exc:
                why = str(exc)
        raise self._corrupt(run_id, path, why)

    def _corrupt(self, run_id: str, path: Path, why: str) -> StoreCorrupt:
        aside = self.quarantine(path)
        return StoreCorrupt(f"the record of run {run_id!r} was corrupt; it was moved to {aside} ({why})")

    def quarantine(self, path: Path) -> Path:
        """Move a corrupt file aside (kept for inspection) and warn."""
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time() * 1000)}")
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        log.warning("corrupt store file %s moved to %s", path, aside)
        return aside

    def write(self, record: RunRecord, *, index: bool = True) -> None:
        """Replace the record atomically, after appending its index row when asked (listing fields
        changed). The record goes last: a reader who sees a state in it (a final one above all)
        finds the index already saying so. A row whose record then fails to be written is
        harmless: the writer retries, or the next reader ends the run, each with a newer row."""
        record["updated_at"] = now_iso()
        data = json.dumps(record, indent=1, allow_nan=False).encode("utf-8")
        if index:
            self.index_append(row_of(record), new=False)
        atomic_write(self.record_path(record["run_id"]), data)

    def append_event(self, run_id: str, event: dict[str, Any]) -> None:
        """Add an entry to the run's history."""
        event.setdefault("at", now_iso())
        append_line(self.events_path(run_id), event)

    def read_events(self, run_id: str, *, limit: int | None = None) -> list[dict[str, Any]]:
        """The run's history (the last `limit` entries); corrupt lines are skipped."""
        path = self.events_path(run_id)
        lines = tail_lines(path, limit) if limit else all_lines(path)
        events = []
        for line in lines:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict):
                events.append(item)
        return events

    @contextlib.contextmanager
    def run_lock(self, run_id: str, *, blocking: bool = True) -> Iterator[bool]:
        """Serialise read-modify-write of one run's record among non-supervisor processes. Not
        `blocking`: yields False at once, holding nothing, when another process holds it."""
        with file_lock(self.run_dir(run_id) / "lock", blocking=blocking) as held:
            yield held

    def _run_folders(self) -> Iterator[str]:
        """Names of the run folders holding a record (of any kind: the reader judges it).

        `count_runs` and `all_run_ids` share this, so a rebuilt index always holds as many runs as
        are counted and listing converges after one rebuild.
        """
        try:
            with os.scandir(self.runs) as entries:
                for entry in entries:
                    if valid_run_id(entry.name) and os.path.exists(os.path.join(entry.path, "run.json")):
                        yield entry.name
        except FileNotFoundError:
            return

    def count_runs(self) -> int:
        """Run folders holding a record (one scandir; cheap next to reading their records)."""
        return sum(1 for _ in self._run_folders())

    def all_run_ids(self) -> list[str]:
        return sorted(self._run_folders())

    # -- index ----------------------------------------------------------------------------------

    def index_append(self, row: RunRow, *, new: bool) -> None:
        entry: dict[str, Any] = dict(row)
        if new:
            entry["new"] = True
        self.ensure()
        # Appenders open the file under the lock so that compaction (which replaces the file)
        # can never leave an append on a replaced inode.
        with file_lock(self.index_lock):
            append_line(self.index_path, entry)

    def index_size(self) -> int:
        """The index's length in bytes now; rows appended later start at or after it."""
        try:
            return self.index_path.stat().st_size
        except FileNotFoundError:
            return 0

    def drop_index_rows(self, run_id: str, since: int) -> None:
        """Remove the rows of `run_id` that start at or after byte `since` (the undo of a failed
        start). The tail is rewritten in place under the index lock: it only ever shrinks, so it
        needs no free space; a reader at that instant may skip a torn line, as after any crash."""
        with file_lock(self.index_lock):
            try:
                fd = os.open(self.index_path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                return
            except OSError as exc:
                raise storage_error("rewrite", self.index_path, exc) from None
            try:
                size = os.fstat(fd).st_size
                # Compacted since, or not at a line start: filter the whole file instead.
                if since > size or (since > 0 and os.pread(fd, 1, since - 1) != b"\n"):
                    since = 0
                tail = os.pread(fd, size - since, since)
                kept = [line for line in tail.split(b"\n") if line.strip() and _row_run_id(line) != run_id]
                data = b"".join(line + b"\n" for line in kept)
                if len(data) != len(tail):
                    os.pwrite(fd, data, since)
                    os.ftruncate(fd, since + len(data))
            except OSError as exc:
                raise storage_error("rewrite", self.index_path, exc) from None
            finally:
                os.close(fd)

    def index_rows(self) -> Iterator[dict[str, Any]]:
        """Yield each run's latest index row, scanning the index from its end.

        Each run is yielded once, at its creation line, with its latest row: runs come out
        newest first, and a caller that needs N runs stops after N, whatever the store's size.
        """
        if not self.index_path.exists():
            if self.all_run_ids():
                self.rebuild_index()
            else:
                return
        latest: dict[str, dict[str, Any]] = {}
        yielded: set[str] = set()
        for line in files.reverse_lines(self.index_path):
            try:
                data = json.loads(line)
                row: dict[str, Any] = dict(check_row(data, valid_run_id))
            except (ValueError, RecursionError) as exc:  # Invalid is a ValueError
                self.index_damaged = True
                log.warning("skipping a bad line in %s: %s", self.index_path, str(exc)[:200])
                continue
            run_id = row["run_id"]
            latest.setdefault(run_id, row)
            # A creation row can appear twice (an append racing a rebuild): list each run once.
            if data.get("new") is True and run_id not in yielded:
                yielded.add(run_id)
                yield dict(latest[run_id])

    def rebuild_index(self) -> int:
        """Rewrite the index from the run folders (after corruption, or to compact it).

        Every run folder that still holds a record gets a row: a record this build cannot read (a
        newer schema, no permission) gets a row of status "unknown" saying why, so it is listed,
        not dropped, and the next listing finds the index complete.
        """
        rows: list[RunRow] = []
        for run_id in self.all_run_ids():
            try:
                rows.append(row_of(self.read(run_id)))
            except (StoreCorrupt, RunNotFound) as exc:
                log.warning("%s", exc)  # moved aside or gone: no longer a run folder
            except StoreError as exc:
                log.warning("%s", exc)
                rows.append(self.unreadable_row(run_id, exc.message))
        self.index_damaged = False
        rows.sort(key=lambda r: r["created_at"])
        data = "".join(json.dumps({**r, "new": True}, allow_nan=False) + "\n" for r in rows)
        with file_lock(self.index_lock):
            atomic_write(self.index_path, data.encode("utf-8"))
        notebook.rebuild_tag_index(self, ((r["run_id"], r["created_at"]) for r in rows))
        return len(rows)

    def unreadable_row(self, run_id: str, why: str) -> RunRow:
        """The listing row of a run whose record exists but cannot be read by this build."""
        path = self.record_path(run_id)
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError):
            data = None
        try:
            created = now_iso(path.stat().st_mtime)
        except OSError:
            created = now_iso(0)
        return salvage_row(data, run_id, created, why)

    def maybe_compact(self) -> None:
        """Compact the index when it has grown far beyond one line per run; skip if busy.

        Cheap enough to call at the end of every run: one stat and one scandir.
        """
        try:
            size = self.index_path.stat().st_size
            runs = sum(1 for _ in os.scandir(self.runs))
        except OSError:
            return
        if size / _TYPICAL_ROW_BYTES <= runs * COMPACT_RATIO + COMPACT_SLACK:
            return
        with file_lock(self.index_lock, blocking=False) as got:
            if not got:
                return
            latest: dict[str, dict[str, Any]] = {}
            order: list[str] = []
            for line in all_lines(self.index_path):
                try:
                    checked = check_row(json.loads(line), valid_run_id)
                except (ValueError, RecursionError):
                    continue
                run_id, row = checked["run_id"], dict(checked)
                if run_id not in latest:
                    order.append(run_id)
                latest[run_id] = row
            data = "".join(json.dumps({**latest[r], "new": True}, allow_nan=False) + "\n" for r in order)
            atomic_write(self.index_path, data.encode("utf-8"))


def _row_run_id(line: bytes) -> object:
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return row.get("run_id") if isinstance(row, dict) else None
