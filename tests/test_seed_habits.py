"""The seed's CLI habits (issue 9, item 25): --config, --verbose, -V, resume --dry-run, the seed's
config keys, unknown keys warned about and ignored, and `--gpu-probe rocm` for AMD GPUs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import anyio
import pytest

from backprop_mcp.core.config import load_settings, read_file
from backprop_mcp.core.errors import ConfigError
from backprop_mcp.governor.decisions import evaluate
from backprop_mcp.governor.probe_choice import make_probe
from backprop_mcp.governor.probes import ProbeError
from backprop_mcp.governor.rocm import ROCM_SMI_QUERY, parse_rocm_smi_json
from backprop_mcp.runs.requests import RunRequest
from backprop_mcp.runs.service import Service
from tests.fake_rocm import FakeRocmSmi
from tests.helpers import FIXTURES, WAIT_SECONDS, cli, cli_json, unique_id, wait_for_end, wait_for_log

SCRIPT = str(FIXTURES / "counts_and_exits.py")
ROCM_DATA = Path(__file__).parent / "data" / "rocm_smi"


def write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


# --- --config, --verbose, -V ---------------------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_replaces_the_project_file_before_or_after_the_command(
    env: dict[str, str], tmp_path: Path, where: str
) -> None:
    write(tmp_path / "backprop.config.json", {"maxRunMinutes": 30, "maxParallel": 5})
    explicit = write(tmp_path / "elsewhere" / "ci.json", {"maxRunMinutes": 7})
    given = ["--config", "elsewhere/ci.json"]  # relative to where the command is typed
    args = [*given, "run", SCRIPT] if where == "before" else ["run", *given, SCRIPT]
    report = cli_json(env, *args, "--dry-run", cwd=tmp_path)
    assert report["options"]["max_run_minutes"] == 7
    assert report["options"]["max_parallel"] == 64  # the project file was not read (env's value)
    assert report["config_files"] == [str(explicit)]


def test_config_after_the_command_wins_over_one_before_it(env: dict[str, str], tmp_path: Path) -> None:
    first = write(tmp_path / "a.json", {"maxRunMinutes": 1})
    second = write(tmp_path / "b.json", {"maxRunMinutes": 2})
    report = cli_json(env, "--config", str(first), "run", "--config", str(second), SCRIPT, "--dry-run")
    assert report["options"]["max_run_minutes"] == 2 and report["config_files"] == [str(second)]


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda d: d / "missing.json", "cannot be read (No such file or directory)"),
        (lambda d: d, "cannot be read (Is a directory)"),
        (lambda d: write(d / "bad.json", "{nope"), "not valid JSON (line 1"),
        (
            lambda d: write(d / "bad.json", {"maxParallel": "many"}),
            'key "maxParallel" must be a whole number',
        ),
        (lambda d: write(d / "bad.json", [1]), "must be a JSON object"),
    ],
    ids=["missing", "a-folder", "not-json", "bad-value", "not-an-object"],
)
@pytest.mark.parametrize("command", [["list"], ["run", SCRIPT, "--dry-run"], ["status"]])
def test_a_bad_config_file_is_named_with_exit_2_for_every_command(
    env: dict[str, str], tmp_path: Path, make: Any, says: str, command: list[str]
) -> None:
    path = make(tmp_path)
    result = cli(env, "--config", str(path), *command, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"--config {path}" in result.stderr and says in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_verbose_prints_each_setting_its_value_and_origin_to_stderr_only(
    env: dict[str, str], tmp_path: Path
) -> None:
    project = write(tmp_path / "backprop.config.json", {"gpu": {"maxTempC": 70}, "graceSeconds": 9})
    result = cli(
        {**env, "BACKPROP_GRACE_SECONDS": "11"},
        "--verbose",
        "run",
        SCRIPT,
        "-m",
        "3",
        "--dry-run",
        "--json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["options"]["max_run_minutes"] == 3  # stdout is the JSON alone
    lines = result.stderr.splitlines()

    def row(key: str) -> str:
        return next(line for line in lines if line.split()[:1] == [key])

    assert row("maxRunMinutes").split()[1:] == ["3.0", "(option", "--max-run-minutes)"]
    assert row("gpu.maxTempC").split()[1:] == ["70.0", "(project", "file", f"{project})"]
    assert row("graceSeconds").split()[1:] == ["11.0", "(environment", "variable", "BACKPROP_GRACE_SECONDS)"]
    assert row("gpu.resumeBelowC").split()[1:] == ["5.0", "(default)"]
    assert row("trainingScriptPath").split()[1:] == ["null", "(default)"]
    assert f"config files read, lowest precedence first: {project}" in result.stderr


def test_verbose_works_for_commands_that_take_no_run_options(env: dict[str, str], tmp_path: Path) -> None:
    explicit = write(tmp_path / "x.json", {"maxParallel": 3})
    result = cli(env, "list", "--verbose", "--config", str(explicit), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["runs"] == []
    assert any(
        line.split()[:2] == ["maxParallel", "64"] and "BACKPROP_MAX_PARALLEL" in line
        for line in result.stderr.splitlines()
    )
    assert f"config files read, lowest precedence first: {explicit}" in result.stderr


@pytest.mark.parametrize("args", [["-V"], ["--version"], ["status", "-V"], ["run", "-V"]])
def test_dash_capital_v_prints_the_version(env: dict[str, str], args: list[str]) -> None:
    result = cli(env, *args)
    assert result.returncode == 0 and result.stdout.startswith("backprop "), result.stderr


# --- resume --dry-run ----------------------------------------------------------------------------


def _finished_run(service: Service, tmp_path: Path) -> str:
    run_id = service.start(RunRequest(script=SCRIPT, args=["2"], run_id=unique_id("to-resume")))["run_id"]
    record = wait_for_end(service, run_id)
    assert record["status"] == "completed" and record["latest_checkpoint"] == str(tmp_path / "ck.json")
    return run_id


def test_resume_dry_run_shows_the_next_attempt_and_changes_nothing(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    run_id = _finished_run(service, tmp_path)
    run_dir = service.store.run_dir(run_id)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    # It completed its 2 steps: resumed with new arguments (3 steps), the stored ones replaced.
    shown = cli(env, "resume", run_id, "--dry-run", "-m", "4", "--json", "--", "3", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["environment"]["BACKPROP_ATTEMPT"] == "2"
    assert report["environment"]["BACKPROP_RESUME_FROM"] == str(tmp_path / "ck.json")
    assert report["environment"]["BACKPROP_RUN_ID"] == run_id
    assert report["command"][1:] == [SCRIPT, "3"]
    assert report["options"]["max_run_minutes"] == 4 and report["decision"]["allowed"] is True
    assert report["config_files"] == []
    text = cli(env, "resume", run_id, "--dry-run", "--", "3", cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert f"attempt    2, from {tmp_path / 'ck.json'}" in text.stdout
    assert "nothing was started (--dry-run)" in text.stdout
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    after.pop("lock", None)  # the run's (empty) lock file, taken to read a consistent record
    assert after == before  # record, events and logs untouched; no supervisor started
    assert service.get(run_id)["attempt"] == 1
    assert service.resume(run_id, args=["3"])["attempt"] == 2  # and a real resume still works after it


def test_resume_dry_run_gives_the_same_errors_as_resume(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    no_ckpt = unique_id("no-ckpt")
    run_id = service.start(RunRequest(script=str(FIXTURES / "exits_nonzero.py"), run_id=no_ckpt))["run_id"]
    wait_for_end(service, run_id)
    result = cli(env, "resume", run_id, "--dry-run", cwd=tmp_path)
    assert result.returncode == 2 and "has no checkpoint to resume from" in result.stderr
    scratch = cli_json(env, "resume", run_id, "--dry-run", "--from-scratch", cwd=tmp_path)
    assert "BACKPROP_RESUME_FROM" not in scratch["environment"]
    assert scratch["environment"]["BACKPROP_ATTEMPT"] == "2"
    missing = cli(env, "resume", "nope", "--dry-run", cwd=tmp_path)
    assert missing.returncode == 2 and "no run with id 'nope'" in missing.stderr


# --- the seed's config keys ------------------------------------------------------------------------


def test_the_seeds_keys_are_defaults_for_backprop_run(env: dict[str, str], tmp_path: Path) -> None:
    seed_run = unique_id("seed-run")
    mine = unique_id("mine")
    project = tmp_path / "proj"
    (project / "src").mkdir(parents=True)
    (project / "src" / "train.py").write_text("print('hi')\n", encoding="utf-8")
    (project / "ckpt.pt").write_bytes(b"x")
    write(
        project / "backprop.config.json",
        {"trainingScriptPath": "src/train.py", "runId": seed_run, "resumeFrom": "ckpt.pt"},
    )
    sub = project / "src"  # relative paths are the file's folder's, wherever the command is typed
    report = cli_json(env, "run", "--dry-run", cwd=sub)
    assert report["command"][1] == str(project / "src" / "train.py")
    assert report["environment"]["BACKPROP_RUN_ID"] == seed_run
    assert report["environment"]["BACKPROP_RESUME_FROM"] == str(project / "ckpt.pt")
    # What is given on the command line wins.
    given = cli_json(env, "run", SCRIPT, "--run-id", mine, "--dry-run", cwd=sub)
    assert given["command"][1] == SCRIPT and given["environment"]["BACKPROP_RUN_ID"] == mine
    # And a real run uses them.
    started = cli(env, "run", "--detach", cwd=sub)
    assert started.returncode == 0 and started.stdout.strip() == seed_run, started.stderr


def test_the_seeds_keys_do_not_apply_to_mcp_style_requests(env: dict[str, str], tmp_path: Path) -> None:
    fixed = unique_id("fixed")
    write(tmp_path / "backprop.config.json", {"runId": fixed, "resumeFrom": "/etc/hostname"})
    service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=tmp_path)
    report = service.dry_run(RunRequest(script=SCRIPT, source="argument"))
    assert report["environment"]["BACKPROP_RUN_ID"] != fixed
    assert "BACKPROP_RESUME_FROM" not in report["environment"]
    assert "default_run_id" not in report["options"]  # never stored with a run


def test_run_without_a_script_or_trainingscriptpath_says_what_to_do(
    env: dict[str, str], tmp_path: Path
) -> None:
    result = cli(env, "run", "--dry-run", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no training script given" in result.stderr and "trainingScriptPath" in result.stderr


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"runId": "../x"}, 'key "runId": invalid run id'),
        ({"runId": 5}, 'key "runId" must be a run id string'),
        ({"trainingScriptPath": ""}, 'key "trainingScriptPath" must be a non-empty string'),
        ({"resumeFrom": ["a"]}, 'key "resumeFrom" must be a non-empty string'),
        ({"gpu": 5}, 'key "gpu" must be an object with the keys probe, minFreeVramMB'),
    ],
)
def test_bad_values_of_the_seeds_keys_are_errors_naming_the_key(
    tmp_path: Path, data: object, says: str
) -> None:
    path = write(tmp_path / "backprop.config.json", data)
    with pytest.raises(ConfigError) as info:
        read_file(path)
    assert str(path) in str(info.value) and says in str(info.value)


# --- unknown keys ---------------------------------------------------------------------------------


def test_unknown_keys_are_warned_about_and_ignored(env: dict[str, str], tmp_path: Path) -> None:
    path = write(
        tmp_path / "backprop.config.json",
        {"maxRunMinutes": 3, "gpu": {"maxTemp": 70, "maxTempC": 80}, "colour": "blue", "maxRunMinute": 1},
    )
    result = cli(env, "run", SCRIPT, "--dry-run", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout holds the JSON alone
    assert report["options"]["max_run_minutes"] == 3 and report["options"]["gpu_max_temp_c"] == 80
    warnings = [line for line in result.stderr.splitlines() if line.startswith("backprop: warning:")]
    assert f'backprop: warning: {path}: unknown key "gpu.maxTemp" ignored; did you mean "gpu.maxTempC"?' in (
        warnings
    )
    assert any(
        f'{path}: unknown key "colour" ignored; allowed keys are maxRunMinutes,' in w
        and "trainingScriptPath" in w
        for w in warnings
    )
    assert (
        f'backprop: warning: {path}: unknown key "maxRunMinute" ignored; did you mean "maxRunMinutes"?'
        in (warnings)
    )
    assert len(warnings) == 3  # once each, though the file is read more than once


def test_unknown_keys_are_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "backprop.config.json", {"maxParalel": 3, "queue": False})
    with caplog.at_level(logging.WARNING, logger="backprop_mcp.core.config"):
        settings = load_settings(tmp_path, {"BACKPROP_CONFIG": str(tmp_path / "none.json")})
    assert settings.queue is False and settings.max_parallel == 2
    assert [r.getMessage() for r in caplog.records] == [
        f'{path}: unknown key "maxParalel" ignored; did you mean "maxParallel"?'
    ]


@pytest.mark.anyio
async def test_over_mcp_an_unknown_key_warning_goes_to_stderr_never_stdout(tmp_path: Path) -> None:
    from tests.test_mcp_stdio import Lines, request, server_command, server_env

    project = tmp_path / "project"
    config = write(project / "backprop.config.json", {"maxRunMinutez": 5})
    (project / "train.py").write_text("print('hi')\n", encoding="utf-8")
    stderr_path = tmp_path / "server.stderr"
    with anyio.fail_after(WAIT_SECONDS), stderr_path.open("wb") as stderr:
        process = await anyio.open_process(
            [*server_command(), "--root", str(project)], env=server_env(tmp_path), cwd=project, stderr=stderr
        )
        lines = Lines(process)
        init = {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        }
        await request(process, lines, 1, "initialize", init)
        assert process.stdin is not None
        await process.stdin.send(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n')
        arguments = {"script": "train.py", "dry_run": True}
        dry = await request(process, lines, 2, "tools/call", {"name": "run_training", "arguments": arguments})
        assert dry["structuredContent"]["config_files"] == [str(config)]
        await process.stdin.aclose()
        seen = await lines.rest()
        assert await process.wait() == 0
    assert all(json.loads(line)["jsonrpc"] == "2.0" for line in seen)
    assert not any(b"maxRunMinutez" in line for line in seen)
    assert f'{config}: unknown key "maxRunMinutez" ignored'.encode() in stderr_path.read_bytes()


# --- --gpu-probe rocm ----------------------------------------------------------------------------


def rocm_output(name: str) -> str:
    return (ROCM_DATA / name).read_text(encoding="utf-8")


def test_rocm_smi_json_of_four_instinct_cards_is_read() -> None:
    gpus = parse_rocm_smi_json(rocm_output("instinct_four_cards_rocm6.json"))
    assert [g["index"] for g in gpus] == [0, 1, 2, 3]
    first, hot = gpus[0], gpus[1]
    assert first["uuid"] == "GPU-5a1c3e9b77d20f41"
    assert hot["uuid"] == "GPU-03c0de11f00ba5e7"  # rocm-smi drops leading zeros; the UUID keeps 16
    assert first["name"] == "Arcturus GL-XL [Instinct MI100]"
    assert first["memory_total_mb"] == 32752.0 and first["memory_used_mb"] == pytest.approx(6.4375)
    assert first["memory_free_mb"] == pytest.approx(32752.0 - 6.4375)
    assert (first["temperature_c"], first["utilization_pct"]) == (41.0, 0.0)  # edge, not junction
    assert (hot["temperature_c"], hot["memory_used_mb"], hot["utilization_pct"]) == (88.0, 28672.0, 100.0)
    assert all(g["processes"] == [] for g in gpus)


def test_rocm_smi_json_of_consumer_and_old_cards_is_read() -> None:
    (new,) = parse_rocm_smi_json(rocm_output("radeon_no_unique_id_rocm6.json"))  # starts with a newline
    assert new["uuid"] == "0000:0B:00.0"  # no unique id: the PCI bus id identifies it
    assert new["name"] == "Navi 22 [Radeon RX 6700/6700 XT / 6800M]"
    assert (new["memory_free_mb"], new["temperature_c"]) == (12272.0 - 1536.0, 52.0)
    (old,) = parse_rocm_smi_json(rocm_output("radeon_old_rocm4.json"))
    assert old["name"] == "67XA6S"  # "Card series" holds the vendor id 0x1002 on ROCm 4: not a name
    assert old["memory_total_mb"] == 12272.0


def test_rocm_smi_warnings_before_the_json_and_na_fields_are_tolerated() -> None:
    mi300, unreadable = parse_rocm_smi_json(rocm_output("mi300x_junction_only_with_warning.txt"))
    assert mi300["temperature_c"] == 47.0  # no edge sensor: the junction
    assert mi300["memory_total_mb"] == 196288.0
    assert (unreadable["memory_free_mb"], unreadable["temperature_c"], unreadable["utilization_pct"]) == (
        None,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("garbage_vram.json", 'card0 "VRAM Total Memory (B)" is not a number: "lots"'),
        ("driver_not_loaded.txt", "no JSON object: 'ERROR: GPU[0]"),
    ],
)
def test_unreadable_rocm_smi_output_fails_the_whole_reading(name: str, says: str) -> None:
    with pytest.raises(ProbeError, match="unreadable rocm-smi output") as info:
        parse_rocm_smi_json(rocm_output(name))
    assert says in str(info.value)


@pytest.mark.parametrize("text", ["[1, 2]", '{"card0": 5}', "{", '{"card0": {"GPU use (%)": true}}'])
def test_malformed_rocm_smi_json_is_a_probe_error(text: str) -> None:
    with pytest.raises(ProbeError, match="unreadable rocm-smi output"):
        parse_rocm_smi_json(text)


def test_the_rocm_probe_reads_the_fake_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRocmSmi(tmp_path)
    fake.set_output(rocm_output("instinct_four_cards_rocm6.json"))
    monkeypatch.setenv("PATH", fake.path)
    probe = make_probe("rocm", cpu_cache=tmp_path / "cpu.json")
    snap = probe.snapshot()
    assert (snap["gpu_probe"], snap["gpu_host"], snap["gpu_error"]) == ("rocm-smi", True, None)
    assert [g["uuid"] for g in snap["gpus"] or []][:2] == ["GPU-5a1c3e9b77d20f41", "GPU-03c0de11f00ba5e7"]
    assert probe.gpu_process_memory([1]) is None  # rocm-smi has no per-process memory: unknown
    # A non-zero exit after a full table (a field one card does not support) still reads...
    fake.set_output(rocm_output("radeon_old_rocm4.json"), status=2)
    assert [g["name"] for g in probe.snapshot()["gpus"] or []] == ["67XA6S"]


@pytest.mark.parametrize(
    ("output", "status", "says"),
    [
        (rocm_output("driver_not_loaded.txt"), 1, "rocm-smi exited with status 1: ERROR: GPU[0]"),
        (rocm_output("garbage_vram.json"), 0, "is not a number"),
        ("", 0, "no JSON object"),
    ],
)
def test_a_failing_rocm_smi_makes_the_gpu_state_unknown_and_refuses_gpu_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str, status: int, says: str
) -> None:
    from backprop_mcp.core.settings import Settings
    from backprop_mcp.runs.launch import limits_of

    fake = FakeRocmSmi(tmp_path)
    fake.set_output(output, status)
    monkeypatch.setenv("PATH", fake.path)
    snap = make_probe("rocm", cpu_cache=None).snapshot()
    assert snap["gpus"] is None and snap["gpu_error"] is not None and says in snap["gpu_error"]
    reasons = evaluate(snap, limits_of(Settings()), [], now=0.0)["reasons"]
    assert (
        f"GPU state unknown: {snap['gpu_error']}; refusing GPU runs (use --no-gpu to run on CPU)" in reasons
    )


def test_a_hanging_rocm_smi_is_bounded_by_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRocmSmi(tmp_path)
    fake.hang()
    monkeypatch.setenv("PATH", fake.path)
    snap = make_probe("rocm", cpu_cache=None, rocm_smi_timeout=0.3).snapshot()
    assert snap["gpus"] is None and snap["gpu_error"] == "rocm-smi did not answer within 0.3 s"


def test_the_rocm_kind_without_rocm_smi_on_path_is_unknown_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    snap = make_probe("rocm", cpu_cache=None).snapshot()
    assert snap["gpus"] is None and snap["gpu_error"] == "rocm-smi not found on PATH"


def test_the_documented_rocm_smi_command_is_the_one_run() -> None:
    docs = (Path(__file__).parents[1] / "docs" / "governor.md").read_text(encoding="utf-8")
    assert f"rocm-smi {' '.join(ROCM_SMI_QUERY)}" in docs


def test_an_amd_run_skips_the_hot_card_and_is_pinned_through_rocr(
    env: dict[str, str], tmp_path: Path
) -> None:
    fake = FakeRocmSmi(tmp_path)
    rocm_env = fake.env({**env, "BACKPROP_GPU_PROBE": "rocm", "CUDA_VISIBLE_DEVICES": "3"})
    service = Service(Path(env["BACKPROP_HOME"]), env=rocm_env, cwd=tmp_path)
    # card1 is at 88 C and card3 (made) at 86 C: card2 is the one that passes.
    fake.set_output(rocm_output("instinct_four_cards_rocm6.json").replace('"39.0"', '"86.0"'))
    run_id = service.start(
        RunRequest(script=str(FIXTURES / "prints_rocm_devices.py"), options={"gpus": "1,2,3"})
    )["run_id"]
    record = wait_for_end(service, run_id)
    assert record["status"] == "completed", record["status_detail"]
    assert record["gpu"] is not None and record["gpu"]["index"] == 2
    wait_for_log(
        service,
        run_id,
        "rocm: ROCR_VISIBLE_DEVICES=GPU-e07a4b2290c6d513 HIP_VISIBLE_DEVICES=0 CUDA_VISIBLE_DEVICES=0",
    )
    status = cli_json(rocm_env, "status", "--gpu-probe", "rocm", cwd=tmp_path)
    assert status["snapshot"]["gpu_probe"] == "rocm-smi" and len(status["snapshot"]["gpus"]) == 4


def test_rocm_is_a_probe_choice_of_the_cli_config_and_environment(
    env: dict[str, str], tmp_path: Path
) -> None:
    write(tmp_path / "backprop.config.json", {"gpu": {"probe": "rocm"}})
    assert load_settings(tmp_path, {"BACKPROP_CONFIG": str(tmp_path / "none.json")}).gpu_probe == "rocm"
    no_rocm_smi = {**env, "PATH": str(tmp_path)}
    for extra_env, args in (({"BACKPROP_GPU_PROBE": "rocm"}, []), ({}, ["--gpu-probe", "rocm"])):
        report = cli_json({**no_rocm_smi, **extra_env}, "run", SCRIPT, *args, "--dry-run")
        assert report["options"]["gpu_probe"] == "rocm"
        assert any("rocm-smi not found on PATH" in check for check in report["decision"]["checks"])
