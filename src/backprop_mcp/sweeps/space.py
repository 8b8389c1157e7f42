"""The parameter space of a sweep: each parameter a list of values (a grid axis) or a distribution
written as a string (`uniform(a,b)`, `loguniform(a,b)`, `int(a,b)`, `intlog(a,b)`,
`choice(a,b,...)`), parsed and checked with errors that name what is allowed."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Literal, NamedTuple

from backprop_mcp.core.errors import UsageError

Value = str | int | float | bool
Params = dict[str, Value]
Kind = Literal["list", "uniform", "loguniform", "int", "intlog", "choice"]

DISTRIBUTIONS = ("uniform", "loguniform", "int", "intlog", "choice")
ALLOWED = (
    "a list of values (a grid axis), or one of uniform(a,b), loguniform(a,b), int(a,b), "
    "intlog(a,b), choice(a,b,...)"
)
# Bounds that keep a sweep's record and answers small: nobody sweeps more parameters or values.
MAX_PARAMS = 32
MAX_VALUES = 1000
MAX_GRID = 100_000
# A parameter becomes `--name value` on the script's command line: a flag-like identifier.
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_CALL_RE = re.compile(r"\s*([a-z]+)\s*\((.*)\)\s*", re.S)
MAX_STRING = 200


class Dimension(NamedTuple):
    """One parameter of the space."""

    name: str
    kind: Kind
    low: float = 0.0
    high: float = 0.0
    values: tuple[Value, ...] = ()

    @property
    def numeric(self) -> bool:
        """True when its values are numbers (for rank correlations)."""
        if self.kind in ("list", "choice"):
            return all(isinstance(v, int | float) and not isinstance(v, bool) for v in self.values)
        return True

    @property
    def discrete(self) -> bool:
        """True for a list or a choice: a finite set of values."""
        return self.kind in ("list", "choice")


def parse_space(params: object) -> list[Dimension]:
    """The space from `{name: [values] or "distribution(...)"}`; UsageError says what is wrong."""
    if not isinstance(params, Mapping) or not params:
        raise UsageError(f"params must map each parameter name to {ALLOWED}; got {_shown(params)}")
    if len(params) > MAX_PARAMS:
        raise UsageError(f"a sweep takes at most {MAX_PARAMS} parameters, got {len(params)}")
    return [_dimension(name, spec) for name, spec in params.items()]


def _dimension(name: object, spec: object) -> Dimension:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise UsageError(
            f"parameter name {_shown(name)} is not allowed: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or '_' (it becomes the script's --NAME argument)"
        )
    if isinstance(spec, list | tuple):
        return Dimension(name, "list", values=_values(name, list(spec)))
    if isinstance(spec, str):
        match = _CALL_RE.fullmatch(spec)
        if match is None or match.group(1) not in DISTRIBUTIONS:
            raise UsageError(
                f"parameter {name!r}: {_shown(spec)} is not a distribution; use {ALLOWED} "
                f'(a single value is a list of one: ["{spec[:40]}"])'
            )
        kind, inner = match.group(1), match.group(2)
        args = [a.strip() for a in inner.split(",")] if inner.strip() else []
        if kind == "choice":
            return Dimension(name, "choice", values=_values(name, [_scalar(a) for a in args]))
        return _ranged(name, kind, args, spec)
    raise UsageError(f"parameter {name!r}: {_shown(spec)} is not {ALLOWED}")


def _ranged(name: str, kind: str, args: list[str], spec: str) -> Dimension:
    if len(args) != 2:
        raise UsageError(f"parameter {name!r}: {kind} takes two bounds, as in {kind}(1,10); got {spec!r}")
    integer = kind in ("int", "intlog")
    try:
        low, high = (float(int(a)) if integer else float(a) for a in args)
    except ValueError:
        what = "whole numbers" if integer else "numbers"
        raise UsageError(f"parameter {name!r}: the bounds of {kind} must be {what}; got {spec!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        raise UsageError(f"parameter {name!r}: {kind}(a,b) needs finite bounds with a < b; got {spec!r}")
    if kind == "loguniform" and low <= 0:
        raise UsageError(f"parameter {name!r}: loguniform needs bounds above 0; got {spec!r}")
    if kind == "intlog" and low < 1:
        raise UsageError(f"parameter {name!r}: intlog needs bounds of at least 1; got {spec!r}")
    return Dimension(name, kind, low=low, high=high)  # type: ignore[arg-type]  # checked against DISTRIBUTIONS


def _values(name: str, values: list[object]) -> tuple[Value, ...]:
    if not values:
        raise UsageError(f"parameter {name!r} has no values; give at least one")
    if len(values) > MAX_VALUES:
        raise UsageError(f"parameter {name!r} has {len(values)} values; at most {MAX_VALUES} are allowed")
    out: list[Value] = []
    for value in values:
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"parameter {name!r}: {value!r} is not a finite number")
        if isinstance(value, str) and (len(value) > MAX_STRING or "\0" in value):
            raise UsageError(f"parameter {name!r}: a value must be at most {MAX_STRING} characters, no NUL")
        if not isinstance(value, str | int | float | bool):
            raise UsageError(
                f"parameter {name!r}: {_shown(value)} is not a value; values are numbers, strings or booleans"
            )
        out.append(value)
    return tuple(out)


def _scalar(text: str) -> Value:
    """A value written on a command line or in choice(...): a number when it reads as one."""
    text = text.strip()
    try:
        return int(text) if text.isascii() else text
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return {"true": True, "false": False}.get(text, text)
    return value if math.isfinite(value) else text


def parse_cli_param(text: str) -> tuple[str, object]:
    """`NAME=SPEC` from `--param`: SPEC a distribution, a JSON list, or values separated by commas."""
    name, sep, spec = text.partition("=")
    if not sep or not name.strip():
        raise UsageError(
            f"--param {text!r} must be NAME=VALUES or NAME=DISTRIBUTION, "
            "e.g. --param layers=1,2,3 or --param lr=loguniform(1e-4,1e-1)"
        )
    spec = spec.strip()
    if _CALL_RE.fullmatch(spec):
        return name.strip(), spec
    if spec.startswith("["):
        try:
            return name.strip(), json.loads(spec)
        except ValueError:
            raise UsageError(f"--param {text!r}: {spec!r} is not a JSON list") from None
    return name.strip(), [_scalar(part) for part in spec.split(",") if part.strip()]


def grid_size(space: list[Dimension]) -> int | None:
    """How many points the grid of a space has; None when a parameter is continuous."""
    size = 1
    for dim in space:
        if not dim.discrete:
            return None
        size *= len(dim.values)
    return size


def format_value(value: Value) -> str:
    """A value as the script's argument: numbers in their shortest exact form."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def trial_args(args: list[str], params: Params) -> list[str]:
    """The script's arguments for a trial: a template (any argument naming `{param}`) is filled
    in; otherwise `--name value` for each parameter is added after the sweep's own arguments."""
    if any("{" + name + "}" in arg for arg in args for name in params):
        filled = []
        for arg in args:
            text = arg
            for name, value in params.items():
                text = text.replace("{" + name + "}", format_value(value))
            filled.append(text)
        return filled
    extra = [part for name, value in params.items() for part in (f"--{name}", format_value(value))]
    return [*args, *extra]


def trial_name(name: str | None, number: int) -> str | None:
    """The run name of a sweep's trial: the sweep's name and the trial's number."""
    return f"{name} #{number}" if name else None


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
