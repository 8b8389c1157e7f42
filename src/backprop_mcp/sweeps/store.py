"""Sweep records in the store, beside the runs (0700 folders, 0600 files):

    sweeps/<sweep_id>/sweep.json          the record (schema-versioned, replaced atomically)
    sweeps/<sweep_id>/lock                flock for read-modify-write by processes other than its runner
    sweeps/<sweep_id>/stop-request.json   a stop asked for the sweep (read by its runner)
    sweeps/<sweep_id>/runner.log          the runner's own log

Nothing read back is trusted: a record is checked against `SweepRecord` like a run's record
(`core.stored`), moved aside when invalid, left alone and reported when of a newer schema.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.errors import RunNotFound, StoreCorrupt, StoreError, UsageError
from backprop_mcp.core.files import atomic_write, file_lock, storage_error
from backprop_mcp.core.ids import valid_run_id
from backprop_mcp.core.stored import Invalid, check_shape, stored_version
from backprop_mcp.sweeps.shapes import SWEEP_SCHEMA_VERSION, SWEEP_STATES, SweepRecord

STOP_REQUEST_FILE = "stop-request.json"
# Fields without which a sweep record says nothing usable.
CORE_FIELDS = frozenset({"schema_version", "sweep_id", "status", "script", "params", "metric", "trials"})
# A sweep id leaves room for "-t<number>" in its trials' run ids (128 characters at most).
MAX_SWEEP_ID = 100


def check_sweep_id(sweep_id: object) -> str:
    if not (isinstance(sweep_id, str) and valid_run_id(sweep_id) and len(sweep_id) <= MAX_SWEEP_ID):
        raise UsageError(
            f"invalid sweep id {sweep_id!r}: use 1-{MAX_SWEEP_ID} letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    return sweep_id


class SweepStore:
    """The sweeps of the store rooted at `home`."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.root = home / "sweeps"

    def folder(self, sweep_id: str) -> Path:
        return self.root / check_sweep_id(sweep_id)

    def path(self, sweep_id: str) -> Path:
        return self.folder(sweep_id) / "sweep.json"

    def make_folder(self, sweep_id: str) -> Path:
        """Create the sweep's folder, exclusively: an id already taken is a UsageError."""
        folder = self.folder(sweep_id)
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.mkdir(mode=0o700)
        except FileExistsError:
            raise UsageError(f"sweep id {sweep_id!r} is already taken; choose another") from None
        except OSError as exc:
            raise storage_error("create", folder, exc) from None
        return folder

    def remove(self, sweep_id: str) -> None:
        """Undo a sweep whose start failed (quiet: an error is already on its way)."""
        shutil.rmtree(self.folder(sweep_id), ignore_errors=True)

    def write(self, record: SweepRecord) -> None:
        record["updated_at"] = now_iso()
        data = json.dumps(record, indent=1, allow_nan=False).encode("utf-8")
        atomic_write(self.path(record["sweep_id"]), data)

    def read(self, sweep_id: str) -> SweepRecord:
        path = self.path(sweep_id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise RunNotFound(
                f"no sweep with id {sweep_id!r}", hint="list sweeps with `backprop sweep-status`"
            ) from None
        except OSError as exc:
            raise storage_error("read", path, exc) from None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise self._corrupt(sweep_id, path, "it is not valid JSON") from None
        version = stored_version(data)
        if version is not None and version > SWEEP_SCHEMA_VERSION:
            raise StoreError(
                f"sweep {sweep_id!r} was written by a newer backprop (schema {version}; "
                f"this one reads schema {SWEEP_SCHEMA_VERSION})",
                hint="upgrade backprop-mcp to read it",
            )
        try:
            if version != SWEEP_SCHEMA_VERSION:
                raise Invalid(f"schema_version must be {SWEEP_SCHEMA_VERSION}")
            record = cast(SweepRecord, check_shape(data, SweepRecord, CORE_FIELDS, "the sweep record"))
            if record["sweep_id"] != sweep_id:
                raise Invalid("it is not this sweep's record")
            if record["status"] not in SWEEP_STATES:
                raise Invalid(f"status must be one of {', '.join(SWEEP_STATES)}")
        except Invalid as exc:
            raise self._corrupt(sweep_id, path, str(exc)) from None
        return record

    def _corrupt(self, sweep_id: str, path: Path, why: str) -> StoreCorrupt:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time() * 1000)}")
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        return StoreCorrupt(f"the record of sweep {sweep_id!r} was corrupt; it was moved to {aside} ({why})")

    @contextlib.contextmanager
    def lock(self, sweep_id: str) -> Iterator[None]:
        with file_lock(self.folder(sweep_id) / "lock"):
            yield

    def ids(self) -> list[str]:
        """Ids of the sweep folders that hold a record."""
        try:
            with os.scandir(self.root) as entries:
                return sorted(
                    e.name
                    for e in entries
                    if valid_run_id(e.name) and os.path.exists(Path(e.path, "sweep.json"))
                )
        except FileNotFoundError:
            return []

    def request_stop(self, sweep_id: str) -> None:
        atomic_write(self.folder(sweep_id) / STOP_REQUEST_FILE, json.dumps({"at": now_iso()}).encode("utf-8"))

    def stop_requested(self, sweep_id: str) -> bool:
        return (self.folder(sweep_id) / STOP_REQUEST_FILE).exists()

    def clear_stop(self, sweep_id: str) -> None:
        (self.folder(sweep_id) / STOP_REQUEST_FILE).unlink(missing_ok=True)
