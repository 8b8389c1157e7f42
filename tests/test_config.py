"""Layered configuration and its errors (issue: Runs, configuration)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backprop_mcp.config import FIELDS, Settings, load_settings, read_file
from backprop_mcp.errors import ConfigError
from tests.helpers import FIXTURES, cli


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def test_defaults_match_the_documented_values(tmp_path: Path) -> None:
    settings = load_settings(tmp_path, {"BACKPROP_CONFIG": str(tmp_path / "none.json")})
    assert settings == Settings()
    assert settings.max_run_minutes == 10 and settings.grace_seconds == 30
    assert settings.max_parallel == 2 and settings.min_free_ram_gb == 4
    assert settings.gpu_min_free_vram_mb == 2500 and settings.gpu_max_temp_c == 85
    assert settings.wall_minutes == 30


def test_layers_apply_in_order_user_project_env_options(tmp_path: Path) -> None:
    user = write(tmp_path / "user.json", {"maxRunMinutes": 1, "maxParallel": 3, "gpu": {"maxTempC": 70}})
    project = tmp_path / "proj"
    (project / "sub").mkdir(parents=True)
    write(project / "backprop.config.json", {"maxRunMinutes": 2, "gpu": {"minFreeVramMB": 1000}})
    env = {"BACKPROP_CONFIG": str(user), "BACKPROP_MAX_PARALLEL": "4"}
    settings = load_settings(project / "sub", env, {"gpu_max_temp_c": "60"})
    assert settings.max_run_minutes == 2  # project over user
    assert settings.max_parallel == 4  # env over files
    assert settings.gpu_min_free_vram_mb == 1000  # nested objects merge key by key
    assert settings.gpu_max_temp_c == 60  # options over everything
    assert settings.sources == (str(user), str(project / "backprop.config.json"))


def test_the_seeds_config_file_is_valid(tmp_path: Path) -> None:
    seed = {
        "maxRunMinutes": 30,
        "maxParallel": 2,
        "gpuMemoryLimit": "80%",
        "gpu": {"probe": "auto", "minFreeVramMB": 2500, "maxTempC": 85},
    }
    values = read_file(write(tmp_path / "backprop.config.json", seed))
    assert values["gpu_memory_limit"] == "80%" and values["max_run_minutes"] == 30


def test_the_dot_backprop_json_name_is_accepted(tmp_path: Path) -> None:
    write(tmp_path / ".backprop.json", {"maxRunMinutes": 3})
    assert load_settings(tmp_path, {"BACKPROP_CONFIG": str(tmp_path / "x")}).max_run_minutes == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"maxRunMinutes": ', "not valid JSON (line 1"),
        ("[1, 2]", "must be a JSON object"),
        ({"maxRunMinutes": -1}, 'key "maxRunMinutes" must be > 0, got -1'),
        ({"maxRunMinutes": "ten"}, "must be a number, got 'ten'"),
        ({"maxRunMinutes": True}, "must be a number, got true"),
        ({"maxParallel": 0}, "whole number from 1 to 1024"),
        ({"maxParallel": 1.5}, "whole number from 1 to 1024"),
        ({"gpuMemoryLimit": "120%"}, 'share like "80%"'),
        ({"gpuMemoryLimit": "lots"}, 'share like "80%"'),
        ({"gpu": {"probe": "magic"}}, "must be one of auto, nvml, nvidia-smi, rocm, none, static"),
        ({"gpu": 80}, 'key "gpu" must be an object with the keys probe,'),
        ({"framework": "mxnet"}, "must be one of auto, pytorch, tensorflow, jax, none"),
        ({"stopSignal": "SIGKILL"}, "must be one of SIGINT, SIGTERM"),
        ({"maxCpuPercent": 150}, "percentage in (0, 100]"),
        ({"gpu": {"devices": "zero"}}, "GPU indices or UUIDs"),
        ({"graceSeconds": float("nan")}, "not valid JSON"),
    ],
)
def test_a_bad_config_file_names_the_file_the_key_and_what_is_allowed(
    tmp_path: Path, content: object, message: str
) -> None:
    path = tmp_path / "backprop.config.json"
    text = content if isinstance(content, str) else json.dumps(content).replace("NaN", "nan")
    write(path, text)
    with pytest.raises(ConfigError) as info:
        read_file(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_a_bad_environment_variable_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="environment variable BACKPROP_MAX_RUN_MINUTES must be a number"):
        load_settings(tmp_path, {"BACKPROP_CONFIG": str(tmp_path / "x"), "BACKPROP_MAX_RUN_MINUTES": "soon"})


def test_every_field_has_a_key_an_env_var_an_option_and_help() -> None:
    for spec in FIELDS:
        assert spec.key and spec.env.startswith("BACKPROP_") and spec.option.startswith("--") and spec.help
    assert len({s.env for s in FIELDS}) == len(FIELDS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "SCRIPT", "-m", "abc"], "option --max-run-minutes must be a number, got 'abc'"),
        (["run", "SCRIPT", "-m", "0"], "option --max-run-minutes must be > 0"),
        (["run", "SCRIPT", "-f", "caffe"], "option --framework must be one of"),
        (["run", "SCRIPT", "-g", "200%"], "option --gpu-memory-limit must be a share"),
        (["run", "SCRIPT", "-p", "zero"], "option --max-parallel must be a whole number"),
        (["run", "SCRIPT", "--gpu-probe", "x"], "option --gpu-probe must be one of"),
        (["run", "SCRIPT", "--stop-signal", "KILL"], "option --stop-signal must be one of"),
        (["run", "SCRIPT", "--run-id", "../etc"], "invalid run id"),
        (["run", "does-not-exist.py"], "script not found"),
        (["run", "SCRIPT", "--cwd", "/no/such/dir"], "working directory"),
        (["run", "SCRIPT", "-r", "/no/such/ckpt"], "checkpoint to resume from does not exist"),
        (["run"], "no training script given"),
        (["run", "SCRIPT", "--bogus"], "unrecognized arguments: --bogus"),
        (["frobnicate"], "invalid choice"),
        (["status", "no-such-run"], "no run with id 'no-such-run'"),
        (["list", "--status", "exploded"], "unknown status 'exploded'"),
        (["list", "--limit", "0"], "limit must be a whole number from 1"),
        (["logs", "nope", "--tail", "5"], "no run with id"),
        (["stop", "a/b"], "invalid run id"),
        (["resume", "missing"], "no run with id"),
        (["import-legacy", "/no/such/file.json"], "no legacy store at"),
    ],
)
def test_bad_cli_input_gives_a_clear_error_and_exit_2_without_traceback(
    env: dict[str, str], tmp_path: Path, args: list[str], message: str
) -> None:
    args = [str(FIXTURES / "counts_and_exits.py") if a == "SCRIPT" else a for a in args]
    result = cli(env, *args, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_project_config_file_fails_the_cli_with_exit_2(env: dict[str, str], tmp_path: Path) -> None:
    write(tmp_path / "backprop.config.json", {"maxParallel": "many"})
    result = cli(env, "run", str(FIXTURES / "counts_and_exits.py"), cwd=tmp_path)
    assert result.returncode == 2
    assert str(tmp_path / "backprop.config.json") in result.stderr
    assert 'key "maxParallel" must be a whole number' in result.stderr
    assert "Traceback" not in result.stderr
