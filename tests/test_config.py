"""Layered configuration and its errors (issue: Runs, configuration)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from backprop_mcp.core.clock import parse_iso
from backprop_mcp.core.config import load_settings, read_file
from backprop_mcp.core.errors import ConfigError
from backprop_mcp.core.settings import FIELDS, FIELDS_BY_NAME, Settings
from backprop_mcp.runs.requests import RunRequest
from backprop_mcp.runs.service import Service
from tests.helpers import FIXTURES, cli, unique_id, wait_for_end


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
    write(
        project / "backprop.config.json",
        {"maxRunMinutes": 2, "maxParallel": 5, "gpu": {"minFreeVramMB": 1000, "maxTempC": 75}},
    )
    env = {"BACKPROP_CONFIG": str(user), "BACKPROP_MAX_PARALLEL": "4", "BACKPROP_GPU_MAX_TEMP_C": "65"}
    settings = load_settings(project / "sub", env, {"gpu_max_temp_c": "60"})
    assert settings.max_run_minutes == 2  # project over user
    assert settings.max_parallel == 4  # env over both files
    assert settings.gpu_min_free_vram_mb == 1000  # nested objects merge key by key
    assert settings.gpu_max_temp_c == 60  # options over everything, the environment included
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
        ({"maxRunMinutes": -1}, 'key "maxRunMinutes" must be > 0 and <= 10080 (7 days), got -1'),
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
        ({"maxCpuPercent": 150}, "must be >= 1 and <= 100 (a percentage), got 150"),
        ({"maxRunMinutes": 1e16}, "must be > 0 and <= 10080 (7 days), got 1e+16"),
        ({"maxParallel": "\u00b2"}, "whole number from 1 to 1024 in ASCII digits"),
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
        # One exception: the ray backend's address is Ray's own variable, so that `ray job submit`
        # and backprop send jobs to the same cluster.
        own = spec.env.startswith("BACKPROP_") or spec.env == "RAY_ADDRESS"
        assert spec.key and own and spec.option.startswith("--") and spec.help
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


NUMERIC_FIELDS = [spec for spec in FIELDS if spec.bounds is not None]


def _schema_bounds(prop: dict[str, Any]) -> dict[str, Any]:
    """minimum/maximum (and their exclusive forms) and the type of a number property, which
    pydantic puts in the non-null branch of an optional."""
    branches: list[dict[str, Any]] = prop.get("anyOf", [prop])
    branch = next((b for b in branches if b.get("type") in ("number", "integer")), {})
    keys = ("type", "minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
    return {k: branch[k] for k in keys if k in branch}


def test_the_mcp_schemas_take_every_numeric_bound_from_the_config_table() -> None:
    """What the tools validate, run options included, is the table's bounds exactly; what they
    publish for a top-level argument is the table's bounds less those `schema.lean` leaves out
    (a floor of 0, a cap of SANITY_CAP or more: the time box's 7 days), never another bound.
    Options inside the `options` object are published by type only, to keep tools/list small, and
    validated all the same."""
    from backprop_mcp.mcp_server.roots import Roots
    from backprop_mcp.mcp_server.schema import lean
    from backprop_mcp.mcp_server.tools import build_server

    server = build_server(home=Path("/nonexistent-backprop-home"), roots=Roots((), "none"))

    async def schemas() -> list[tuple[str, dict[str, Any]]]:
        tools = (await server.tools()).values()
        published = [(f"{tool.name} (published)", tool.parameters["properties"]) for tool in tools]
        validated = [(tool.name, tool.fn_metadata.arg_model.model_json_schema()) for tool in tools]
        models = [
            (f"{name}.{model}", definition["properties"])
            for name, schema in validated
            for model, definition in schema.get("$defs", {}).items()
        ]
        return published + [(name, schema["properties"]) for name, schema in validated] + models

    checked: set[str] = set()
    for tool, properties in anyio.run(schemas):
        for name, prop in properties.items():
            spec = FIELDS_BY_NAME.get(name)
            if spec is None or spec.bounds is None:
                continue
            bounds = spec.bounds
            want: dict[str, Any] = {
                "type": "integer" if bounds.whole else "number",
                "exclusiveMinimum" if bounds.low_open else "minimum": bounds.low,
                "exclusiveMaximum" if bounds.high_open else "maximum": bounds.high,
            }
            shown = _schema_bounds(prop)
            if tool.endswith("(published)"):
                left_out = lean({"properties": {name: want}})["properties"][name]
                assert shown == left_out, (tool, name)
            else:
                assert shown == want, (tool, name)
            checked.add(name)
    # Every numeric setting an agent may pass was compared (gpu_resume_below_c is not an argument).
    assert checked == {spec.name for spec in NUMERIC_FIELDS} - {"gpu_resume_below_c"}


def test_the_documented_ranges_are_the_config_table() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text(encoding="utf-8")
    for spec in NUMERIC_FIELDS:
        assert spec.bounds is not None
        assert f"| `{spec.key}` | `{spec.option}` | {spec.bounds.describe()} |" in doc, spec.name


def test_a_run_at_every_maximum_is_supervised_to_its_end(env: dict[str, str], tmp_path: Path) -> None:
    """The largest box, wall cap, grace and queue timeout: the supervisor's deadline arithmetic
    (epoch seconds, ISO dates) holds, and the run ends completed, not lost."""
    maxima = {spec.option: spec.bounds.high for spec in NUMERIC_FIELDS if spec.bounds is not None}
    args = [
        *("--max-run-minutes", str(maxima["--max-run-minutes"])),
        *("--max-wall-minutes", str(maxima["--max-wall-minutes"])),
        *("--grace-seconds", str(maxima["--grace-seconds"])),
        *("--queue-timeout", str(maxima["--queue-timeout"])),
        *("--checkpoint-every-minutes", str(maxima["--checkpoint-every-minutes"])),
    ]
    result = cli(env, "run", str(FIXTURES / "counts_and_exits.py"), *args, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["status"] == "completed" and record["max_run_minutes"] == 10080
    box = parse_iso(record["deadline"]) - parse_iso(record["started_at"])  # type: ignore[operator]
    assert abs(box - 10080 * 60) < 60  # the deadline is a week after the start (give or take its write)


def test_a_stored_option_beyond_todays_range_is_refused_unless_replaced(tmp_path: Path) -> None:
    env = {"BACKPROP_CONFIG": str(tmp_path / "x")}
    with pytest.raises(ConfigError, match="the run's stored max_run_minutes must be > 0 and <= 10080"):
        load_settings(tmp_path, env, base={"max_run_minutes": 1e16, "max_wall_minutes": None})
    settings = load_settings(tmp_path, env, {"max_run_minutes": "5"}, base={"max_run_minutes": 1e16})
    assert settings.max_run_minutes == 5


def test_resuming_a_run_stored_with_a_box_past_the_maximum_is_a_clear_error(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A record written by a version without bounds (the seed's -m 1e16 crashed the supervisor
    once the script ran): its stored options are checked again, and the record stays as it was."""
    run_id = unique_id("old")
    service = Service(Path(env["BACKPROP_HOME"]), env=env, cwd=tmp_path)
    service.start(RunRequest(script=str(FIXTURES / "counts_and_exits.py"), run_id=run_id))
    wait_for_end(service, run_id)
    path = service.store.record_path(run_id)
    record = json.loads(path.read_text(encoding="utf-8"))
    record["options"]["max_run_minutes"] = 1e16
    path.write_text(json.dumps(record), encoding="utf-8")
    before = path.read_bytes()
    result = cli(env, "resume", run_id, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "stored max_run_minutes must be > 0 and <= 10080 (7 days), got 1e+16" in result.stderr
    assert path.read_bytes() == before
    # New arguments as well: the run completed its steps, so resuming it as it is would be refused.
    replaced = cli(env, "resume", run_id, "-m", "1", "--json", "--", "6", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads(replaced.stdout)["status"] == "completed"
