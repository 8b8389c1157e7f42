"""The parsers of setting values: numbers within a `Range`, flags, choices, signal names, GPU lists
and limits, folder lists, interpreter paths and run ids. Each takes a raw value (a string from a
file, a variable or the command line; a typed value from MCP) and the name of where it came from,
and returns the value or raises `ConfigError` naming that place. Stdlib only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

from backprop_mcp.core.errors import ConfigError

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")


def parse_number(value: object, where: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a number, got {json.dumps(value)}")
    if isinstance(value, str):
        text = value.strip()
        # float() also reads other scripts' digits (Arabic-Indic ten is 10.0); settings are ASCII.
        if not text.isascii():
            raise ConfigError(f"{where} must be a number written with ASCII digits, got {value!r}")
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if not isinstance(value, int | float) or not math.isfinite(_as_float(value)):
        raise ConfigError(f"{where} must be a finite number, got {show(value)}")
    return float(value)


def _as_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        return math.inf


def parse_whole(value: object, where: str, allowed: str) -> int:
    if isinstance(value, str):
        text = value.strip()
        # str.isdigit() alone accepts superscripts, which int() refuses, and other scripts' digits;
        # the length bound keeps int() below its digit limit.
        if text.isascii() and text.isdigit() and len(text) <= 30:
            value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        ascii_only = "" if not isinstance(value, str) or value.isascii() else " in ASCII digits"
        raise ConfigError(f"{where} must be {allowed}{ascii_only}, got {show(value)}")
    return value


def show(value: object) -> str:
    if isinstance(value, int) and value.bit_length() > 128:
        return "a number too large to show"
    try:
        return json.dumps(value)[:80]
    except (TypeError, ValueError):
        return repr(value)[:80]


def fmt(number: float) -> str:
    # Exponent form for the huge: str(int(1e308)) would print 309 digits.
    number = float(number)
    return str(int(number)) if number.is_integer() and abs(number) < 1e15 else repr(number)


class Range:
    """The allowed values of a numeric setting, and its parser. The one table of bounds: config
    files, environment variables, CLI options and stored options are checked by it, and the MCP
    tool schemas take their minimum and maximum from it, so no layer accepts what another refuses.
    """

    __slots__ = ("high", "high_open", "low", "low_open", "note", "optional", "whole")

    def __init__(
        self,
        low: float,
        high: float,
        *,
        low_open: bool = False,
        high_open: bool = False,
        whole: bool = False,
        optional: bool = False,
        note: str = "",
    ) -> None:
        self.low, self.high = low, high
        self.low_open = low_open  # True: `low` itself is not allowed (the value must be greater)
        self.high_open = high_open
        self.whole = whole
        self.optional = optional  # None is allowed: the setting's default rule applies
        self.note = note  # the maximum in words, for messages and docs ("7 days")

    def allows(self, number: float) -> bool:
        above = number > self.low if self.low_open else number >= self.low
        below = number < self.high if self.high_open else number <= self.high
        return above and below

    def describe(self) -> str:
        """The range in words, e.g. "> 0 and <= 10080 (7 days)"."""
        if self.whole and not (self.low_open or self.high_open):
            text = f"a whole number from {fmt(self.low)} to {fmt(self.high)}"
        else:
            low = f"{'>' if self.low_open else '>='} {fmt(self.low)}"
            text = f"{low} and {'<' if self.high_open else '<='} {fmt(self.high)}"
        return f"{text} ({self.note})" if self.note else text

    def __call__(self, value: object, where: str) -> Any:
        if value is None and self.optional:
            return None
        number = parse_whole(value, where, self.describe()) if self.whole else parse_number(value, where)
        if not self.allows(number):
            shown = show(number) if isinstance(number, int) else fmt(number)
            raise ConfigError(f"{where} must be {self.describe()}, got {shown}")
        return number


# The longest time box: a week. Longer jobs checkpoint and resume; the bound also keeps every
# deadline computed from it (epoch seconds, ISO dates) far inside what datetime can hold.
MAX_BOX_MINUTES = 7 * 24 * 60.0
MINUTES = Range(0, MAX_BOX_MINUTES, low_open=True, note="7 days")
# Degrees C: no GPU runs at 150 C; a higher limit would be no limit at all.
TEMPERATURE = Range(0, 150, low_open=True)


def parse_flag(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in (
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
    ):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise ConfigError(f"{where} must be true or false, got {show(value)}")


def choice(choices: tuple[str, ...]) -> Callable[[object, str], str]:
    def parse(value: object, where: str) -> str:
        if isinstance(value, str) and value.strip() in choices:
            return value.strip()
        raise ConfigError(f"{where} must be one of {', '.join(choices)}; got {show(value)}")

    return parse


def parse_stop_signal(value: object, where: str) -> str:
    if isinstance(value, str):
        name = value.strip().upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name in STOP_SIGNALS:
            return name
    raise ConfigError(f"{where} must be one of {', '.join(STOP_SIGNALS)}; got {show(value)}")


def parse_gpu_memory_limit(value: object, where: str) -> str | None:
    """'80%' (a share of the GPU) or a number of GB ('8', 8, '8GB')."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        text = value.strip().upper().removesuffix("GB").strip()
        try:
            if not text.isascii():  # float() would read other scripts' digits
                raise ValueError(text)
            if text.endswith("%"):
                share = float(text[:-1])
                if 0 < share <= 100:
                    return f"{fmt(share)}%"
            else:
                gb = float(text)
                if 0 < gb <= 4096 and math.isfinite(gb):
                    return fmt(gb)
        except ValueError:
            pass
    raise ConfigError(
        f'{where} must be a share like "80%" (0-100%) or a size in GB like "8" (at most 4096); '
        f"got {show(value)}"
    )


def parse_gpu_list(value: object, where: str) -> list[str] | None:
    if value is None:
        return None
    items: list[object]
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list):
        items = list(value)
    else:
        items = []
    result = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            result.append(str(item))
        elif isinstance(item, str) and (
            (item.isascii() and item.isdigit()) or item.startswith(("GPU-", "MIG-"))
        ):
            result.append(item)
        else:
            result = []
            break
    if not result:
        raise ConfigError(
            f'{where} must be GPU indices or UUIDs, comma-separated (e.g. "0,1" or "GPU-8f3a..."); '
            f"got {show(value)}"
        )
    return result


def parse_path_list(value: object, where: str) -> list[str] | None:
    if value is None:
        return None
    items: list[object]
    if isinstance(value, str):
        items = [part for part in value.split(os.pathsep) if part]
    elif isinstance(value, list):
        items = list(value)
    else:
        raise ConfigError(f"{where} must be a list of directories, got {show(value)}")
    paths = []
    for item in items:
        if not isinstance(item, str) or not item or "\0" in item:
            raise ConfigError(f"{where} must be a list of directory paths, got {show(item)}")
        paths.append(os.path.abspath(os.path.expanduser(item)))
    return paths


# A run's `snapshot` globs: a few patterns, each a short path relative to the working directory.
MAX_GLOBS = 32
MAX_GLOB_CHARS = 256


def parse_globs(value: object, where: str) -> list[str] | None:
    """Glob patterns relative to the working directory (`snapshot`), never leaving it: not
    absolute, no `..`; a string is split at os.pathsep (as in BACKPROP_SNAPSHOT)."""
    if value is None:
        return None
    items: list[object]
    if isinstance(value, str):
        items = [part for part in value.split(os.pathsep) if part.strip()]
    elif isinstance(value, list):
        items = list(value)
    else:
        raise ConfigError(
            f'{where} must be a list of glob patterns (e.g. ["*.py", "conf/*.yaml"]), got {show(value)}'
        )
    if len(items) > MAX_GLOBS:
        raise ConfigError(f"{where} takes at most {MAX_GLOBS} glob patterns, got {len(items)}")
    globs = []
    for item in items:
        ok = isinstance(item, str) and 0 < len(item.strip()) <= MAX_GLOB_CHARS and "\0" not in item
        text = item.strip() if isinstance(item, str) else ""
        parts = text.replace("\\", "/").split("/")
        if not ok or text.startswith(("/", "~")) or os.path.isabs(text) or ".." in parts:
            raise ConfigError(
                f"{where} must be glob patterns relative to the working directory, without '..' "
                f"(at most {MAX_GLOB_CHARS} characters each), got {show(item)}"
            )
        globs.append(text)
    return globs


def parse_python(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ConfigError(f"{where} must be the path of a Python interpreter, got {show(value)}")
    return value.strip()


def parse_text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ConfigError(f"{where} must be a non-empty string, got {show(value)}")
    return value.strip()


def parse_run_id(value: object, where: str) -> str:
    from backprop_mcp.core.errors import UsageError
    from backprop_mcp.core.ids import check_run_id

    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a run id string, got {show(value)}")
    try:
        return check_run_id(value)
    except UsageError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def parse_ray_address(value: object, where: str) -> str | None:
    """The address of a Ray cluster's Jobs API (its dashboard): http(s)://HOST:PORT, or HOST:PORT
    for http. `ray://` (Ray Client) and GCS addresses are not the Jobs API."""
    if value is None:
        return None
    allowed = "the Ray dashboard's address, like http://127.0.0.1:8265 (or 127.0.0.1:8265)"
    if (
        not isinstance(value, str)
        or not value.strip()
        or "\0" in value
        or any(c.isspace() for c in value.strip())
    ):
        raise ConfigError(f"{where} must be {allowed}; got {show(value)}")
    text = value.strip().rstrip("/")
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "http", text
    host, colon, port = rest.rpartition(":")
    if scheme not in ("http", "https") or not host or "/" in rest or not colon or not port.isdigit():
        raise ConfigError(f"{where} must be {allowed}; got {show(value)}")
    return f"{scheme}://{rest}"
