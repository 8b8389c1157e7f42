"""Fixtures shared by the test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from backprop_mcp.runs.service import Service
from tests.helpers import isolated_env

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
