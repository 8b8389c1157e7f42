"""The lab notebook (issue 16, point 4): notes and tags over the CLI and over real MCP stdio, the tag
filter of `list` and `list_experiments`, sweeps whose trials inherit their tags, the bounds and
their errors, and concurrent writers (many processes and a live run's supervisor) losing nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from backprop_mcp.core import notebook
from backprop_mcp.core.errors import RunNotFound, UsageError
from backprop_mcp.runs.requests import RunRequest
from backprop_mcp.runs.service import Service
from tests.helpers import FIXTURES, WAIT_SECONDS, cli, cli_json, unique_id, wait_for_end, wait_until
from tests.test_mcp_stdio import server_command, server_env
from tests.test_mcp_tools import GENEROUS, call, fails, wait_end, write_script

QUICK = str(FIXTURES / "counts_and_exits.py")
# Concurrent writers: processes, and notes each one appends.
WRITERS, NOTES_EACH = 8, 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def ended_run(env: dict[str, str], tmp_path: Path, *extra: str) -> str:
    run_id = unique("nb")
    done = cli(env, "run", QUICK, "--run-id", run_id, *extra, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return run_id


def listed(env: dict[str, str], *args: str) -> list[str]:
    return [row["run_id"] for row in cli_json(env, "list", *args)["runs"]]


def test_notes_and_tags_from_the_cli_are_kept_with_time_and_source_and_filter_the_list(
    env: dict[str, str], tmp_path: Path
) -> None:
    tagged = ended_run(
        env, tmp_path, "--tag", "baseline", "--tag", "lr=0.1", "--note", "lr 0.1 should diverge"
    )
    plain = ended_run(env, tmp_path)
    done = cli(env, "note", tagged, "it did not\ndiverge", "--tag", "surprise", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 note(s); tags: baseline, lr=0.1, surprise" in done.stdout
    book = cli_json(env, "note", tagged)
    assert book["tags"] == ["baseline", "lr=0.1", "surprise"]
    assert [(n["source"], n["text"]) for n in book["notes"]] == [
        ("cli", "lr 0.1 should diverge"),
        ("cli", "it did not\ndiverge"),
    ]
    assert all(n["at"].endswith("Z") and n["at"][10] == "T" for n in book["notes"])
    assert cli_json(env, "tag", tagged, "lr=0.1", "--remove")["tags"] == ["baseline", "surprise"]

    assert listed(env, "--tag", "baseline") == [tagged]
    assert listed(env, "--tag", "baseline", "--tag", "surprise") == [tagged]  # all of them
    assert listed(env, "--tag", "baseline", "--tag", "lr=0.1") == []
    assert set(listed(env)) == {tagged, plain}
    rows = {row["run_id"]: row for row in cli_json(env, "list")["runs"]}
    assert rows[tagged]["tags"] == ["baseline", "surprise"] and "tags" not in rows[plain]
    table = cli(env, "list", cwd=tmp_path).stdout
    assert "TAGS" in table and "baseline,surprise" in table

    status = cli(env, "status", tagged, cwd=tmp_path).stdout
    assert "tags       baseline, surprise" in status
    assert "cli: it did not" in status and "diverge" in status
    text = cli(env, "note", tagged, cwd=tmp_path).stdout
    assert text.startswith("tags: baseline, surprise\n") and "cli: lr 0.1 should diverge" in text
    # `show`, everything about a run, ends with its whole notebook.
    shown = cli(env, "show", tagged, cwd=tmp_path).stdout
    assert shown.rstrip("\n").endswith(text.rstrip("\n"))
    assert cli_json(env, "show", tagged)["notebook"] == cli_json(env, "note", tagged)


def test_bad_notes_and_tags_are_refused_clearly_and_change_nothing(
    env: dict[str, str], tmp_path: Path
) -> None:
    run_id = ended_run(env, tmp_path)
    cases = [
        (["note", run_id, "x" * 2001], "at most 2000 characters; this one has 2001"),
        (["note", run_id, "   "], "non-empty"),
        (["note", run_id, "bell \x07"], "control characters"),
        (["tag", run_id, "has space"], "invalid tag 'has space'"),
        (["tag", run_id, "x" * 65], "1 to 64 letters"),
        (["note", "no-such-run", "a note"], "no run with id 'no-such-run'"),
        (["note", "../evil", "a note"], "invalid run id"),
        (["list", "--tag", "bad/tag"], "invalid tag 'bad/tag'"),
        (["run", QUICK, "--run-id", unique("never"), "--tag", "no good"], "invalid tag 'no good'"),
    ]
    for args, says in cases:
        done = cli(env, *args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert says in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
    assert cli_json(env, "note", run_id) == {"run_id": run_id, "tags": [], "notes": []}
    assert len(listed(env)) == 1  # the refused run was never created


def test_a_run_keeps_at_most_32_tags_and_200_notes_and_says_so(service: Service, tmp_path: Path) -> None:
    record = service.start(RunRequest(script=QUICK, run_id=unique("bounds")))
    run_id = record["run_id"]
    service.annotate(run_id, tags=[f"t{i}" for i in range(notebook.MAX_TAGS)])
    with pytest.raises(UsageError, match="at most 32 tags"):
        service.annotate(run_id, tags=["one-more"])
    service.annotate(run_id, tags=["t0"])  # already there: no more than before
    service.annotate(run_id, untag=["t0"])
    assert service.annotate(run_id, tags=["one-more"])["tags"][-1] == "one-more"
    for i in range(notebook.MAX_NOTES):
        service.annotate(run_id, note=f"note {i}")
    with pytest.raises(UsageError, match="has 200 notes"):
        service.annotate(run_id, note="one too many")
    book = service.notebook(run_id)
    assert len(book["notes"]) == 200 and book["notes"][-1]["text"] == "note 199"
    with pytest.raises(RunNotFound):
        service.notebook("nobody-here")
    wait_for_end(service, run_id)


_WRITER = """
import sys
from pathlib import Path
from backprop_mcp.runs.service import Service
service = Service(Path(sys.argv[1]))
run_id, me, count = sys.argv[2], sys.argv[3], int(sys.argv[4])
for i in range(count):
    service.annotate(run_id, note=f"{me} {i}", tags=[f"{me}-{i % 2}"], untag=[f"{me}-{1 - i % 2}"])
"""


def test_many_processes_noting_a_live_run_while_its_supervisor_writes_lose_nothing(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    gate, steps = tmp_path / "gate", tmp_path / "steps"
    record = service.start(
        RunRequest(
            script=str(FIXTURES / "trains_until_told_to_finish.py"),
            args=[str(steps), str(gate)],
            run_id=unique("busy"),
            tags=["live"],
        )
    )
    run_id = record["run_id"]
    wait_until(lambda: service.get(run_id)["step"], what="the run's first steps")
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, env["BACKPROP_HOME"], run_id, f"w{n}", str(NOTES_EACH)],
            env=env,
            stderr=subprocess.PIPE,
        )
        for n in range(WRITERS)
    ]
    for writer in writers:
        _, err = writer.communicate(timeout=WAIT_SECONDS * 2)
        assert writer.returncode == 0, err
    steps_while_noting = service.get(run_id)["step"]
    gate.touch()
    assert wait_for_end(service, run_id)["status"] == "completed"
    assert (steps_while_noting or 0) > 0

    book = service.notebook(run_id)
    texts = [n["text"] for n in book["notes"]]
    assert sorted(texts) == sorted(f"w{n} {i}" for n in range(WRITERS) for i in range(NOTES_EACH))
    for n in range(WRITERS):  # each writer's notes in its own order
        mine = [int(t.split()[1]) for t in texts if t.startswith(f"w{n} ")]
        assert mine == sorted(mine)
    # Each writer's last change added w<n>-1 and removed w<n>-0; the start's tag is still there.
    assert sorted(book["tags"]) == sorted(["live", *(f"w{n}-1" for n in range(WRITERS))])
    assert listed(env, "--tag", "w3-1", "--tag", "live") == [run_id]
    assert listed(env, "--tag", "w3-0") == []


def test_the_tag_index_is_rebuilt_from_the_notebooks_and_ignores_an_earlier_run_of_the_same_id(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    run_id = unique("again")
    service.start(RunRequest(script=QUICK, run_id=run_id, tags=["old"]))
    wait_for_end(service, run_id)
    # The run is gone (as a failed start removes one) and its id taken again, untagged.
    shutil.rmtree(service.store.run_dir(run_id))
    service.store.rebuild_index()
    service.store.home.joinpath(notebook.TAG_INDEX_FILE).write_text(
        json.dumps({"run_id": run_id, "created_at": "2020-01-01T00:00:00.000Z", "tags": ["old"]}) + "\n",
        encoding="utf-8",
    )
    service.start(RunRequest(script=QUICK, run_id=run_id))
    wait_for_end(service, run_id)
    assert listed(env, "--tag", "old") == []
    service.annotate(run_id, tags=["new"])
    # A stale tag index (a crash between the notebook and the index) is put right with the run
    # index, when a bad line makes the listing rebuild that.
    tag_index = service.store.home / notebook.TAG_INDEX_FILE
    with tag_index.open("a", encoding="utf-8") as stale:
        stale.write(
            json.dumps({"run_id": run_id, "created_at": service.get(run_id)["created_at"], "tags": []})
        )
        stale.write("\n")
    assert listed(env, "--tag", "new") == []
    with service.store.index_path.open("a", encoding="utf-8") as index:
        index.write("not json\n")
    assert listed(env, "--tag", "new") == [run_id]
    # The tag index lost: the next listing builds it again from the notebooks...
    tag_index.unlink()
    assert listed(env, "--tag", "new") == [run_id]
    assert tag_index.exists()
    # ...and with the run index, when both are lost.
    service.store.index_path.unlink()
    tag_index.unlink()
    assert listed(env, "--tag", "new") == [run_id]


def test_a_sweeps_trials_start_with_its_tags_and_note(env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "BACKPROP_SWEEP_POLL_SECONDS": "0.05"}
    tag = unique("sweep")
    done = cli(
        env,
        "sweep",
        str(FIXTURES / "scores_its_params.py"),
        "--param",
        "x=0.1,0.3",
        "--tag",
        tag,
        "--note",
        "x near 0.3 wins",
        "--json",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    trials = [t["run_id"] for t in json.loads(done.stdout)["trials"]]
    assert len(trials) == 2
    assert sorted(listed(env, "--tag", tag)) == sorted(trials)
    for trial in trials:
        assert [n["text"] for n in cli_json(env, "note", trial)["notes"]] == ["x near 0.3 wins"]


@pytest.mark.anyio
async def test_over_mcp_stdio_an_agent_notes_its_hypothesis_tags_runs_and_finds_them_by_tag(
    tmp_path: Path,
) -> None:
    project = tmp_path / "project"
    write_script(project)
    command, *args = server_command()
    params = StdioServerParameters(
        command=command, args=[*args, "--root", str(project)], env=server_env(tmp_path), cwd=tmp_path
    )
    with anyio.fail_after(WAIT_SECONDS * 3):
        async with Client(params, mode="legacy") as client:
            assert "annotate_run" in (client.instructions or "")
            options: dict[str, Any] = {**GENEROUS["options"], "tags": ["baseline"], "note": "3 steps suffice"}
            started = await call(client, "run_training", script="train.py", args=["3"], options=options)
            run_id = started["run_id"]
            other = (await call(client, "run_training", script="train.py", args=["3"], **GENEROUS))["run_id"]
            assert (await wait_end(client, run_id))["status"] == "completed"
            await wait_end(client, other)

            noted = await call(
                client, "annotate_run", run_id=run_id, note="it did", tags=["good", "-baseline"]
            )
            assert noted == {"run_id": run_id, "tags": ["good"], "notes": 2}
            status = await call(client, "get_status", run_id=run_id)
            assert status["tags"] == ["good"] and "notes" not in status
            detail = await call(client, "get_status", run_id=run_id, detail=True)
            assert [(n["source"], n["text"]) for n in detail["notes"]] == [
                ("mcp", "3 steps suffice"),
                ("mcp", "it did"),
            ]
            page = await call(client, "list_experiments", tag="good")
            assert [(row["run_id"], row["tags"]) for row in page["runs"]] == [(run_id, ["good"])]
            assert (await call(client, "list_experiments", tag="baseline"))["runs"] == []

            said = await fails(client, "annotate_run", run_id=run_id, tags=["no good"])
            assert "invalid tag 'no good'" in said
            ghost = unique_id("never-was")
            said = await fails(client, "annotate_run", run_id=ghost, note="x")
            assert f"no run with id '{ghost}'" in said
            said = await fails(client, "annotate_run", run_id=run_id)
            assert "give a note" in said
            said = await fails(client, "run_training", script="train.py", options={"tags": ["a b"]})
            assert "invalid tag 'a b'" in said
            said = await fails(client, "resume_run", run_id=run_id, options={"note": "again"})
            assert "note" in said


def test_the_tag_index_is_compacted_to_a_line_per_tagged_run_when_it_grows(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notebook, "TAG_INDEX_SLACK", 0)
    monkeypatch.setattr(notebook, "TAG_INDEX_RATIO", 2)
    kept, dropped = unique("kept"), unique("dropped")
    for run_id in (kept, dropped):
        service.start(RunRequest(script=QUICK, run_id=run_id))
    for i in range(5):
        service.annotate(kept, tags=[f"t{i}"])
    service.annotate(dropped, tags=["gone"])
    service.annotate(dropped, untag=["gone"])
    tag_index = service.store.home / notebook.TAG_INDEX_FILE
    assert len(tag_index.read_text(encoding="utf-8").splitlines()) == 7
    before = notebook.tag_map(service.store)  # 7 lines for 2 runs: compacted after this read
    assert len(tag_index.read_text(encoding="utf-8").splitlines()) == 1
    assert notebook.tag_map(service.store) == {kept: before[kept]}
    assert before[kept][1] == ["t0", "t1", "t2", "t3", "t4"] and before[dropped][1] == []
    for run_id in (kept, dropped):
        wait_for_end(service, run_id)
