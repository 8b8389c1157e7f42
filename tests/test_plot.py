"""Curves to look at (issue 13, point 4): `backprop plot` writes a PNG of real runs' metric
histories (a resumed run's join drawn as a dashed line of its colour), of a sweep's trials, and
refuses bad inputs with a clear error; without matplotlib it names the extra; the MCP tool
plot_metrics answers a real client over stdio with image content.

The pictures are opened with Pillow (matplotlib's own dependency) and read by their pixels: the
size, the number of colours, each run's line colour, which way a curve goes, and the join line.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp_types import ImageContent, TextContent

from backprop_mcp.runs.plots import MAX_PLOT_RUNS, MAX_PNG_BYTES, QUANTIZED_COLOURS
from backprop_mcp.runs.requests import RunRequest
from backprop_mcp.runs.service import Service
from backprop_mcp.sweeps.curves import trials_to_plot
from backprop_mcp.sweeps.shapes import SweepRecord, Trial
from tests.helpers import FIXTURES, cli, unique_id, wait_for_end
from tests.test_mcp_stdio import server_command

pytestmark = pytest.mark.skipif(
    find_spec("matplotlib") is None,
    reason="the plot extra is not installed: pip install 'backprop-mcp[plot]'",
)

# matplotlib's first two line colours (tab10), those of the first and second run drawn.
BLUE = (31, 119, 180)
ORANGE = (255, 127, 14)
# The PNG's palette of QUANTIZED_COLOURS colours moves a colour by a few units at most.
COLOUR_TOLERANCE = 12
# A plot with lines, text, grid and antialiased edges has dozens of colours; a blank one has one.
MIN_COLOURS = 20
GREEN = (44, 160, 44)  # the third run's
PURPLE = (148, 103, 189)  # the fifth run's
# A curve across a panel is hundreds of pixels of its colour.
MIN_LINE_PIXELS = 200
# A dashed join line crosses the whole panel, half of it dashes: well over this many pixels of
# its column, where the curve alone crosses a column in a few.
MIN_JOIN_PIXELS = 60
# Issue 13: "small: a few tens of KB", for a 4-panel plot of five runs.
MAX_PLOT_BYTES = 60_000
# Bounds every MCP session and every wait for runs here: a loaded 2-core machine starts runs slowly.
SESSION_SECONDS = 300
WIDE = 800  # two panels of 400 pixels

# The longest file name most file systems take (ext4, tmpfs, APFS: 255 bytes).
NAME_MAX = 255

TINY = FIXTURES / "trains_a_tiny_model_by_lr_and_width.py"
# What the error without matplotlib must say, word for word: the extra that installs it.
PLOT_EXTRA = "pip install 'backprop-mcp[plot]'"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _start(service: Service, run_id: str, script: Path, *args: str) -> None:
    service.start(RunRequest(script=str(script), args=list(args), run_id=run_id))


def _finished(service: Service, run_id: str, script: Path, *args: str) -> None:
    _start(service, run_id, script, *args)
    assert wait_for_end(service, run_id, timeout=SESSION_SECONDS)["status"] == "completed"


def _resumed(service: Service, run_id: str, *args: str) -> None:
    service.resume(run_id, args=list(args))
    assert wait_for_end(service, run_id, timeout=SESSION_SECONDS)["status"] == "completed"


def _picture(data: bytes) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.convert("RGB")


def _near(pixel: Sequence[int], colour: Sequence[int]) -> bool:
    return all(abs(a - b) <= COLOUR_TOLERANCE for a, b in zip(pixel, colour, strict=True))


def _pixels(image: Any, colour: Sequence[int]) -> int:
    return sum(count for count, pixel in image.getcolors(1 << 24) if _near(pixel, colour))


def _columns(image: Any, colour: Sequence[int], rows: range) -> dict[int, list[int]]:
    """For each column holding `colour` within `rows`: the rows where it is."""
    px, width = image.load(), image.size[0]
    found: dict[int, list[int]] = {}
    for x in range(width):
        hits = [y for y in rows if _near(px[x, y], colour)]
        if hits:
            found[x] = hits
    return found


def _panel_rows(image: Any) -> range:
    # Above the legend (the bottom 60 pixels) and below the title (the top 25).
    return range(25, image.size[1] - 60)


def _assert_a_plot(image: Any, colours: Sequence[Sequence[int]]) -> None:
    assert image.size[0] == WIDE, image.size
    assert len(image.getcolors(1 << 24)) >= MIN_COLOURS, "a blank picture"
    for colour in colours:
        assert _pixels(image, colour) >= MIN_LINE_PIXELS, f"no curve of colour {colour}"


# -- the command on real runs ------------------------------------------------------------------------


def test_a_resumed_run_is_drawn_with_its_join_and_a_second_run_beside_it(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    first = unique_id("first")
    second = unique_id("second")
    _finished(service, first, TINY, "--lr", "0.01", "--width", "64", "--steps", "20")
    _resumed(service, first, "--lr", "0.01", "--width", "64", "--steps", "40")  # from step 20
    _finished(service, second, TINY, "--lr", "0.1", "--width", "16", "--steps", "30")

    out = tmp_path / "curves.png"
    done = cli(env, "plot", first, second, "-o", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out) and done.stderr == ""
    both = _picture(out.read_bytes())
    _assert_a_plot(both, [BLUE, ORANGE])
    # The default panels: the loss and the validation metrics the fixture reports.
    shown = cli(env, "plot", first, second, "-o", str(out), "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    answer = json.loads(shown.stdout)
    assert answer["metrics"] == ["loss", "val_loss", "val_acc"] and answer["runs"] == [first, second]
    assert answer["joins"] == {first: [21]} and answer["notes"] == [] and answer["path"] == str(out)
    assert type(answer["joins"][first][0]) is int  # a step, as get_metrics and plot_metrics give it
    assert answer["bytes"] == out.stat().st_size and (answer["width"], answer["height"]) == both.size

    # One panel of the resumed run: its curve spans steps 1 to 40, and the dashed line of its
    # colour stands where step 21 falls.
    alone = tmp_path / "loss.png"
    assert cli(env, "plot", first, "--metric", "loss", "-o", str(alone)).returncode == 0
    image = _picture(alone.read_bytes())
    columns = _columns(image, BLUE, _panel_rows(image))
    left, right = min(columns), max(columns)
    join = round(left + (21 - 1) / (40 - 1) * (right - left))
    near_join = max(len(columns.get(x, [])) for x in range(join - 3, join + 4))
    assert near_join >= MIN_JOIN_PIXELS, (left, right, join, near_join)
    # Elsewhere the curve crosses a column in a few pixels (the steep start aside).
    quarter = round(left + 0.75 * (right - left))
    assert len(columns.get(quarter, [])) < MIN_JOIN_PIXELS // 4

    # The loss falls and val_acc rises: the metric asked for is the one drawn.
    assert _rises(cli_picture(env, tmp_path, first, "--metric", "val_acc"))
    assert not _rises(image)


def cli_picture(env: dict[str, str], tmp_path: Path, *args: str) -> Any:
    out = tmp_path / "one.png"
    done = cli(env, "plot", *args, "-o", str(out))
    assert done.returncode == 0, done.stderr
    return _picture(out.read_bytes())


def _rises(image: Any) -> bool:
    """Whether the blue curve ends higher on the picture than it starts (rows count downwards)."""
    columns = _columns(image, BLUE, _panel_rows(image))
    left, right = min(columns), max(columns)
    return sum(columns[right]) / len(columns[right]) < sum(columns[left]) / len(columns[left])


def test_each_run_is_drawn_only_where_it_has_a_curve_and_a_restart_from_scratch_is_said(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    resumed = unique_id("resumed")
    other = unique_id("other")
    resumable = FIXTURES / "trains_from_its_checkpoint.py"  # loss, and val_loss every second step
    _finished(service, resumed, resumable, "10", "5")
    _resumed(service, resumed, "10", "5")  # from step 5: steps 6-15
    lines = [json.dumps({"step": n, "loss": 1 / n, "metrics": {"val_acc": n / 15}}) for n in range(1, 16)]
    _finished(service, other, FIXTURES / "prints_each_argument_as_a_line.py", *lines)

    # The resumed run has no val_acc: its join's dashed line (its colour) stays out of that panel.
    out = tmp_path / "acc.png"
    done = cli(env, "plot", resumed, other, "--metric", "val_acc", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"backprop: note: {resumed} did not report val_acc\n"
    image = _picture(out.read_bytes())
    assert _pixels(image, ORANGE) >= MIN_LINE_PIXELS
    assert not _columns(image, BLUE, _panel_rows(image)), "a line of a run the panel has no curve of"

    # Restarted from scratch for one step: only the loss is on its curve now (val_loss came every
    # second step of the attempts before), and the plot says why the rest is gone.
    service.resume(resumed, args=["1", "1"], from_scratch=True)
    assert wait_for_end(service, resumed, timeout=SESSION_SECONDS)["status"] == "completed"
    shown = cli(env, "plot", resumed, "-o", str(out), "--json")
    assert shown.returncode == 0, shown.stderr
    answer = json.loads(shown.stdout)
    assert answer["metrics"] == ["loss"] and answer["joins"] == {}, answer
    assert answer["notes"] == [
        f"{resumed}: attempt 3 started from scratch; the attempts before it are not drawn"
    ]
    metrics = service.metrics([resumed])["runs"][0]
    assert list(metrics["metrics"]) == ["loss"] and not metrics["missing"], metrics
    assert metrics["note"] == "attempt 3 started from scratch; the attempts before it are not on the curve"


def test_curves_of_noise_stay_a_few_tens_of_kb(service: Service, env: dict[str, str], tmp_path: Path) -> None:
    ids = [unique_id(f"noisy-{seed}") for seed in range(1, 4)]
    for seed, run_id in enumerate(ids, start=1):
        _start(service, run_id, FIXTURES / "reports_six_noisy_metrics.py", str(seed))
    for run_id in ids:
        assert wait_for_end(service, run_id, timeout=SESSION_SECONDS)["status"] == "completed"
    panels = [arg for name in ("loss", *(f"noise{k}" for k in range(5))) for arg in ("--metric", name)]
    out = tmp_path / "noise.png"
    done = cli(env, "plot", *ids, *panels, "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    size = json.loads(done.stdout)["bytes"]
    print(f"\nplot: 6 panels of noise, 3 runs: {size:,} B of PNG")
    assert size <= MAX_PNG_BYTES
    _assert_a_plot(_picture(out.read_bytes()), [BLUE, ORANGE, GREEN])


def test_a_sweeps_trials_are_drawn_named_by_their_params(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    sw = unique_id("sw")
    baseline = unique_id("baseline")
    script = tmp_path / "sweep.py"
    shutil.copy(TINY, script)
    swept = cli(
        env,
        "sweep",
        str(script),
        "--param",
        "lr=0.1,0.01",
        "--metric",
        "val_loss",
        "--sweep-id",
        sw,
        "--",
        "--steps",
        "10",
        cwd=tmp_path,
        timeout=SESSION_SECONDS,
    )
    assert swept.returncode == 0, swept.stdout + swept.stderr
    out = tmp_path / "sweep.png"
    done = cli(env, "plot", "--sweep", sw, "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["runs"] == [f"{sw}-t1", f"{sw}-t2"] and answer["metrics"][0] == "val_loss", answer
    _assert_a_plot(_picture(out.read_bytes()), [BLUE, ORANGE])
    # A run beside the sweep's trials, in one picture.
    _finished(service, baseline, TINY, "--steps", "10")
    both = cli(env, "plot", baseline, "--sweep", sw, "-o", str(out), "--json")
    assert json.loads(both.stdout)["runs"] == [baseline, f"{sw}-t1", f"{sw}-t2"], both.stderr


def _trial(number: int, objective: float | None, status: str = "completed") -> Trial:
    return Trial(
        number=number, run_id=f"sw-t{number}", params={"lr": number / 100}, status=status, objective=objective
    )


def test_a_sweep_of_more_trials_than_a_plot_holds_draws_its_best_and_says_so() -> None:
    trials = [_trial(n, float(n)) for n in range(1, 25)] + [
        _trial(25, None, "running"),
        _trial(26, None, "starting"),
    ]
    record: Any = {"sweep_id": "sw", "name": None, "metric": "val_loss", "mode": "min", "trials": trials}
    chosen = trials_to_plot(SweepRecord(**record), MAX_PLOT_RUNS)  # type: ignore[typeddict-item]
    assert chosen.run_ids == [f"sw-t{n}" for n in range(1, 21)]  # the 20 lowest, in trial order
    assert chosen.labels["sw-t1"] == "#1 (best) lr=0.01" and chosen.labels["sw-t2"] == "#2 lr=0.02"
    assert chosen.notes == ["sweep sw: drew the best 20 of its 25 trials by val_loss"]
    assert chosen.title.endswith("(best 20 of 25 trials)")
    maximised = trials_to_plot(SweepRecord(**{**record, "mode": "max"}), 3)  # type: ignore[typeddict-item]
    assert maximised.run_ids == ["sw-t22", "sw-t23", "sw-t24"]


# -- what is refused, and said ----------------------------------------------------------------------


def test_bad_inputs_are_clear_errors_that_name_what_exists(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    good = unique_id("good")
    silent = unique_id("silent")
    _finished(service, good, TINY, "--steps", "5")
    _finished(service, silent, FIXTURES / "prints_each_argument_as_a_line.py", "not", "events")
    out = tmp_path / "x.png"

    def refused(*args: str) -> str:
        done = cli(env, "plot", *args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stdout == "" and "Traceback" not in done.stderr, done.stderr
        assert not out.exists()
        return done.stderr

    assert "no run with these 2 ids: 'nope', 'gone'" in refused(good, "nope", "gone", "-o", str(out))
    assert "no run reported 'val_f1'; they reported: loss, val_loss, val_acc" in refused(
        good, "--metric", "val_f1", "-o", str(out)
    )
    assert f"nothing to draw: {silent}: the script reported no metrics" in refused(silent, "-o", str(out))
    assert "give the run ids to plot, or --sweep SWEEP_ID" in refused("-o", str(out))
    assert "no sweep with id 'nosuch'" in refused("--sweep", "nosuch", "-o", str(out))
    assert "give a name ending in .png, got 'x.jpg'" in refused(good, "-o", "x.jpg")
    (tmp_path / "folder.png").mkdir()
    assert "is a folder" in refused(good, "-o", str(tmp_path / "folder.png"))
    assert "cannot write the plot to" in refused(good, "-o", str(tmp_path / "missing" / "x.png"))
    (tmp_path / "file").write_text("", encoding="utf-8")
    assert "Not a directory" in refused(good, "-o", str(tmp_path / "file" / "x.png"))
    # A name as long as a file's name may be is written (no longer name is made of it on the way).
    longest = tmp_path / ("n" * (NAME_MAX - len(".png")) + ".png")
    assert cli(env, "plot", good, "-o", str(longest)).returncode == 0 and longest.exists()
    assert f"plot at most {MAX_PLOT_RUNS} runs at once, got 21" in refused(
        *[f"r{n}" for n in range(21)], "-o", str(out)
    )
    seven = [arg for n in range(7) for arg in ("--metric", f"m{n}")]
    assert "plot at most 6 metrics at once" in refused(good, *seven, "-o", str(out))
    # A run without metrics beside one with them: the one is drawn, the other named.
    done = cli(env, "plot", good, silent, "-o", str(out))
    assert done.returncode == 0 and f"{silent}: the script reported no metrics; not drawn" in done.stderr
    assert service.get(good)["status"] == "completed"  # nothing stored was touched


def test_names_matplotlib_would_read_as_math_or_controls_are_drawn_as_text(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    odd = unique_id("odd")
    script = tmp_path / "odd_names.py"
    script.write_text(
        "import json\n"
        "for step in range(1, 6):\n"
        '    metrics = {"lr$\\\\bad$": step, "a\\u202eb": 2, "\\U0001f525 f1": step}\n'
        '    print(json.dumps({"step": step, "loss": 1 / step, "metrics": metrics}))\n',
        encoding="utf-8",
    )
    service.start(RunRequest(script=str(script), run_id=odd, name="$\\frac{$ \x1b[31mred"))
    assert wait_for_end(service, odd, timeout=SESSION_SECONDS)["status"] == "completed"
    out = tmp_path / "odd.png"
    done = cli(env, "plot", odd, "--metric", "lr$\\bad$", "--metric", "a\u202eb", "-o", str(out))
    assert done.returncode == 0, done.stderr
    _assert_a_plot(_picture(out.read_bytes()), [BLUE])
    # A character matplotlib's fonts lack is drawn as a box and said as a note, not a Python warning.
    done = cli(env, "plot", odd, "--metric", "\U0001f525 f1", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("backprop: note: matplotlib: Glyph 128293") and "Warning" not in done.stderr


def test_values_beyond_what_matplotlib_can_lay_out_are_drawn_at_a_limit_and_said(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    diverged = unique_id("diverged")
    script = tmp_path / "diverges.py"
    script.write_text(
        "import json\n"
        "for step, loss in enumerate([1e308, -1e308, 5e-324, 0.0, 1.0, 1.7976931348623157e308], 1):\n"
        '    print(json.dumps({"step": step * 10**15, "loss": loss, "metrics": {"tiny": 5e-324 * step}}))\n',
        encoding="utf-8",
    )
    _start(service, diverged, script)
    assert wait_for_end(service, diverged, timeout=SESSION_SECONDS)["status"] == "completed"
    out = tmp_path / "diverged.png"
    done = cli(env, "plot", diverged, "--metric", "loss", "--metric", "tiny", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert (
        done.stderr == f"backprop: note: {diverged}: values of loss beyond ±1e+100 are drawn at the limit\n"
    )
    _assert_a_plot(_picture(out.read_bytes()), [BLUE])


# -- without the extra --------------------------------------------------------------------------------


def _without_matplotlib(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The environment of a child in which `import matplotlib` fails, as where it is not installed."""
    shim = tmp_path / "no-matplotlib"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(
        "import sys\nsys.modules['matplotlib'] = None  # import matplotlib: ImportError\n", encoding="utf-8"
    )
    return {**env, "PYTHONPATH": str(shim)}


def test_without_matplotlib_the_command_names_the_extra_and_exits_2(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    good = unique_id("good")
    _finished(service, good, TINY, "--steps", "5")
    done = cli(_without_matplotlib(env, tmp_path), "plot", good, "-o", str(tmp_path / "x.png"))
    assert done.returncode == 2, done.stderr
    assert f"drawing curves needs matplotlib, which is not installed: {PLOT_EXTRA}" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "x.png").exists()
    # The shim does hide it: the same child without the shim draws.
    assert cli(env, "plot", good, "-o", str(tmp_path / "x.png")).returncode == 0


# -- the MCP tool over stdio --------------------------------------------------------------------------


def _server(env: dict[str, str], tmp_path: Path) -> StdioServerParameters:
    command, *args = server_command()
    return StdioServerParameters(
        command=command, args=[*args, "--root", str(tmp_path)], env=env, cwd=tmp_path
    )


@pytest.mark.anyio
async def test_plot_metrics_answers_a_real_client_with_a_small_png_and_names_the_extra_without_it(
    service: Service, env: dict[str, str], tmp_path: Path
) -> None:
    sw = unique_id("sw")
    ids = [unique_id(f"rate-{n}") for n in range(5)]
    for n, run_id in enumerate(ids):
        _start(service, run_id, FIXTURES / "reports_four_metrics_by_rate.py", "--rate", str(0.01 * 3**n))
    for run_id in ids:
        assert wait_for_end(service, run_id, timeout=SESSION_SECONDS)["status"] == "completed"
    script = tmp_path / "sweep.py"
    shutil.copy(TINY, script)
    swept = cli(env, "sweep", str(script), "--param", "lr=0.1,0.01", "--metric", "val_loss", "--sweep-id", sw)
    assert swept.returncode == 0, swept.stdout + swept.stderr
    with anyio.fail_after(SESSION_SECONDS):
        async with Client(_server(env, tmp_path), mode="legacy") as client:
            result = await client.call_tool("plot_metrics", {"run_ids": ids})
            trials = await client.call_tool("plot_metrics", {"sweep": sw, "run_ids": ids[0]})
            no_sweep = await client.call_tool("plot_metrics", {"sweep": "nosuch"})
            one = await client.call_tool("plot_metrics", {"run_ids": ids[0], "metrics": ["acc"]})
            unknown = await client.call_tool("plot_metrics", {"run_ids": [ids[0], "nope"]})
            no_metric = await client.call_tool("plot_metrics", {"run_ids": ids[0], "metrics": ["f1"]})
            neither = await client.call_tool("plot_metrics", {})
        async with Client(_server(_without_matplotlib(env, tmp_path), tmp_path), mode="legacy") as client:
            missing = await client.call_tool("plot_metrics", {"run_ids": ids})

    assert not result.is_error, result.content
    image, text = result.content
    assert isinstance(image, ImageContent) and isinstance(text, TextContent)
    assert image.mime_type == "image/png"
    png = base64.b64decode(image.data)
    said = json.loads(text.text)
    assert said["runs"] == ids and said["metrics"] == ["loss", "val_loss", "val_acc", "acc"], said
    picture = _picture(png)
    assert said["size"] == f"{picture.size[0]}x{picture.size[1]}"
    _assert_a_plot(picture, [BLUE, ORANGE, PURPLE])
    assert len(picture.getcolors(1 << 24)) <= QUANTIZED_COLOURS
    print(f"\nplot_metrics: 4 panels, 5 runs: {len(png):,} B of PNG, {len(image.data):,} B of base64")
    assert len(png) <= MAX_PLOT_BYTES

    assert not one.is_error and isinstance(one.content[0], ImageContent)
    assert json.loads(one.content[1].text)["metrics"] == ["acc"]  # type: ignore[union-attr]
    assert not trials.is_error and isinstance(trials.content[0], ImageContent)
    assert json.loads(trials.content[1].text)["runs"] == [ids[0], f"{sw}-t1", f"{sw}-t2"]  # type: ignore[union-attr]
    errors = {
        "unknown": (unknown, "no run with id 'nope'"),
        "no_metric": (no_metric, "no run reported 'f1'; they reported: loss, val_loss, val_acc, acc"),
        "neither": (neither, "give run_ids, a sweep, or both"),
        "no_sweep": (no_sweep, "no sweep with id 'nosuch'\nWhat to do: run_sweep returned its sweep_id"),
        "missing": (missing, f"which is not installed: {PLOT_EXTRA}"),
    }
    for name, (answer, words) in errors.items():
        assert answer.is_error, name
        said_text = answer.content[0].text  # type: ignore[union-attr]
        assert words in said_text, (name, said_text)
