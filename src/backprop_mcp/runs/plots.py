"""Curves to look at: the chosen metrics of one or more runs, read from their metric history
(`history`: all attempts joined, where each resumed attempt joins marked), drawn as one PNG for
`backprop plot` and the plot_metrics tool (`Service.plot`).

matplotlib (the `plot` extra) is imported here only, and only when drawing, so nothing that starts
fast pays for it. No pyplot: a Figure on its own Agg canvas holds no global state, so the MCP
server can draw on a worker thread; a lock keeps two drawings from using matplotlib's shared
caches (fonts, text layout) at once.

The picture: one panel per metric (two columns), one line per run in the same colour in every
panel, a dashed vertical line of the run's colour at each step where a resumed attempt joins its
curve, one legend below the panels (the runs, then the dashed "resumed" mark once).
"""

from __future__ import annotations

import io
import math
import re
import struct
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from backprop_mcp.core.answers import Plot
from backprop_mcp.core.errors import BackpropError, UsageError
from backprop_mcp.core.records import ACTIVE_STATES, RunRecord
from backprop_mcp.core.store import Store
from backprop_mcp.runs import history
from backprop_mcp.runs.compare import lower_is_better, read_runs, some_names
from backprop_mcp.runs.metrics import check_names, downsample

PLOT_EXTRA = "pip install 'backprop-mcp[plot]'"
# Lines per panel: as many as matplotlib's tab20 has distinct colours, and a legend that stays
# readable below the panels. A sweep plots its best trials up to this many.
MAX_PLOT_RUNS = 20
# Panels asked for by name; the default draws fewer (DEFAULT_PANELS).
MAX_PANELS = 6
DEFAULT_PANELS = 4
# Points drawn per line: a joined history can hold thousands, which look the same at this width
# (a panel is 400 pixels wide) but cost time and PNG bytes. The first, last and best are kept.
LINE_POINTS = 400
# A panel's size in inches at DPI: 400 x 260 pixels, small enough that a 2 x 2 plot of five runs
# stays a few tens of KB (an agent pays for the picture), large enough to read ticks and titles.
PANEL_INCHES = (4.0, 2.6)
DPI = 100
# Height of one row of the legend, and of the room for a title, in inches.
LEGEND_ROW_INCHES = 0.2
TITLE_INCHES = 0.3
LEGEND_COLUMNS = 4
# A join line is two pixels wide (in points at DPI): snapped to whole pixels, it keeps its run's
# colour exactly instead of two paler antialiased columns.
JOIN_POINTS = 72 * 2 / DPI
# The most bytes of PNG a plot should cost: an agent pays for the picture (a third more as base64).
# Curves of noise, every pixel column a zigzag, cost the most: drawn antialiased, three runs of six
# such metrics are 60 KB. A plot over this is drawn again with its curves not antialiased (jagged
# but as readable): 20 such runs in 6 panels are then 40 KB (tests/fixtures/reports_six_noisy_metrics.py).
MAX_PNG_BYTES = 48_000
# Colours of the PNG's palette: the 20 lines' colours, their antialiased edges, greys of the text
# and grid. Measured: a 3-panel plot of five runs is 55 KB in full colour, 15 KB in 128 colours.
QUANTIZED_COLOURS = 128
# Legend labels and titles are cut to this many characters (run names may be 200).
LABEL_CHARS = 36
TITLE_CHARS = 90
# A panel's values all positive and spanning this factor or more: a log scale shows the whole
# curve (a loss falling from 10 to 0.01 is a flat line on a linear scale).
LOG_SCALE_SPAN = 100.0
# Values are drawn within ±DRAWN_LIMIT: matplotlib cannot lay out an axis that spans more than a
# float holds (a diverged loss of 1e308 beside -1e308), nor a log scale near the largest float.
DRAWN_LIMIT = 1e100
# Validation metrics, drawn after the loss by default: val_loss, val/acc, validation_f1, ...
_VALIDATION = re.compile(r"val(id(ation)?)?[_/.-]", re.I)
_DRAWING = threading.Lock()


def plot_runs(
    get: Callable[[str], RunRecord],
    store: Store,
    run_ids: Sequence[str],
    *,
    metrics: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    title: str | None = None,
    lead: str | None = None,
) -> Plot:
    """The curves of `run_ids` (read with `get`, the reader that marks a dead run lost) as a PNG.
    `labels` names runs in the legend (default: the run's name, else its id); `lead` is the metric
    drawn first when none are asked for (a sweep's own)."""
    mpl = _matplotlib()
    if isinstance(run_ids, str) or not run_ids:
        raise UsageError("give 1 or more run ids to plot")
    if len(run_ids) > MAX_PLOT_RUNS:
        raise UsageError(
            f"plot at most {MAX_PLOT_RUNS} runs at once, got {len(run_ids)}",
            hint="plot a sweep by its id to draw its best trials",
        )
    asked = check_names(metrics)
    if asked is not None and len(asked) > MAX_PANELS:
        raise UsageError(f"plot at most {MAX_PANELS} metrics at once (one panel each), got {len(asked)}")
    records = read_runs(get, run_ids)
    notes: list[str] = []
    loaded: list[tuple[RunRecord, history.RunHistory]] = []
    for record in records:
        stored = history.load(store, record)
        notes += [f"{record['run_id']}: {problem}" for problem in stored.problems]
        if stored.restarted is not None:
            notes.append(
                f"{record['run_id']}: attempt {stored.restarted} started from scratch; "
                "the attempts before it are not drawn"
            )
        if stored.names():
            loaded.append((record, stored))
        else:
            notes.append(f"{record['run_id']}: {_why_empty(record, stored)}; not drawn")
    if not loaded:
        raise UsageError("nothing to draw: " + "; ".join(notes))
    reported = list(dict.fromkeys(name for _, stored in loaded for name in stored.names()))
    chosen = asked if asked is not None else default_metrics(reported, lead)
    unknown = [name for name in chosen if name not in reported]
    if unknown:
        quoted = ", ".join(repr(name) for name in unknown)
        raise UsageError(
            f"no run reported {quoted}; they reported: {', '.join(some_names(reported))}",
            hint="`backprop metrics RUN_ID` (or get_metrics) lists each run's metrics",
        )
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    joins: dict[str, list[float]] = {}
    for record, stored in loaded:
        run_id = record["run_id"]
        curves[run_id] = {name: _thinned(name, stored.series(name)) for name in chosen}
        missing = [name for name in chosen if not curves[run_id][name]]
        if missing:
            notes.append(f"{run_id} did not report {', '.join(missing)}")
        clipped = [name for name in chosen if _clip(curves[run_id], name)]
        if clipped:
            notes.append(
                f"{run_id}: values of {', '.join(clipped)} beyond ±{DRAWN_LIMIT:g} are drawn at the limit"
            )
        if stored.joins():
            joins[run_id] = [int(step) if step.is_integer() else step for step in stored.joins()]
    names = _labels([record for record, _ in loaded], labels or {})
    if title is None and len(names) == 1:
        title = next(iter(names.values()))
    png, width, height, said = _draw(mpl, chosen, curves, names, joins, title)
    if len(png) > MAX_PNG_BYTES:
        png, width, height, said = _draw(mpl, chosen, curves, names, joins, title, antialiased=False)
    notes += said
    return Plot(
        png=png,
        width=width,
        height=height,
        runs=list(curves),
        metrics=chosen,
        joins=joins,
        notes=notes,
    )


def default_metrics(reported: Sequence[str], lead: str | None = None) -> list[str]:
    """The panels drawn when none are asked for: `lead` (when reported), the loss, the validation
    metrics (val_*), then the others in the order first reported; DEFAULT_PANELS at most."""
    ordered = [name for name in (lead, history.LOSS) if name is not None and name in reported]
    ordered += [name for name in reported if _VALIDATION.match(name)]
    ordered += list(reported)
    return list(dict.fromkeys(ordered))[:DEFAULT_PANELS]


def _why_empty(record: RunRecord, stored: history.RunHistory) -> str:
    if record["status"] in ACTIVE_STATES:
        return "no metric reported yet"
    if stored.attempts:
        return "the script reported no metrics"
    return "no metric history (the run predates it, or never started)"


def _thinned(name: str, curve: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(curve) <= LINE_POINTS:
        return curve
    values = [value for _, value in curve]
    best = values.index(min(values) if lower_is_better(name) else max(values))
    return [curve[i] for i in downsample(len(curve), LINE_POINTS, best)]


def _clip(curves: dict[str, list[tuple[float, float]]], name: str) -> bool:
    """Whether `name`'s curve had values beyond ±DRAWN_LIMIT, now drawn at the limit."""
    curve = curves[name]
    if all(-DRAWN_LIMIT <= value <= DRAWN_LIMIT for _, value in curve):
        return False
    curves[name] = [(step, max(-DRAWN_LIMIT, min(DRAWN_LIMIT, value))) for step, value in curve]
    return True


def _text(text: str, chars: int = LABEL_CHARS) -> str:
    """Text for the figure: control characters shown as `?`, `$` kept literal (matplotlib reads
    `$...$` as math, and a stray one would fail the drawing), cut to `chars` characters."""
    shown = text if len(text) <= chars else text[: chars - 1] + "…"
    return "".join(c if c.isprintable() else "?" for c in shown).replace("$", r"\$")


def _labels(records: Sequence[RunRecord], given: Mapping[str, str]) -> dict[str, str]:
    """Each run's legend label: as given, else its name, else its id; a name two runs share is
    replaced by their ids, so no two lines read the same."""
    labels = {r["run_id"]: given.get(r["run_id"]) or r["name"] or r["run_id"] for r in records}
    seen = [_text(label) for label in labels.values()]
    return {run_id: run_id if seen.count(_text(label)) > 1 else label for run_id, label in labels.items()}


def _matplotlib() -> Any:
    """matplotlib's Figure, its Agg canvas, Line2D and colormaps; a clear error naming the extra
    when it is not installed."""
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from PIL import Image  # a dependency of matplotlib's
    except ImportError:
        raise UsageError(f"drawing curves needs matplotlib, which is not installed: {PLOT_EXTRA}") from None
    return Figure, FigureCanvasAgg, Line2D, colormaps, Image


def _small(image_module: Any, drawn: io.BytesIO) -> bytes:
    """The drawing as a PNG of QUANTIZED_COLOURS colours: a quarter of the bytes of matplotlib's
    full-colour one, and it looks the same (flat colours, lines and their antialiased edges)."""
    drawn.seek(0)
    with image_module.open(drawn) as image:
        reduced = image.convert("RGB").quantize(
            colors=QUANTIZED_COLOURS, method=image_module.Quantize.FASTOCTREE
        )
    out = io.BytesIO()
    reduced.save(out, format="PNG", optimize=True)  # no text chunks: nothing but the picture
    return out.getvalue()


def _draw(
    mpl: Any,
    metrics: list[str],
    curves: dict[str, dict[str, list[tuple[float, float]]]],
    labels: dict[str, str],
    joins: dict[str, list[float]],
    title: str | None,
    *,
    antialiased: bool = True,
) -> tuple[bytes, int, int, list[str]]:
    """The PNG, its width and height, and what matplotlib warned of while drawing (a glyph its
    fonts lack, drawn as a box), as notes instead of warnings on stderr."""
    figure_class, canvas_class, line_class, colormaps, image_module = mpl
    runs = list(curves)
    columns = 1 if len(metrics) == 1 else 2
    rows = math.ceil(len(metrics) / columns)
    entries = len(runs) + (1 if joins else 0)
    # One run without a resume needs no legend: the title names it.
    legend_rows = math.ceil(entries / LEGEND_COLUMNS) if len(runs) > 1 or joins else 0
    size = (
        PANEL_INCHES[0] * columns,
        PANEL_INCHES[1] * rows + legend_rows * LEGEND_ROW_INCHES + (TITLE_INCHES if title else 0),
    )
    palette = colormaps["tab10" if len(runs) <= 10 else "tab20"].colors
    # catch_warnings sets process-wide state: held under the lock, as matplotlib's caches are.
    with _DRAWING, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figure = figure_class(figsize=size, dpi=DPI, layout="constrained")
        axes = figure.subplots(rows, columns, squeeze=False).flatten()
        for index, (ax, metric) in enumerate(zip(axes, metrics, strict=False)):
            values: list[float] = []
            for number, run_id in enumerate(runs):
                colour = palette[number % len(palette)]
                points = curves[run_id][metric]
                if not points:
                    continue  # nor its joins: a dashed line of a colour the panel has no curve of
                xs, ys = zip(*points, strict=True)
                values += ys
                ax.plot(
                    xs,
                    ys,
                    color=colour,
                    linewidth=1.4,
                    marker="o" if len(xs) == 1 else "",
                    antialiased=antialiased,
                )
                for step in joins.get(run_id, []):
                    ax.axvline(step, color=colour, linestyle="--", linewidth=JOIN_POINTS)
            better = "lower" if lower_is_better(metric) else "higher"
            ax.set_title(f"{_text(metric)} ({better} is better)", fontsize=9)
            if values and min(values) > 0 and max(values) >= LOG_SCALE_SPAN * min(values):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if index >= len(metrics) - columns:
                ax.set_xlabel("step", fontsize=8)
        for ax in axes[len(metrics) :]:
            ax.set_visible(False)
        if legend_rows:
            handles = [
                line_class([], [], color=palette[n % len(palette)], linewidth=2, label=_text(labels[run_id]))
                for n, run_id in enumerate(runs)
            ]
            if joins:
                handles.append(
                    line_class(
                        [], [], color="0.35", linestyle="--", linewidth=1, label="resumed attempt joins"
                    )
                )
            figure.legend(
                handles=handles,
                loc="outside lower center",
                ncols=min(LEGEND_COLUMNS, entries),
                fontsize=7,
                frameon=False,
            )
        if title is not None:
            figure.suptitle(_text(title, TITLE_CHARS), fontsize=10)
        canvas_class(figure)
        drawn = io.BytesIO()
        try:
            figure.savefig(drawn, format="png", dpi=DPI)
        except (ValueError, OverflowError) as exc:  # what the checks above leave to matplotlib
            raise BackpropError(f"matplotlib could not draw these curves: {exc}") from None
    png = _small(image_module, drawn)
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk, first in every PNG
    # Deprecations speak to this code's authors, not to whoever looks at the picture.
    shown = (w for w in caught if not issubclass(w.category, DeprecationWarning | PendingDeprecationWarning))
    said = [f"matplotlib: {text}" for text in dict.fromkeys(str(w.message) for w in shown)]
    return png, width, height, said
