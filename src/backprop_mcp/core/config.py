"""Layered configuration (DESIGN §7): defaults < user file < project file < BACKPROP_* env < options.

This module finds and reads the config files and merges the layers into `Settings`; what each
setting is, and how its values are checked, is the table in `settings` (built on `parsers`).
Stdlib only: the CLI's fast paths load config without paying for pydantic.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from backprop_mcp.core.errors import ConfigError
from backprop_mcp.core.parsers import show
from backprop_mcp.core.settings import FIELDS, FIELDS_BY_KEY, FIELDS_BY_NAME, RUN_DEFAULTS_BY_KEY, Settings

log = logging.getLogger(__name__)
PROJECT_FILES = ("backprop.config.json", ".backprop.json")
USER_FILE = "config.json"


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
                raise ConfigError(f"{label} must be an object with the keys {inner}; got {show(value)}")
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
