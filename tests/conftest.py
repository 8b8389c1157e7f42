"""Fixtures shared by the test suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

from backprop_mcp.runs.service import Service
from tests import helpers
from tests.helpers import isolated_env

if TYPE_CHECKING:
    from tests.ray_head import Head

# The repository's `git status` when the session started (None: not guarded).
_BEFORE = pytest.StashKey[set[str] | None]()

# Property tests check behaviour, not speed: no per-example deadline anywhere, since a loaded 2-core
# machine (CI, or several suites at once) can take seconds over an example that is not slow. A
# failure prints its reproduction blob (@reproduce_failure) so it can be replayed exactly.
# "dev" (the default) explores new examples on every run and keeps failures in .hypothesis/; "ci"
# runs the same examples every time (derandomize, no database), so a build never fails by luck.
# .ci/run chooses "ci" explicitly with HYPOTHESIS_PROFILE; no other variable (such as CI) decides.
settings.register_profile("dev", deadline=None, print_blob=True)
settings.register_profile("ci", deadline=None, print_blob=True, derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


REPO = Path(__file__).resolve().parents[1]


def _repo_changes() -> set[str] | None:
    """`git status --porcelain` of the repository (untracked and modified files); None where there
    is no git or no .git (an sdist, an unpacked archive): then nothing is guarded."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        return None
    done = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=REPO,
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=False,
    )
    return set(done.stdout.splitlines()) if done.returncode == 0 else None


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_BEFORE] = _repo_changes()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session when the tests left files in the repository (a fixture run with the
    repository as its working folder once wrote its checkpoint there, and it got committed)."""
    before = session.config.stash.get(_BEFORE, None)
    after = _repo_changes()
    if before is None or after is None:
        return
    left = sorted(after - before)
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "the tests left these files in the repository (run scripts in tmp_path):\n  " + (
            "\n  ".join(left)
        )
        if reporter is not None:
            reporter.write_sep("=", "files left in the repository", red=True)
            reporter.write_line(message, red=True)
        else:
            print(message, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    """Run each test in a folder of its own under the session's temp folder: a process a test
    starts without naming a working folder (a CLI call, a run whose script writes `ck.json` beside
    it) then writes there, never into the repository or another test's files. A hook, not an
    autouse fixture: Hypothesis refuses function-scoped fixtures around its property tests."""
    factory = item.config._tmp_path_factory  # type: ignore[attr-defined]  # pytest's own tmp_path source
    folder = factory.mktemp("cwd-" + item.name[:30].translate(str.maketrans("[]/:", "____")))
    before = os.getcwd()
    os.chdir(folder)
    try:
        return (yield)
    finally:
        os.chdir(before)


@pytest.fixture(scope="session", autouse=True)
def _session_root(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Scope the leftover-process checks of tests.helpers to this session's stores."""
    helpers.SESSION_ROOT = tmp_path_factory.getbasetemp()


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
