"""Fixtures shared by the test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from backprop_mcp.service import Service
from tests.helpers import isolated_env


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An isolated environment: its own store, no user config, limits that admit runs."""
    return isolated_env(tmp_path / "home")


@pytest.fixture
def service(env: dict[str, str], tmp_path: Path) -> Service:
    """The real service over the isolated store, working in tmp_path."""
    return Service(Path(env["BACKPROP_HOME"]), env=env, cwd=tmp_path)
