"""Fixtures shared by the test suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

from backprop_mcp.runs.service import Service
from tests.helpers import isolated_env

if TYPE_CHECKING:
    from tests.ray_head import Head

# In CI, property tests run the same examples every time, so a build never fails by luck; on a
# developer's machine they explore new examples on every run.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An isolated environment: its own store, no user config, limits that admit runs."""
    return isolated_env(tmp_path / "home")


@pytest.fixture
def service(env: dict[str, str], tmp_path: Path) -> Service:
    """The real service over the isolated store, working in tmp_path."""
    return Service(Path(env["BACKPROP_HOME"]), env=env, cwd=tmp_path)


@pytest.fixture(scope="session")
def ray_head() -> Iterator[Head]:
    """One real Ray head for the whole test session, on loopback, on free ports, with its own temp
    folder; stopped (by its own processes) at the end. Skipped only where Ray is not installed."""
    if find_spec("ray") is None:
        pytest.skip(
            "Ray is not installed: pip install 'backprop-mcp[ray]' (ray[default]) to test the ray backend"
        )
    from tests.ray_head import start_head, stop_head

    head = start_head()
    try:
        yield head
    finally:
        stop_head(head)
