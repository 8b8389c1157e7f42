"""The `snapshot` globs' walk (runs/snapglob.py through runs/provenance.py): bounded by directory
entries looked at, never listing a folder outside the working directory, matching as Path.glob."""

from __future__ import annotations

from pathlib import Path

import pytest

from backprop_mcp.runs import provenance
from backprop_mcp.runs.snapglob import Walk


def globbed(cwd: Path, patterns: list[str], tmp_path: Path) -> tuple[list[str], list[str]]:
    """The paths the capture takes for `patterns` in `cwd`, and its notes."""
    folder = tmp_path / "capture"
    (folder / provenance.FILES_DIR).mkdir(parents=True)
    notes: list[str] = []
    budget = provenance._Budget(provenance.MIB)
    taken = provenance._globbed(cwd, patterns, folder, budget, set(), notes)
    return [file["path"] for file in taken], notes


def test_a_recursive_glob_stops_after_its_bound_of_directory_entries_even_when_nothing_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "project"
    data = cwd / "data" / "shards"
    data.mkdir(parents=True)
    for n in range(120):
        (data / f"shard-{n}.bin").write_bytes(b"")
    monkeypatch.setattr(provenance, "MAX_GLOB_ENTRIES", 50)

    taken, notes = globbed(cwd, ["**/*.yaml"], tmp_path)

    assert taken == []
    assert "'**/*.yaml': stopped after looking at 50 directory entries" in notes


def test_a_glob_through_a_symlinked_folder_that_leads_outside_never_names_what_lies_there(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret-name.yaml").write_text("token: 1\n", encoding="utf-8")
    cwd = tmp_path / "project"
    cwd.mkdir()
    (cwd / "ext").symlink_to(outside)
    (cwd / "conf.yaml").write_text("lr: 1\n", encoding="utf-8")

    taken, notes = globbed(cwd, ["ext/*.yaml", "*.yaml", "**/*.yaml"], tmp_path)

    assert taken == ["conf.yaml"]
    assert "ext: left out, it leads outside the working directory" in notes
    assert not [note for note in notes if "secret-name" in note]


@pytest.mark.parametrize(
    "pattern",
    ["*.py", "**/*.py", "conf/*.yaml", "**", "**/b.txt", "a/**/b.txt", ".hid*", "x?.py", "[ab].py", "a/c"],
)
def test_the_bounded_walk_matches_what_path_glob_matches(pattern: str, tmp_path: Path) -> None:
    cwd = tmp_path / "tree"
    for name in ["a.py", "b.py", "xy.py", ".hidden.py", "conf/m.yaml", "a/b.txt", "a/c/b.txt", "a/c/d/e.py"]:
        (cwd / name).parent.mkdir(parents=True, exist_ok=True)
        (cwd / name).write_text("x\n", encoding="utf-8")

    walked = sorted(Walk(cwd.resolve(), 1000).matches(cwd, pattern))

    assert walked == sorted(cwd.glob(pattern))
