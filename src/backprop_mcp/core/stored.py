"""Checks of what is read back from the store (records, index rows) against the shapes of records.py.

Nothing read from disk is trusted: a hand-edited, damaged or foreign file must give a clear error
or be moved aside, never a KeyError or a TypeError in a reader far away. The checks follow the
TypedDicts' annotations, so a field added to a shape is checked without touching this module.

The rule for a record of the current schema (documented in docs/architecture.md, "The store"):

- a field of the wrong type (a NaN loss, a string step, a status that is no state) makes the record
  invalid: the store moves it aside and says so;
- a missing identity field (`CORE_FIELDS`: which run, its state, its script, when it was made, its
  attempts) makes it invalid too: there is nothing to recover it from;
- any other missing field takes its empty value (None, [], {}, 0), as a record written before the
  field existed would need. The record on disk is left as it is until its next write.

Stdlib and typing_extensions only: the supervisor and the CLI's fast paths import it.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any, Literal, NotRequired, cast

from typing_extensions import get_type_hints, is_typeddict

from backprop_mcp.core.records import (
    ALL_STATES,
    SCHEMA_VERSION,
    RunRecord,
    RunRow,
    new_record,
    row_args,
    row_metrics,
)

# Fields without which a record says nothing usable about its run.
CORE_FIELDS: frozenset[str] = frozenset(
    {"schema_version", "run_id", "status", "attempt", "attempts", "script", "created_at"}
)
# Index rows need the fields `list` sorts, filters and shows by.
CORE_ROW_FIELDS: frozenset[str] = frozenset({"run_id", "status", "attempt", "created_at", "script"})
# The status of a listed run whose record this build cannot read (a newer schema, no permission).
UNKNOWN_STATUS = "unknown"
# Integers beyond this are not steps or counts but damage (and would overflow a float on display).
_MAX_INT = 2**63

_HINTS: dict[type, dict[str, tuple[Any, bool]]] = {}


class Invalid(ValueError):
    """What is wrong with a stored object, in words (one field named)."""


def _hints(shape: type) -> dict[str, tuple[Any, bool]]:
    """Each key's type and whether the key may be absent (NotRequired)."""
    if shape not in _HINTS:
        # With postponed annotations the TypedDict class cannot see NotRequired; the hints can.
        hints = get_type_hints(shape, include_extras=True)
        absent: Any = NotRequired  # a special form, which the type checker cannot compare
        _HINTS[shape] = {
            key: (typing.get_args(hint)[0], True) if typing.get_origin(hint) is absent else (hint, False)
            for key, hint in hints.items()
        }
    return _HINTS[shape]


def _describe(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if is_typeddict(hint):
        return "an object"
    origin = typing.get_origin(hint)
    if origin is list:
        return "a list"
    if origin is dict:
        return "an object"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string"}.get(
        hint, str(hint)
    )


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check(value: Any, hint: Any, where: str) -> Any:
    """`value` when it fits `hint` (with missing optional keys of nested shapes filled); else Invalid."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _check(value, arg, where)
            except Invalid:
                continue
    elif hint is type(None):
        if value is None:
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool) and -_MAX_INT < value < _MAX_INT:
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                if math.isfinite(float(value)):
                    return value
            except OverflowError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is Literal:
        if value in typing.get_args(hint):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(hint)
            return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            _, item = typing.get_args(hint)
            return {k: _check(v, item, f"{where}.{k}") for k, v in value.items() if isinstance(k, str)}
    elif is_typeddict(hint):
        if isinstance(value, dict):
            return _check_shape(value, hint, where, frozenset())
    else:  # pragma: no cover - a shape of records.py with a type this module does not know
        raise TypeError(f"cannot check {where} of type {hint!r}")
    raise Invalid(f"{where} must be {_describe(hint)}, got {_shown(value)}")


def _check_shape(data: dict[str, Any], shape: type, where: str, core: frozenset[str]) -> dict[str, Any]:
    """The known keys of `data`, checked; a missing one is filled when it may be None, else Invalid."""
    out: dict[str, Any] = {}
    prefix = f"{where}." if where else ""
    for key, (hint, optional) in _hints(shape).items():
        if key in data:
            out[key] = _check(data[key], hint, prefix + key)
        elif optional:
            continue
        elif key not in core and _admits_none(hint):
            out[key] = None
        else:
            raise Invalid(f"{prefix}{key} is missing")
    return out


def _admits_none(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def check_record(data: object) -> RunRecord:
    """A record of the current schema, checked (see the module's rule); Invalid says what is wrong."""
    if not isinstance(data, dict):
        raise Invalid("the record is not a JSON object")
    for key in sorted(CORE_FIELDS):
        if key not in data:
            raise Invalid(f"{key} is missing")
    if data["schema_version"] != SCHEMA_VERSION or isinstance(data["schema_version"], bool):
        raise Invalid(f"schema_version must be {SCHEMA_VERSION}, got {_shown(data['schema_version'])}")
    # The empty value of every non-core field, as the service would create it.
    empty = new_record(run_id="-", script="-", created_at="-")
    filled = {**{k: v for k, v in empty.items() if k not in CORE_FIELDS}, **data}
    record = cast(RunRecord, _check_shape(filled, RunRecord, "", CORE_FIELDS))
    if record["status"] not in ALL_STATES:
        raise Invalid(f"status must be one of {', '.join(ALL_STATES)}, got {_shown(record['status'])}")
    if record["attempt"] < 1 or not record["attempts"]:
        raise Invalid("a record needs attempt >= 1 and at least one entry in attempts")
    return record


def check_row(data: object, valid_id: typing.Callable[[str], bool]) -> RunRow:
    """An index row, checked; Invalid says what is wrong."""
    if not isinstance(data, dict):
        raise Invalid("the row is not a JSON object")
    row = cast(RunRow, _check_shape(data, RunRow, "", CORE_ROW_FIELDS))
    if not valid_id(row["run_id"]):
        raise Invalid(f"run_id {_shown(row['run_id'])} is not a valid run id")
    if row["status"] not in ALL_STATES and row["status"] != UNKNOWN_STATUS:
        raise Invalid(f"status {_shown(row['status'])} is not a state")
    return row


def stored_version(data: object) -> int | None:
    """The schema version a parsed record claims, when it claims a whole number."""
    if isinstance(data, dict):
        version = data.get("schema_version")
        if isinstance(version, int) and not isinstance(version, bool):
            return version
    return None


def salvage_row(data: object, run_id: str, created_at: str, note: str) -> RunRow:
    """A listing row for a run this build cannot read: what fits of its fields, status "unknown"."""
    fields = data if isinstance(data, dict) else {}
    row: dict[str, Any] = {}
    defaults: dict[str, Any] = {"attempt": 1, "created_at": created_at, "script": ""}
    defaults.update(args=[], metrics={})
    for key, (hint, _) in _hints(RunRow).items():
        try:
            row[key] = _check(fields[key], hint, key)
        except (KeyError, Invalid):
            row[key] = defaults.get(key)
    row.update(run_id=run_id, status=UNKNOWN_STATUS, note=note)
    # Bounded as `row_of` bounds them: the record may be a newer backprop's, with more of both.
    row.update(args=row_args(row.get("args") or []), metrics=row_metrics(row.get("metrics") or {}))
    return cast(RunRow, row)
