"""Layered configuration (DESIGN §7): defaults < user file < project file < BACKPROP_* env < options.

Each setting is declared once in `FIELDS`, with its seed-compatible file key, its environment
variable, its CLI option and its parser, so files, variables, CLI options and MCP arguments are
validated by the same code and their errors name the same things. Stdlib only: the CLI's fast
paths load config without paying for pydantic.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from backprop_mcp.core.errors import ConfigError

log = logging.getLogger(__name__)
PROJECT_FILES = ("backprop.config.json", ".backprop.json")
USER_FILE = "config.json"
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")
FRAMEWORK_CHOICES = ("auto", "pytorch", "tensorflow", "jax", "none")
PROBE_CHOICES = ("auto", "nvml", "nvidia-smi", "rocm", "none", "static")
# The wall-clock cap defaults to this multiple of the time box: a run may spend up to twice its
# box paused (hot GPU, busy machine) before it is stopped anyway.
WALL_CAP_MULTIPLE = 3.0


def _number(value: object, where: str) -> float:
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
        raise ConfigError(f"{where} must be a finite number, got {_show(value)}")
    return float(value)


def _as_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        return math.inf


def _whole(value: object, where: str, allowed: str) -> int:
    if isinstance(value, str):
        text = value.strip()
        # str.isdigit() alone accepts superscripts, which int() refuses, and other scripts' digits;
        # the length bound keeps int() below its digit limit.
        if text.isascii() and text.isdigit() and len(text) <= 30:
            value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        ascii_only = "" if not isinstance(value, str) or value.isascii() else " in ASCII digits"
        raise ConfigError(f"{where} must be {allowed}{ascii_only}, got {_show(value)}")
    return value


def _show(value: object) -> str:
    if isinstance(value, int) and value.bit_length() > 128:
        return "a number too large to show"
    try:
        return json.dumps(value)[:80]
    except (TypeError, ValueError):
        return repr(value)[:80]


def _fmt(number: float) -> str:
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
            text = f"a whole number from {_fmt(self.low)} to {_fmt(self.high)}"
        else:
            low = f"{'>' if self.low_open else '>='} {_fmt(self.low)}"
            text = f"{low} and {'<' if self.high_open else '<='} {_fmt(self.high)}"
        return f"{text} ({self.note})" if self.note else text

    def __call__(self, value: object, where: str) -> Any:
        if value is None and self.optional:
            return None
        number = _whole(value, where, self.describe()) if self.whole else _number(value, where)
        if not self.allows(number):
            shown = _show(number) if isinstance(number, int) else _fmt(number)
            raise ConfigError(f"{where} must be {self.describe()}, got {shown}")
        return number


# The longest time box: a week. Longer jobs checkpoint and resume; the bound also keeps every
# deadline computed from it (epoch seconds, ISO dates) far inside what datetime can hold.
MAX_BOX_MINUTES = 7 * 24 * 60.0
MINUTES = Range(0, MAX_BOX_MINUTES, low_open=True, note="7 days")
# Degrees C: no GPU runs at 150 C; a higher limit would be no limit at all.
TEMPERATURE = Range(0, 150, low_open=True)


def _flag(value: object, where: str) -> bool:
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
    raise ConfigError(f"{where} must be true or false, got {_show(value)}")


def _choice(choices: tuple[str, ...]) -> Callable[[object, str], str]:
    def parse(value: object, where: str) -> str:
        if isinstance(value, str) and value.strip() in choices:
            return value.strip()
        raise ConfigError(f"{where} must be one of {', '.join(choices)}; got {_show(value)}")

    return parse


def _stop_signal(value: object, where: str) -> str:
    if isinstance(value, str):
        name = value.strip().upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name in STOP_SIGNALS:
            return name
    raise ConfigError(f"{where} must be one of {', '.join(STOP_SIGNALS)}; got {_show(value)}")


def _gpu_memory_limit(value: object, where: str) -> str | None:
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
                    return f"{_fmt(share)}%"
            else:
                gb = float(text)
                if 0 < gb <= 4096 and math.isfinite(gb):
                    return _fmt(gb)
        except ValueError:
            pass
    raise ConfigError(
        f'{where} must be a share like "80%" (0-100%) or a size in GB like "8" (at most 4096); '
        f"got {_show(value)}"
    )


def _gpu_list(value: object, where: str) -> list[str] | None:
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
            f"got {_show(value)}"
        )
    return result


def _path_list(value: object, where: str) -> list[str] | None:
    if value is None:
        return None
    items: list[object]
    if isinstance(value, str):
        items = [part for part in value.split(os.pathsep) if part]
    elif isinstance(value, list):
        items = list(value)
    else:
        raise ConfigError(f"{where} must be a list of directories, got {_show(value)}")
    paths = []
    for item in items:
        if not isinstance(item, str) or not item or "\0" in item:
            raise ConfigError(f"{where} must be a list of directory paths, got {_show(item)}")
        paths.append(os.path.abspath(os.path.expanduser(item)))
    return paths


def _python(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ConfigError(f"{where} must be the path of a Python interpreter, got {_show(value)}")
    return value.strip()


class Field(NamedTuple):
    """One setting: where it may be given and how it is checked."""

    name: str
    key: str  # key in config files; dotted for nested objects (the seed's "gpu.maxTempC")
    env: str
    option: str
    parse: Callable[[object, str], Any]
    help: str

    @property
    def bounds(self) -> Range | None:
        """The allowed range of a numeric setting (None for the others)."""
        return self.parse if isinstance(self.parse, Range) else None


FIELDS: tuple[Field, ...] = (
    Field(
        "max_run_minutes",
        "maxRunMinutes",
        "BACKPROP_MAX_RUN_MINUTES",
        "--max-run-minutes",
        MINUTES,
        "time box in minutes of running time (default 10)",
    ),
    Field(
        "max_wall_minutes",
        "maxWallMinutes",
        "BACKPROP_MAX_WALL_MINUTES",
        "--max-wall-minutes",
        Range(
            0,
            MAX_BOX_MINUTES * WALL_CAP_MULTIPLE,
            low_open=True,
            optional=True,
            note="21 days: 3x the longest box",
        ),
        f"wall-clock cap including paused time (default {_fmt(WALL_CAP_MULTIPLE)}x the box)",
    ),
    Field(
        "framework",
        "framework",
        "BACKPROP_FRAMEWORK_DEFAULT",
        "--framework",
        _choice(FRAMEWORK_CHOICES),
        "pytorch, tensorflow, jax, none or auto (read from the script's imports)",
    ),
    Field(
        "checkpoint_every_minutes",
        "checkpointEveryMinutes",
        "BACKPROP_CHECKPOINT_EVERY_MINUTES",
        "--checkpoint-every-minutes",
        MINUTES,
        "checkpoint interval suggested to the script (default 2)",
    ),
    Field(
        "gpu_memory_limit",
        "gpuMemoryLimit",
        "BACKPROP_GPU_MEMORY_LIMIT",
        "--gpu-memory-limit",
        _gpu_memory_limit,
        'GPU memory limit: "80%" of the GPU or a size in GB',
    ),
    Field(
        "max_parallel",
        "maxParallel",
        "BACKPROP_MAX_PARALLEL",
        "--max-parallel",
        Range(1, 1024, whole=True),
        "most runs live at once on this machine (default 2)",
    ),
    Field(
        "min_free_ram_gb",
        "minFreeRamGB",
        "BACKPROP_MIN_FREE_RAM_GB",
        "--min-free-ram",
        Range(0, 65536, note="64 TB"),
        "free RAM needed to start, GB (default 4)",
    ),
    Field(
        "max_cpu_percent",
        "maxCpuPercent",
        "BACKPROP_MAX_CPU_PERCENT",
        "--max-cpu-percent",
        Range(0, 100, low_open=True, note="a percentage"),
        "highest machine CPU load to start or keep running, percent (default 90)",
    ),
    Field(
        "gpu_probe",
        "gpu.probe",
        "BACKPROP_GPU_PROBE",
        "--gpu-probe",
        _choice(PROBE_CHOICES),
        "GPU probe: auto, nvml, nvidia-smi, rocm (AMD, rocm-smi), none or static",
    ),
    Field(
        "gpu_min_free_vram_mb",
        "gpu.minFreeVramMB",
        "BACKPROP_GPU_MIN_VRAM_MB",
        "--gpu-min-vram",
        Range(0, 1048576, note="1 TB"),
        "free VRAM a GPU needs, MB (default 2500)",
    ),
    Field(
        "gpu_max_temp_c",
        "gpu.maxTempC",
        "BACKPROP_GPU_MAX_TEMP_C",
        "--gpu-max-temp",
        TEMPERATURE,
        "GPU temperature limit, C (default 85)",
    ),
    Field(
        "gpu_resume_below_c",
        "gpu.resumeBelowC",
        "BACKPROP_GPU_RESUME_BELOW_C",
        "--gpu-resume-below",
        Range(0, 150),
        "a paused run resumes this many degrees below the limit (default 5)",
    ),
    Field(
        "gpus",
        "gpu.devices",
        "BACKPROP_GPUS",
        "--gpus",
        _gpu_list,
        "GPUs the run may use: indices or UUIDs (default all)",
    ),
    Field(
        "use_gpu",
        "gpu.enabled",
        "BACKPROP_USE_GPU",
        "--no-gpu",
        _flag,
        "false runs on CPU only and skips GPU rules (default true)",
    ),
    Field(
        "grace_seconds",
        "graceSeconds",
        "BACKPROP_GRACE_SECONDS",
        "--grace-seconds",
        Range(0, 3600, note="1 hour"),
        "seconds between the stop signal and SIGTERM (default 30)",
    ),
    Field(
        "stop_signal",
        "stopSignal",
        "BACKPROP_STOP_SIGNAL_DEFAULT",
        "--stop-signal",
        _stop_signal,
        f"first signal at the deadline: {', '.join(STOP_SIGNALS)} (default SIGINT)",
    ),
    Field(
        "queue",
        "queue",
        "BACKPROP_QUEUE",
        "--no-queue",
        _flag,
        "wait in the queue when the machine is busy (default true)",
    ),
    Field(
        "queue_timeout_minutes",
        "queueTimeoutMinutes",
        "BACKPROP_QUEUE_TIMEOUT_MINUTES",
        "--queue-timeout",
        MINUTES,
        "longest wait in the queue, minutes (default 60)",
    ),
    Field(
        "argv_compat",
        "argvCompat",
        "BACKPROP_ARGV_COMPAT",
        "--argv-compat",
        _flag,
        "also pass the seed's argv flags to the script (default false)",
    ),
    Field(
        "python",
        "python",
        "BACKPROP_PYTHON",
        "--python",
        _python,
        "interpreter for scripts (default: active virtualenv, else backprop's own)",
    ),
    Field(
        "allowed_roots",
        "allowedRoots",
        "BACKPROP_ALLOWED_ROOTS",
        "--root",
        _path_list,
        "directories scripts must lie in (MCP server; os.pathsep-separated in the variable)",
    ),
)
FIELDS_BY_NAME = {f.name: f for f in FIELDS}
FIELDS_BY_KEY = {f.key: f for f in FIELDS}


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ConfigError(f"{where} must be a non-empty string, got {_show(value)}")
    return value.strip()


def _run_id(value: object, where: str) -> str:
    from backprop_mcp.core.errors import UsageError
    from backprop_mcp.core.store import check_run_id

    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a run id string, got {_show(value)}")
    try:
        return check_run_id(value)
    except UsageError as exc:
        raise ConfigError(f"{where}: {exc}") from None


class FileKey(NamedTuple):
    """A seed key that only config files set: a default for one argument of `backprop run`."""

    name: str
    key: str
    parse: Callable[[object, str], str]
    is_path: bool  # resolved against the folder of the file that sets it
    help: str


RUN_DEFAULTS: tuple[FileKey, ...] = (
    FileKey(
        "default_script",
        "trainingScriptPath",
        _text,
        True,
        "the script `backprop run` starts when none is given",
    ),
    FileKey("default_run_id", "runId", _run_id, False, "the run id of `backprop run` without --run-id"),
    FileKey(
        "default_resume_from",
        "resumeFrom",
        _text,
        True,
        "the checkpoint of `backprop run` without --resume-from",
    ),
)
RUN_DEFAULTS_BY_KEY = {k.key: k for k in RUN_DEFAULTS}
# Settings that are not run options: never stored with a run, never taken from a stored run.
_NOT_OPTIONS = frozenset({"sources", *(k.name for k in RUN_DEFAULTS)})


# NamedTuples rather than dataclasses here and in the other modules on the CLI's fast paths:
# importing `dataclasses` pulls in `inspect`, ~15 ms of every `backprop status`.
class Settings(NamedTuple):
    """The effective settings of one call (immutable)."""

    max_run_minutes: float = 10.0
    max_wall_minutes: float | None = None
    framework: str = "auto"
    checkpoint_every_minutes: float = 2.0
    gpu_memory_limit: str | None = None
    max_parallel: int = 2
    min_free_ram_gb: float = 4.0
    max_cpu_percent: float = 90.0
    gpu_probe: str = "auto"
    gpu_min_free_vram_mb: float = 2500.0
    gpu_max_temp_c: float = 85.0
    gpu_resume_below_c: float = 5.0
    gpus: list[str] | None = None
    use_gpu: bool = True
    grace_seconds: float = 30.0
    stop_signal: str = "SIGINT"
    queue: bool = True
    queue_timeout_minutes: float = 60.0
    argv_compat: bool = False
    python: str | None = None
    allowed_roots: list[str] | None = None
    default_script: str | None = None
    """`trainingScriptPath` (absolute): what `backprop run` starts when no script is given."""
    default_run_id: str | None = None
    """`runId`: the run id of `backprop run` without --run-id."""
    default_resume_from: str | None = None
    """`resumeFrom` (absolute): the checkpoint of `backprop run` without --resume-from."""
    sources: tuple[str, ...] = ()
    """Config files read, lowest precedence first."""

    @property
    def wall_minutes(self) -> float:
        """The wall-clock cap in effect."""
        return self.max_wall_minutes or self.max_run_minutes * WALL_CAP_MULTIPLE

    def as_options(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (stored in the run record)."""
        return {name: getattr(self, name) for name in self._fields if name not in _NOT_OPTIONS}


def user_config_path(env: Mapping[str, str]) -> Path:
    """The user's config file (BACKPROP_CONFIG overrides the platform location)."""
    if env.get("BACKPROP_CONFIG"):
        return Path(env["BACKPROP_CONFIG"])
    import platformdirs

    return Path(platformdirs.user_config_dir("backprop-mcp", appauthor=False)) / USER_FILE


def find_project_file(start: Path) -> Path | None:
    """The nearest backprop.config.json (or .backprop.json) from `start` upward."""
    for folder in (start, *start.parents):
        for name in PROJECT_FILES:
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


def read_file(path: Path) -> dict[str, Any]:
    """Parse and validate one config file into field values."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; a config file is a JSON object") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except ValueError:  # an integer beyond Python's digit limit
        raise ConfigError(f"{path}: not valid JSON (a number with too many digits)") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: must be a JSON object like {{"maxRunMinutes": 10}}')
    values: dict[str, Any] = {}
    _flatten(data, "", path, values)
    return values


def _flatten(data: dict[str, Any], prefix: str, path: Path, out: dict[str, Any]) -> None:
    for raw_key, value in data.items():
        key = f"{prefix}{raw_key}"
        label = f'{path}: key "{key}"'
        if key in FIELDS_BY_KEY:
            spec = FIELDS_BY_KEY[key]
            out[spec.name] = spec.parse(value, label)
        elif key in RUN_DEFAULTS_BY_KEY:
            seed = RUN_DEFAULTS_BY_KEY[key]
            parsed = seed.parse(value, label)
            out[seed.name] = (
                os.path.abspath(os.path.join(path.parent, os.path.expanduser(parsed)))
                if seed.is_path
                else parsed
            )
        elif any(k.startswith(f"{key}.") for k in FIELDS_BY_KEY):
            if not isinstance(value, dict):
                inner = ", ".join(k[len(key) + 1 :] for k in FIELDS_BY_KEY if k.startswith(f"{key}."))
                raise ConfigError(f"{label} must be an object with the keys {inner}; got {_show(value)}")
            _flatten(value, f"{key}.", path, out)
        elif key.startswith("$") or key == "comment":
            continue  # "$schema" and comments are allowed and ignored
        else:
            _warn_unknown(path, key, prefix)


def file_keys() -> list[str]:
    """Every key a config file may set, nested ones dotted."""
    return [*FIELDS_BY_KEY, *RUN_DEFAULTS_BY_KEY]


def _warn_unknown(path: Path, key: str, prefix: str) -> None:
    # Like the seed, an unknown key is ignored rather than refusing the whole file (a key of a
    # newer version, a typo): the warning names it and the likely intended key. Logged, so the
    # CLI prints it on stderr and the MCP server's stdout carries only the protocol.
    close = difflib.get_close_matches(key, file_keys(), n=1, cutoff=0.75)
    if close:
        hint = f'did you mean "{close[0]}"?'
    else:
        allowed = [k for k in file_keys() if k.startswith(prefix)]
        hint = f"allowed keys are {', '.join(allowed)}"
    message = f'{path}: unknown key "{key}" ignored; {hint}'
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


_warned: set[str] = set()


def from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """Field values given as BACKPROP_* environment variables."""
    values: dict[str, Any] = {}
    for spec in FIELDS:
        raw = env.get(spec.env)
        if raw is not None and raw != "":
            values[spec.name] = spec.parse(raw, f"environment variable {spec.env}")
    return values


def parse_overrides(options: Mapping[str, object], source: str) -> dict[str, Any]:
    """Validate call options (CLI options or MCP arguments) given by field name."""
    values: dict[str, Any] = {}
    for name, raw in options.items():
        if raw is None:
            continue
        spec = FIELDS_BY_NAME.get(name)
        if spec is None:
            raise ConfigError(f"unknown {source} {name!r}")
        label = f"option {spec.option}" if source == "option" else f"{source} {name}"
        values[name] = spec.parse(raw, label)
    return values


def load_settings(
    cwd: Path,
    env: Mapping[str, str],
    options: Mapping[str, object] | None = None,
    *,
    source: str = "option",
    base: Mapping[str, object] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Merge every layer into Settings. `base` (already-valid values, e.g. a stored run's options)
    sits between the environment and the call's own options. `config_file` (`--config`) takes the
    place of the project file found from `cwd`."""
    return resolve_settings(cwd, env, options, source=source, base=base, config_file=config_file)[0]


def resolve_settings(
    cwd: Path,
    env: Mapping[str, str],
    options: Mapping[str, object] | None = None,
    *,
    source: str = "option",
    base: Mapping[str, object] | None = None,
    config_file: Path | None = None,
) -> tuple[Settings, dict[str, str]]:
    """`load_settings`, with where each setting that is not a default came from (for --verbose)."""
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    sources: list[str] = []

    def layer(values: Mapping[str, Any], origin: Callable[[str], str]) -> None:
        merged.update(values)
        origins.update({name: origin(name) for name in values})

    user = user_config_path(env)
    if user.is_file():
        layer(read_file(user), lambda _: f"user file {user}")
        sources.append(str(user))
    project = config_file if config_file is not None else find_project_file(cwd)
    if project is not None:
        kind = "--config file" if config_file is not None else "project file"
        layer(read_file(project), lambda _: f"{kind} {project}")
        sources.append(str(project))
    layer(from_env(env), lambda name: f"environment variable {FIELDS_BY_NAME[name].env}")
    if base:
        # A stored run's options are checked again: a record from a version with wider ranges
        # must not carry a value past today's bounds into a new attempt.
        stored = {
            name: None if value is None else FIELDS_BY_NAME[name].parse(value, f"the run's stored {name}")
            for name, value in base.items()
            if name in FIELDS_BY_NAME and (options or {}).get(name) is None
        }
        layer(stored, lambda _: "stored with the run")
    if options:
        overrides = parse_overrides(options, source)
        layer(
            overrides,
            lambda name: (
                f"option {FIELDS_BY_NAME[name].option}" if source == "option" else f"{source} {name}"
            ),
        )
    return Settings()._replace(**merged, sources=tuple(sources)), origins


def signal_number(name: str) -> int:
    """The number of a validated stop signal name."""
    return int(getattr(signal, name))
