"""A bad-input corpus (issue 5, item 5): CLI options, config files, environment variables, MCP tool
arguments over the real stdio protocol, and event lines. Every case must give a clear message
naming what was wrong, and never a traceback. The event parser is also fuzzed with hypothesis."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backprop_mcp import cli as cli_module
from backprop_mcp.core.records import SCHEMA_VERSION, RunRecord
from backprop_mcp.core.settings import FIELDS, Field
from backprop_mcp.runs.events import LineSplitter, Oversized, parse_line
from backprop_mcp.runs.progress import Progress
from tests.helpers import FIXTURES, isolated_env

SCRIPT = str(FIXTURES / "counts_and_exits.py")
# Bounds the MCP corpora over stdio: a server start plus ~150 calls on a slow, shared machine.
MCP_CORPUS_SECONDS = 180


@pytest.fixture
def in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the CLI's own main() in this process, in an isolated store (fast: no interpreter start)."""
    for key in [k for k in os.environ if k.startswith("BACKPROP_")]:
        monkeypatch.delenv(key)
    for key, value in isolated_env(tmp_path / "home").items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = cli_module.main(list(argv))
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.err


# (argv, exit code, a fragment the message must contain)
CLI_CASES: list[tuple[list[str], int, str]] = [
    ([], 2, "required: command"),
    (["frobnicate"], 2, "invalid choice"),
    (["run"], 2, "no training script given"),
    (["run", "/no/such/script.py"], 2, "script not found"),
    (["run", "/tmp"], 2, "must be a file"),
    (["run", ""], 2, "empty"),
    (["run", SCRIPT, "-m", "0"], 2, "option --max-run-minutes must be > 0"),
    (["run", SCRIPT, "-m", "-5"], 2, "must be > 0"),
    (["run", SCRIPT, "-m", "ten"], 2, "must be a number, got 'ten'"),
    (["run", SCRIPT, "-m", "nan"], 2, "finite number"),
    (["run", SCRIPT, "-m", "inf"], 2, "finite number"),
    (["run", SCRIPT, "-m"], 2, "expected one argument"),
    (["run", SCRIPT, "--max-wall-minutes", "0"], 2, "--max-wall-minutes"),
    (["run", SCRIPT, "-f", "caffe"], 2, "must be one of auto, pytorch"),
    (["run", SCRIPT, "-c", "0"], 2, "--checkpoint-every-minutes"),
    (["run", SCRIPT, "-g", "150%"], 2, 'a share like "80%"'),
    (["run", SCRIPT, "-g", "-1"], 2, "--gpu-memory-limit"),
    (["run", SCRIPT, "-g", "lots"], 2, "--gpu-memory-limit"),
    (["run", SCRIPT, "-p", "0"], 2, "whole number from 1 to 1024"),
    (["run", SCRIPT, "-p", "1.5"], 2, "--max-parallel"),
    (["run", SCRIPT, "-p", "99999"], 2, "--max-parallel"),
    (["run", SCRIPT, "--min-free-ram", "-1"], 2, "--min-free-ram must be >= 0"),
    (["run", SCRIPT, "--max-cpu-percent", "101"], 2, "must be >= 1 and <= 100"),
    (["run", SCRIPT, "-m", "1e308"], 2, "option --max-run-minutes must be > 0 and <= 10080"),
    (["run", SCRIPT, "-m", "1e16"], 2, "option --max-run-minutes must be > 0 and <= 10080"),
    (["run", SCRIPT, "-p", "\u00b2"], 2, "--max-parallel must be a whole number from 1 to 1024 in ASCII"),
    (["run", SCRIPT, "-g", "1e308"], 2, "--gpu-memory-limit"),
    (["run", SCRIPT, "-g", "nan%"], 2, "--gpu-memory-limit"),
    (["run", SCRIPT, "-g", "inf"], 2, "--gpu-memory-limit"),
    (["run", SCRIPT, "-g", "\u0661\u0660"], 2, "--gpu-memory-limit"),
    (["run", SCRIPT, "--gpus", "\u00b2"], 2, "GPU indices or UUIDs"),
    (["list", "--limit", "\u0661\u0660"], 2, "invalid int value"),
    (["logs", "x", "--tail", "\u00b2"], 2, "invalid int value"),
    (["run", SCRIPT, "--max-cpu-percent", "0"], 2, "--max-cpu-percent"),
    (["run", SCRIPT, "--gpu-probe", "magic"], 2, "must be one of auto, nvml"),
    (["run", SCRIPT, "--gpu-min-vram", "x"], 2, "--gpu-min-vram"),
    (["run", SCRIPT, "--gpu-max-temp", "0"], 2, "--gpu-max-temp"),
    (["run", SCRIPT, "--gpu-resume-below", "-3"], 2, "--gpu-resume-below"),
    (["run", SCRIPT, "--gpus", "first"], 2, "GPU indices or UUIDs"),
    (["run", SCRIPT, "--gpus", ","], 2, "GPU indices or UUIDs"),
    (["run", SCRIPT, "--grace-seconds", "-1"], 2, "--grace-seconds"),
    (["run", SCRIPT, "--stop-signal", "SIGKILL"], 2, "must be one of SIGINT"),
    (["run", SCRIPT, "--stop-signal", "9"], 2, "--stop-signal"),
    (["run", SCRIPT, "--queue-timeout", "0"], 2, "--queue-timeout"),
    (["run", SCRIPT, "--run-id", "../escape"], 2, "invalid run id"),
    (["run", SCRIPT, "--run-id", "a/b"], 2, "invalid run id"),
    (["run", SCRIPT, "--cwd", "/no/such/dir"], 2, "does not exist"),
    (["run", SCRIPT, "-r", "/no/such/ckpt.pt"], 2, "checkpoint to resume from does not exist"),
    (["run", SCRIPT, "-n", "x" * 201], 2, "at most 200 characters"),
    (["run", SCRIPT, "--bogus"], 2, "unrecognized arguments"),
    (["resume"], 2, "required: run_id"),
    (["resume", "ghost"], 2, "no run with id 'ghost'"),
    (["resume", "../x"], 2, "invalid run id"),
    (["status", "ghost"], 2, "no run with id 'ghost'"),
    (["status", "--max-parallel", "zero"], 2, "--max-parallel"),
    (["list", "--limit", "0"], 2, "limit must be a whole number from 1 to 1000"),
    (["list", "--limit", "1001"], 2, "limit must be a whole number"),
    (["list", "--limit", "many"], 2, "invalid int value"),
    (["list", "--status", "happy"], 2, "unknown status 'happy'"),
    (["list", "--cursor", "-1"], 2, "invalid cursor"),
    (["list", "--cursor", "abc"], 2, "invalid cursor"),
    (["list", "--cursor", "²"], 2, "invalid cursor"),  # isdigit() says yes, int() says no
    (["list", "--cursor", "9" * 5000], 2, "invalid cursor"),  # beyond int()'s digit limit
    (["run", SCRIPT, "--run-id", "a\n"], 2, "invalid run id"),  # `$` matches before a final newline
    (["status", "a\n"], 2, "invalid run id"),
    (["logs", "a\n", "-f"], 2, "invalid run id"),
    (["logs", "ghost"], 2, "no run with id"),
    (["logs", "x", "--tail", "ten"], 2, "invalid int value"),
    (["stop", "ghost"], 2, "no run with id"),
    (["stop"], 2, "required: run_id"),
    (["compare"], 2, "required: run_ids"),
    (["compare", "ghost"], 2, "no run with id"),
    (["list", "--", "x"], 2, "only for `backprop run`"),
    (["import-legacy", "/no/such/experiments.json"], 2, "/no/such/experiments.json"),
]


@pytest.mark.parametrize(
    ("argv", "code", "fragment"), CLI_CASES, ids=[" ".join(c[0])[:60] or "(none)" for c in CLI_CASES]
)
def test_a_bad_cli_invocation_gets_a_clear_message_and_no_traceback(
    in_process: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, fragment: str
) -> None:
    got, err = run_cli(capsys, *argv)
    assert "Traceback" not in err
    assert fragment in err, err
    assert got == code, (got, err)


# (config file content, a fragment the message must contain)
CONFIG_CASES: list[tuple[str, str]] = [
    ("{", "not valid JSON (line 1"),
    ("", "not valid JSON"),
    ("[]", "must be a JSON object"),
    ('"maxRunMinutes"', "must be a JSON object"),
    ("null", "must be a JSON object"),
    ('{"maxRunMinutes": 0}', 'key "maxRunMinutes" must be > 0'),
    ('{"maxRunMinutes": "soon"}', 'key "maxRunMinutes" must be a number'),
    ('{"maxRunMinutes": true}', 'key "maxRunMinutes" must be a number'),
    ('{"maxRunMinutes": null}', 'key "maxRunMinutes"'),
    ('{"maxRunMinutes": 1e999}', 'key "maxRunMinutes" must be a finite number'),
    ('{"maxRunMinutes": ' + "9" * 5000 + "}", "a number with too many digits"),
    ('{"gpuMemoryLimit": "\u0661\u0660"}', 'key "gpuMemoryLimit"'),
    ('{"gpuMemoryLimit": 1e308}', 'key "gpuMemoryLimit"'),
    ('{"maxParallel": 0}', 'key "maxParallel" must be a whole number'),
    ('{"maxParallel": 2.5}', 'key "maxParallel"'),
    ('{"gpuMemoryLimit": "200%"}', 'key "gpuMemoryLimit"'),
    ('{"gpuMemoryLimit": []}', 'key "gpuMemoryLimit"'),
    ('{"minFreeRamGB": -1}', 'key "minFreeRamGB" must be >= 0'),
    ('{"maxWallMinutes": -1}', 'key "maxWallMinutes"'),
    ('{"gpu": {"probe": "x"}}', 'key "gpu.probe" must be one of'),
    ('{"gpu": {"maxTempC": "hot"}}', 'key "gpu.maxTempC"'),
    ('{"gpu": {"minFreeVramMB": -5}}', 'key "gpu.minFreeVramMB"'),
    ('{"gpu": {"devices": [true]}}', 'key "gpu.devices"'),
    ('{"gpu": {"enabled": "maybe"}}', 'key "gpu.enabled" must be true or false'),
    ('{"gpu": 5}', 'key "gpu" must be an object'),
    ('{"runId": "a/b"}', 'key "runId": invalid run id'),
    ('{"stopSignal": "SIGKILL"}', 'key "stopSignal" must be one of'),
    ('{"framework": 3}', 'key "framework" must be one of'),
    ('{"allowedRoots": "x\\u0000y"}', 'key "allowedRoots"'),
    ('{"allowedRoots": 5}', 'key "allowedRoots" must be a list'),
    ('{"python": ""}', 'key "python"'),
    ('{"queue": "sometimes"}', 'key "queue" must be true or false'),
    ("[" * 100000, "nested too deeply"),
]


@pytest.mark.parametrize(("content", "fragment"), CONFIG_CASES, ids=[c[0][:40] for c in CONFIG_CASES])
def test_a_bad_project_config_file_is_named_with_its_key_and_no_traceback(
    in_process: Path, capsys: pytest.CaptureFixture[str], content: str, fragment: str
) -> None:
    config = in_process / "backprop.config.json"
    config.write_text(content, encoding="utf-8")
    code, err = run_cli(capsys, "run", SCRIPT, "--dry-run")
    assert code == 2 and "Traceback" not in err
    assert str(config) in err and fragment in err, err


def test_a_config_file_that_is_not_utf8_is_named_clearly(
    in_process: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_process / "backprop.config.json").write_bytes(b'{"maxRunMinutes": "\xff"}')
    code, err = run_cli(capsys, "run", SCRIPT, "--dry-run")
    assert code == 2 and "not UTF-8" in err and "Traceback" not in err


ENV_CASES: list[tuple[str, str]] = [
    ("BACKPROP_MAX_RUN_MINUTES", "0"),
    ("BACKPROP_MAX_PARALLEL", "lots"),
    ("BACKPROP_GPU_PROBE", "psychic"),
    ("BACKPROP_USE_GPU", "perhaps"),
    ("BACKPROP_STOP_SIGNAL_DEFAULT", "SIGSTOP"),
    ("BACKPROP_GPU_MEMORY_LIMIT", "0%"),
    ("BACKPROP_MAX_CPU_PERCENT", "250"),
    ("BACKPROP_GRACE_SECONDS", "-2"),
    ("BACKPROP_MAX_PARALLEL", "\u00b2"),
    ("BACKPROP_GPU_MEMORY_LIMIT", "\u0661\u0660"),
    ("BACKPROP_GPUS", "\u0661"),
]


@pytest.mark.parametrize(("name", "value"), ENV_CASES)
def test_a_bad_environment_variable_is_named_with_its_value(
    in_process: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    value: str,
) -> None:
    monkeypatch.setenv(name, value)
    code, err = run_cli(capsys, "run", SCRIPT, "--dry-run")
    assert code == 2 and "Traceback" not in err
    assert f"environment variable {name}" in err, err


NUMERIC_FIELDS = [spec for spec in FIELDS if spec.bounds is not None]


def bad_numbers(spec: Field) -> list[tuple[str, str, str, object]]:
    """Out-of-range and malformed values of a numeric setting, each as (label, text for an option
    or variable, JSON for a config file, MCP argument): just past each end of its range, huge,
    infinite, not a number, and digits that are not ASCII (a superscript, Arabic-Indic 10)."""
    bounds = spec.bounds
    assert bounds is not None
    below = bounds.low if bounds.low_open else bounds.low - 1
    above = bounds.high if bounds.high_open else bounds.high + 1
    return [
        ("below-min", repr(below), json.dumps(below), below),
        ("above-max", repr(above), json.dumps(above), above),
        ("1e308", "1e308", "1e308", 1e308),
        ("-1e308", "-1e308", "-1e308", -1e308),
        ("inf", "inf", "Infinity", "inf"),
        ("nan", "nan", "NaN", "nan"),
        ("superscript", "\u00b2", '"\u00b2"', "\u00b2"),
        ("arabic-indic", "\u0661\u0660", '"\u0661\u0660"', "\u0661\u0660"),
    ]


LAYER_CASES = [(spec, *value) for spec in NUMERIC_FIELDS for value in bad_numbers(spec)]


@pytest.mark.parametrize(
    ("spec", "label", "text", "json_text", "argument"),
    LAYER_CASES,
    ids=[f"{case[0].name}-{case[1]}" for case in LAYER_CASES],
)
def test_every_bad_number_is_refused_alike_by_option_variable_and_config_file(
    in_process: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    spec: Field,
    label: str,
    text: str,
    json_text: str,
    argument: object,
) -> None:
    """Issue 9, item 18: the same range in every layer, each bad value a clear exit-2 error."""
    code, err = run_cli(capsys, "run", SCRIPT, "--dry-run", f"{spec.option}={text}")
    assert (code, "Traceback" in err) == (2, False), err
    assert f"option {spec.option} must be" in err, err

    monkeypatch.setenv(spec.env, text)
    code, err = run_cli(capsys, "run", SCRIPT, "--dry-run")
    monkeypatch.delenv(spec.env)
    assert (code, "Traceback" in err) == (2, False), err
    assert f"environment variable {spec.env} must be" in err, err

    head, _, leaf = spec.key.rpartition(".")
    body = f'{{"{leaf}": {json_text}}}'
    (in_process / "backprop.config.json").write_text(
        f'{{"{head}": {body}}}' if head else body, encoding="utf-8"
    )
    code, err = run_cli(capsys, "run", SCRIPT, "--dry-run")
    assert (code, "Traceback" in err) == (2, False), err
    assert f'key "{spec.key}" must be' in err, err


def test_every_bad_number_is_refused_by_the_mcp_tools_too(tmp_path: Path) -> None:
    """The MCP arguments of the same settings, over the real stdio protocol: each an isError result
    naming the argument, never a traceback or a bare "Error executing tool", and nothing started.
    A run option goes in the `options` object (resume_run's is published as "as in run_training")."""
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    from backprop_mcp.mcp_server.arguments import OPTION_NAMES

    params = StdioServerParameters(
        command=str(Path(sys.executable).parent / "backprop-mcp"),
        args=["--root", str(FIXTURES)],
        env=isolated_env(tmp_path / "home"),
        cwd=str(tmp_path),
    )
    failures: list[str] = []
    checked: set[str] = set()

    async def scenario() -> None:
        with anyio.fail_after(MCP_CORPUS_SECONDS):
            async with Client(params, mode="legacy") as client:
                schemas = {t.name: t.input_schema for t in (await client.list_tools()).tools}
                for tool, base in (
                    ("run_training", {"script": SCRIPT, "dry_run": True}),
                    ("resume_run", {"run_id": "ghost"}),
                ):
                    for spec in NUMERIC_FIELDS:
                        top = spec.name in schemas[tool]["properties"]
                        nested = spec.name in OPTION_NAMES and "options" in schemas[tool]["properties"]
                        if not (top or nested):
                            continue
                        checked.add(spec.name)
                        for label, _, _, argument in bad_numbers(spec):
                            given = {spec.name: argument} if top else {"options": {spec.name: argument}}
                            result = await client.call_tool(tool, {**base, **given})
                            text = "".join(getattr(block, "text", "") for block in result.content)
                            if (
                                not result.is_error
                                or spec.name not in text
                                or "Traceback" in text
                                or text.startswith("Error executing tool")
                            ):
                                failures.append(f"{tool} {spec.name} {label}: {text[:300]}")

    anyio.run(scenario)
    assert failures == []
    assert checked == {spec.name for spec in NUMERIC_FIELDS} - {"gpu_resume_below_c"}
    assert not list((tmp_path / "home").rglob("run.json"))


def test_infinity_and_nan_tokens_on_the_wire_are_refused_not_taken_for_defaults(tmp_path: Path) -> None:
    """Python's json (and some clients) write inf and nan as the bare tokens Infinity and NaN; the
    SDK's own client would send null instead, so this speaks JSON-RPC over stdio by hand."""
    from anyio.streams.buffered import BufferedByteReceiveStream

    command = [str(Path(sys.executable).parent / "backprop-mcp"), "--root", str(FIXTURES)]
    tokens = ["Infinity", "-Infinity", "NaN", "1e999"]
    replies: list[dict[str, Any]] = []

    async def scenario() -> None:
        with anyio.fail_after(MCP_CORPUS_SECONDS):
            async with await anyio.open_process(
                command, env=isolated_env(tmp_path / "home"), cwd=tmp_path
            ) as proc:
                assert proc.stdin is not None and proc.stdout is not None
                reader = BufferedByteReceiveStream(proc.stdout)
                hello = {"protocolVersion": "2025-11-25", "capabilities": {}}
                hello["clientInfo"] = {"name": "raw", "version": "1"}
                await proc.stdin.send(
                    json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": hello}).encode()
                    + b"\n"
                )
                await reader.receive_until(b"\n", 1 << 20)
                await proc.stdin.send(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n')
                for number, token in enumerate(tokens, start=1):
                    arguments = {"script": SCRIPT, "dry_run": True, "max_run_minutes": "TOKEN"}
                    call = {"name": "run_training", "arguments": arguments}
                    message = json.dumps(
                        {"jsonrpc": "2.0", "id": number, "method": "tools/call", "params": call}
                    )
                    await proc.stdin.send(message.replace('"TOKEN"', token).encode() + b"\n")
                    replies.append(json.loads(await reader.receive_until(b"\n", 1 << 20)))
                await proc.stdin.aclose()

    anyio.run(scenario)
    for token, reply in zip(tokens, replies, strict=True):
        text = reply["result"]["content"][0]["text"]
        assert reply["result"]["isError"] is True, (token, text)
        assert "max_run_minutes" in text and "finite number" in text and "Traceback" not in text


# (tool, arguments, a fragment the error text must contain)
MCP_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("run_training", {}, "script"),
    ("run_training", {"script": ""}, "script"),
    ("run_training", {"script": 5}, "script"),
    ("run_training", {"script": str(FIXTURES / "no_such.py")}, f"script not found: {FIXTURES}/no_such.py"),
    # Outside the root (FIXTURES), whether it exists is not told: refused as outside.
    ("run_training", {"script": "/no/such.py"}, "'/no/such.py' is outside the allowed roots"),
    ("run_training", {"script": SCRIPT, "run_id": "../x"}, "run_id"),
    ("run_training", {"script": SCRIPT, "name": "x" * 300}, "name"),
    ("run_training", {"script": SCRIPT, "args": "not-a-list"}, "args"),
    ("run_training", {"script": SCRIPT, "max_run_minutes": -1}, "max_run_minutes"),
    ("run_training", {"script": SCRIPT, "max_run_minutes": "soon"}, "max_run_minutes"),
    ("run_training", {"script": SCRIPT, "options": {"max_parallel": 0}}, "options.max_parallel"),
    ("run_training", {"script": SCRIPT, "options": {"gpu_memory_limit": "300%"}}, "gpu_memory_limit"),
    ("run_training", {"script": SCRIPT, "options": {"gpu_memory_limit": "\u0661\u0660"}}, "gpu_memory_limit"),
    ("run_training", {"script": SCRIPT, "options": {"gpu_memory_limit": "1e308"}}, "gpu_memory_limit"),
    ("run_training", {"script": SCRIPT, "options": {"gpus": ["\u00b2"]}}, "gpus"),
    ("run_training", {"script": SCRIPT, "options": {"stop_signal": "SIGKILL"}}, "options.stop_signal"),
    ("run_training", {"script": SCRIPT, "options": {"framework": "caffe"}}, "options.framework"),
    ("run_training", {"script": SCRIPT, "options": "not-an-object"}, "options"),
    (
        "run_training",
        {"script": SCRIPT, "options": {"max_paralel": 2}},
        "max_paralel: did you mean max_parallel",
    ),
    # A run option given where it used to be: refused with where it goes now.
    (
        "run_training",
        {"script": SCRIPT, "max_parallel": 2},
        'put it in options, e.g. options={"max_parallel":2}',
    ),
    ("resume_run", {"run_id": "ghost", "options": {"queue_timeout_minutes": 0}}, "queue_timeout_minutes"),
    ("resume_run", {"run_id": "ghost", "options": {"framework": "jax"}}, "framework is not a resume option"),
    ("run_training", {"script": SCRIPT, "cwd": str(FIXTURES / "no_such_dir")}, "does not exist"),
    ("run_training", {"script": SCRIPT, "cwd": "/no/such/dir"}, "outside the allowed roots"),
    ("resume_run", {}, "run_id"),
    ("resume_run", {"run_id": "ghost"}, "no run with id"),
    ("resume_run", {"run_id": "a/b"}, "run_id"),
    ("get_status", {"run_id": "../../etc"}, "run_id"),
    ("get_status", {"run_id": "ghost"}, "no run with id"),
    ("get_status", {"run_id": 7}, "run_id"),
    ("list_experiments", {"limit": 0}, "limit"),
    ("list_experiments", {"limit": "abc"}, "limit"),
    ("list_experiments", {"status": "happy"}, "status"),
    ("list_experiments", {"cursor": "-1"}, "cursor"),
    ("list_experiments", {"cursor": "²"}, "invalid cursor"),
    ("run_training", {"script": SCRIPT, "run_id": "a\n"}, "run_id"),
    ("get_status", {"run_id": "a\n"}, "run_id"),
    ("stop_run", {"run_id": "ghost"}, "no run with id"),
    ("stop_run", {}, "run_id"),
    ("get_logs", {"run_id": "ghost"}, "no run with id"),
    ("get_logs", {"run_id": "x", "tail": -1}, "tail"),
    ("wait_for_run", {"run_id": "ghost"}, "no run with id"),
    ("wait_for_run", {"run_id": "x", "until": "forever"}, "until"),
    ("wait_for_run", {"run_id": []}, "give 1 to 50 run ids"),
    ("wait_for_run", {"run_id": ["ghost", "other"]}, "no run with these 2 ids: 'ghost', 'other'"),
    ("wait_for_run", {"run_id": ["ok", "a/b"]}, "- run_id.1: String should match pattern"),
    ("stop_run", {"run_id": ["ghost", "ghost2"]}, "none of the runs could be stopped"),
    ("list_experiments", {"sort": ""}, "sort"),
    ("get_metrics", {"run_ids": []}, "run_ids"),
    ("get_metrics", {"run_ids": ["ghost"]}, "no run with id"),
    ("get_metrics", {"run_ids": ["x"], "points": 0}, "points"),
    ("get_metrics", {"run_ids": ["x"] * 21}, "run_ids"),
    ("get_metrics", {"run_ids": ["x"], "metrics": "loss"}, "metrics"),
    ("compare_runs", {"run_ids": ["x"], "by": "worst"}, "by"),
    ("compare_runs", {"run_ids": []}, "run_ids"),
    ("compare_runs", {"run_ids": "ghost"}, "run_ids"),
    ("compare_runs", {"run_ids": ["ghost"]}, "no run with id"),
    # Refused, not ignored: a misspelt option must not start a run with the default box.
    (
        "run_training",
        {"script": SCRIPT, "max_run_minute": 1},
        "max_run_minute: did you mean max_run_minutes?",
    ),
    ("get_logs", {"run_id": "x", "lines": 5}, "unknown argument(s):\n- lines"),
]


def test_bad_mcp_tool_arguments_over_stdio_get_clear_errors_and_no_traceback(tmp_path: Path) -> None:
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    env = isolated_env(tmp_path / "home")
    params = StdioServerParameters(
        command=str(Path(sys.executable).parent / "backprop-mcp"),
        args=["--root", str(FIXTURES)],
        env=env,
        cwd=str(tmp_path),
    )
    failures: list[str] = []

    async def scenario() -> None:
        with anyio.fail_after(MCP_CORPUS_SECONDS):
            async with Client(params, mode="legacy") as client:
                for tool, arguments, fragment in MCP_CASES:
                    result = await client.call_tool(tool, arguments)
                    text = "".join(getattr(block, "text", "") for block in result.content)
                    if (
                        not result.is_error
                        or fragment not in text
                        or "Traceback" in text
                        or text.startswith("Error executing tool")
                    ):
                        failures.append(f"{tool} {arguments}: {text[:300]}")
                tools = {t.name for t in (await client.list_tools()).tools}
                assert {c[0] for c in MCP_CASES} <= tools

    anyio.run(scenario)
    assert failures == []
    assert not list((tmp_path / "home").rglob("run.json"))  # no bad call started a run


# (event line, a fragment of the error)
EVENT_CASES: list[tuple[bytes, str]] = [
    (b'{"event": "progress", "step": NaN}', "NaN is not allowed"),
    (b'{"event": "progress", "loss": Infinity}', "Infinity is not allowed"),
    (b'{"event": "progress", "loss": -Infinity}', "-Infinity is not allowed"),
    (b'{"event": "progress", "loss": 1e400}', "numbers must be finite"),
    (b'{"event": "progress", "step": ' + b"1" * 50 + b"}", "too large"),
    (b'{"event": "progress", "step": -1}', "non-negative integer"),
    (b'{"event": "progress", "step": 1.5}', "non-negative integer"),
    (b'{"event": "progress", "step": "3"}', "non-negative integer"),
    (b'{"event": "progress", "step": true}', "non-negative integer"),
    (b'{"event": "progress", "step": 9223372036854775808}', "below 2**63"),
    (b'{"event": "progress", "total": 0}', '"total" must be a positive integer'),
    (b'{"event": "progress", "loss": "low"}', '"loss" must be a finite number'),
    (b'{"event": "progress", "loss": [1]}', '"loss" must be a finite number'),
    (b'{"event": "progress", "metrics": [1, 2]}', '"metrics" must be an object'),
    (b'{"event": "metric", "name": "x"}', '"value" is required'),
    (b'{"event": "metric", "value": 1}', '"name" must be a string'),
    (b'{"event": "metric", "name": "", "value": 1}', '"name" must be a string'),
    (b'{"event": "metric", "name": "a\\u0007b", "value": 1}', "without control characters"),
    (b'{"event": "metric", "name": "' + b"n" * 201 + b'", "value": 1}', "1 to 200 characters"),
    (b'{"event": "checkpoint_saved"}', '"path" is required'),
    (b'{"event": "checkpoint_saved", "path": ""}', '"path" is required'),
    (b'{"event": "checkpoint_saved", "path": "a\\u0000b"}', "NUL"),
    (b'{"event": "checkpoint_saved", "path": "\\ud800"}', "lone surrogate"),
    (b'{"event": "checkpoint_saved", "path": "' + b"p" * 5000 + b'"}', "at most 4096"),
    (b'{"event": "explode"}', 'unknown event "explode"'),
    (b'{"event": null}', "unknown event null"),
    (b'{"event": ["progress"]}', "unknown event"),
    (b'{"config": {"lr": 0.1}}', 'needs an "event" key'),
    (b"{", "not valid JSON"),
    (b"{}", 'needs an "event" key'),
    (b'{"step": 1} trailing', "not valid JSON"),
    (b'{"step": 1, "step": "x"}', "non-negative integer"),
    (b'{"event": "progress", "step": \xff}', "not valid UTF-8"),
    (b'{"a":' * 100000 + b"1" + b"}" * 100000, "event lines may be at most"),
    (b'{"a":' * 3000 + b"1" + b"}" * 3000, "nested too deeply"),
]


@pytest.mark.parametrize(
    ("line", "fragment"), EVENT_CASES, ids=[c[0][:40].decode("utf-8", "replace") for c in EVENT_CASES]
)
def test_a_bad_event_line_is_rejected_with_a_message_saying_why(line: bytes, fragment: str) -> None:
    result = parse_line(line)
    assert result.events == ()
    assert result.error is not None and fragment in result.error, result.error
    assert len(result.error) < 400  # an error quotes, it does not echo the whole line


def _blank_record(cwd: str) -> RunRecord:
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_id": "r",
        "attempt": 1,
        "cwd": cwd,
        "step": None,
        "total": None,
        "loss": None,
        "metrics": {},
        "eta_seconds": None,
        "checkpoints": [],
        "latest_checkpoint": None,
    }
    return record  # type: ignore[return-value]


NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
)
EVENT_LINES = st.fixed_dictionaries(
    {"event": st.sampled_from(["progress", "metric", "checkpoint_saved", "done"])},
    optional={
        "step": NUMBERS,
        "total": NUMBERS,
        "loss": NUMBERS,
        "value": NUMBERS,
        "name": st.text(max_size=8),
        "path": st.text(max_size=12),
        "metrics": st.dictionaries(st.text(max_size=6), NUMBERS, max_size=4),
    },
)


@settings(max_examples=400, deadline=None)
@given(EVENT_LINES)
def test_whatever_the_parser_accepts_can_always_be_stored_as_strict_json(obj: dict[str, Any]) -> None:
    result = parse_line(json.dumps(obj).encode("utf-8"))
    record = _blank_record("/work")
    progress = Progress(record)
    for event in result.events:
        entry = progress.apply(event, now=1.0)
        if entry is not None:
            json.dumps(entry, allow_nan=False).encode("utf-8")
    json.dumps(record, allow_nan=False).encode("utf-8")  # the supervisor's write never fails on it


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.binary(max_size=80), max_size=12),
    st.integers(min_value=1, max_value=64),
    st.integers(min_value=1, max_value=200),
)
def test_any_stream_through_the_splitter_parses_without_raising_and_bounds_every_line(
    chunks: list[bytes], limit: int, chunk: int
) -> None:
    splitter = LineSplitter(max_line_bytes=limit)
    stream = b"".join(chunks)
    items = []
    for start in range(0, len(stream), chunk):
        items += splitter.feed(stream[start : start + chunk])
    items += splitter.flush()
    for item in items:
        if isinstance(item, Oversized):
            assert len(item.head) <= limit and item.length > limit
        else:
            assert len(item) <= limit
        result = parse_line(item)
        assert not (result.events and result.error)
