"""Seeing and reusing what attempts ran (their provenance, `runs.provenance`): `show` (a run with
each attempt's code), `diff` (two attempts' scripts, snapshot files, arguments and options), and
the parts of `rerun` that pick an attempt's snapshot and place its copy in a new run's folder."""

from __future__ import annotations

import difflib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backprop_mcp.core import notebook
from backprop_mcp.core.answers import RunDiff, RunShow
from backprop_mcp.core.errors import UsageError
from backprop_mcp.core.ids import check_run_id
from backprop_mcp.core.provenance import CodeFile, Provenance, RerunRef
from backprop_mcp.core.records import RunRecord
from backprop_mcp.core.store import Store
from backprop_mcp.runs import provenance

# A run's folder that holds the snapshot a rerun runs (when the script changed since).
SOURCE_DIR = "source"
# The unified diff `diff` returns, in all: the edits of a few files, bounded for any pair.
MAX_DIFF_CHARS = 256 * 1024
# A file is diffed as text when it decodes as UTF-8 and holds no NUL byte.
Reader = Callable[[str], RunRecord]


def parse_ref(ref: str) -> tuple[str, int | None]:
    """RUN or RUN:ATTEMPT (a run id holds no ':')."""
    run_id, colon, number = ref.rpartition(":") if ":" in ref else (ref, "", "")
    if colon and not (number.isascii() and number.isdigit() and 0 < int(number) < 10**6):
        raise UsageError(f"{ref!r}: write a run and an attempt as RUN:N with N a whole number from 1")
    return check_run_id(run_id), int(number) if colon else None


def pick(get: Reader, ref: str) -> tuple[RunRecord, int]:
    """The run a reference names and its attempt (the current one unless named)."""
    run_id, attempt = parse_ref(ref)
    record = get(run_id)
    if attempt is None:
        return record, record["attempt"]
    if attempt > record["attempt"]:
        raise UsageError(f"run {run_id} has {record['attempt']} attempt(s); there is no attempt {attempt}")
    return record, attempt


def show(get: Reader, store: Store, run_id: str) -> RunShow:
    """A run's record and every attempt's provenance."""
    record = get(run_id)
    kept = (provenance.load(store, run_id, n) for n in range(1, record["attempt"] + 1))
    return RunShow(run=record, code=[p for p in kept if p is not None], notebook=notebook.read(store, run_id))


def diff(get: Reader, store: Store, ref_a: str, ref_b: str) -> RunDiff:
    """What differs between two attempts (RUN or RUN:N each)."""
    (rec_a, n_a), (rec_b, n_b) = pick(get, ref_a), pick(get, ref_b)
    prov_a, prov_b = (
        provenance.load(store, rec_a["run_id"], n_a),
        provenance.load(store, rec_b["run_id"], n_b),
    )
    answer = RunDiff(
        a=f"{rec_a['run_id']}:{n_a}",
        b=f"{rec_b['run_id']}:{n_b}",
        same=True,
        code_a=_attempt(rec_a, n_a).get("code"),
        code_b=_attempt(rec_b, n_b).get("code"),
        changed_files=[],
        diff="",
        options={},
        notes=[],
    )
    parts: list[str] = []
    for name, prov in ((answer["a"], prov_a), (answer["b"], prov_b)):
        if prov is None:
            answer["notes"].append(
                f"{name} kept no code snapshot (it never started, or ran before they were kept)"
            )
    if prov_a is not None and prov_b is not None:
        _diff_files(store, (rec_a["run_id"], prov_a), (rec_b["run_id"], prov_b), answer, parts)
    elif answer["a"] != answer["b"]:  # without both snapshots, only an attempt is its own same
        answer["same"] = False
    args_a, args_b = _of(rec_a, prov_a, "args"), _of(rec_b, prov_b, "args")
    if args_a != args_b:
        answer["same"] = False
        parts.extend(
            difflib.unified_diff(args_a, args_b, f"{answer['a']} args", f"{answer['b']} args", lineterm="")
        )
    options_a, options_b = _of(rec_a, prov_a, "options"), _of(rec_b, prov_b, "options")
    for key in sorted(set(options_a) | set(options_b)):
        one, two = options_a.get(key), options_b.get(key)
        if one != two:
            answer["options"][key] = [one, two]
            answer["same"] = False
    text = "\n".join(parts)
    if len(text) > MAX_DIFF_CHARS:
        text = text[:MAX_DIFF_CHARS] + f"\n... (cut at {MAX_DIFF_CHARS} characters)"
    answer["diff"] = text + ("\n" if text else "")
    return answer


def _attempt(record: RunRecord, n: int) -> Any:
    for summary in record["attempts"]:
        if summary["attempt"] == n:
            return summary
    return {}


def _of(record: RunRecord, kept: Provenance | None, key: str) -> Any:
    """An attempt's arguments or options: as its provenance kept them, else the record's (those
    of its current attempt)."""
    return kept[key] if kept is not None else record[key]  # type: ignore[literal-required]


def _diff_files(
    store: Store, a: tuple[str, Provenance], b: tuple[str, Provenance], answer: RunDiff, parts: list[str]
) -> None:
    (run_a, prov_a), (run_b, prov_b) = a, b
    folder_a = provenance.code_dir(store, run_a, prov_a["attempt"])
    folder_b = provenance.code_dir(store, run_b, prov_b["attempt"])
    # The scripts pair up whatever their names; snapshot files by their path.
    pairs: list[tuple[CodeFile | None, CodeFile | None]] = [(prov_a["script"], prov_b["script"])]
    files_a = {f["path"]: f for f in prov_a["files"]}
    files_b = {f["path"]: f for f in prov_b["files"]}
    pairs += [(files_a.get(p), files_b.get(p)) for p in dict.fromkeys([*files_a, *files_b])]
    for one, two in pairs:
        if one is None or two is None:
            side, only = (answer["a"], one) if one is not None else (answer["b"], two)
            answer["changed_files"].append(f"only in {side}: {only['path'] if only else '?'}")
            answer["same"] = False
            continue
        if one["sha256"] == two["sha256"] and one["sha256"] is not None:
            continue
        answer["same"] = False
        label = one["path"] if one["path"] == two["path"] else f"{one['path']} -> {two['path']}"
        answer["changed_files"].append(f"changed: {label}")
        text_a, text_b = _text(folder_a, one), _text(folder_b, two)
        if text_a is None or text_b is None:
            answer["notes"].append(f"{label}: not shown (not copied, or not text); its hashes differ")
            continue
        parts.extend(
            difflib.unified_diff(
                text_a, text_b, f"{answer['a']}/{one['path']}", f"{answer['b']}/{two['path']}", lineterm=""
            )
        )


def _text(folder: Path, file: CodeFile) -> list[str] | None:
    if not file["copied"]:
        return None
    try:
        raw = provenance.copy_path(folder, file).read_bytes()
    except OSError:
        return None
    if b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return None


# -- rerun ------------------------------------------------------------------------------------


def snapshot_of(get: Reader, store: Store, ref: str) -> tuple[RunRecord, int, Path | None]:
    """The run and attempt to rerun, and the folder of its copies to run from: None when the script
    on disk is still the one that attempt ran (the original path is run)."""
    record, attempt = pick(get, ref)
    kept = provenance.load(store, record["run_id"], attempt)
    name = f"{record['run_id']}:{attempt}"
    if kept is None:
        raise UsageError(
            f"{name} kept no code snapshot (it never started, or ran before snapshots were kept)",
            hint=f"`backprop resume {record['run_id']}` or a new `backprop run` of the script",
        )
    current = provenance.file_sha256(Path(record["script"]))
    if current == kept["script"]["sha256"]:
        return record, attempt, None
    if not kept["script"]["copied"]:
        raise UsageError(
            f"the script of {name} changed since, and its copy was not kept: "
            f"{kept['script'].get('note', 'not copied')}",
            hint="raise snapshot_max_mb (--snapshot-max-mb) for the runs you may want to rerun",
        )
    return record, attempt, provenance.code_dir(store, record["run_id"], attempt)


def adopt(store: Store, record: RunRecord, old: RunRecord, attempt: int, copies: Path | None) -> None:
    """Make a new run's record run the old attempt's snapshot (not written)."""
    # The original script, also through a rerun of a rerun: its folder stays on the path.
    origin = old["rerun_of"]["script"] if "rerun_of" in old else old["script"]
    record["rerun_of"] = RerunRef(run_id=old["run_id"], attempt=attempt, script=origin)
    if copies is None:
        return
    kept = provenance.load(store, old["run_id"], attempt)
    if kept is None:  # snapshot_of has just read it: only a store changing under us
        raise UsageError(f"the code snapshot of {old['run_id']}:{attempt} can no longer be read")
    copy = provenance.copy_path(copies, kept["script"])
    relative = copy.relative_to(copies / provenance.FILES_DIR)
    record["script"] = str(store.run_dir(record["run_id"]) / SOURCE_DIR / relative)


def place(store: Store, record: RunRecord, copies: Path | None) -> None:
    """Copy the old attempt's files (0600, folders 0700) into the new run's folder."""
    if copies is not None:
        shutil.copytree(copies / provenance.FILES_DIR, store.run_dir(record["run_id"]) / SOURCE_DIR)
