"""The package's shape, kept true by tests: dependencies point down, no module imports itself in a
circle, and no module grows past the size a reader can hold (docs/architecture.md).

The import graph is read from the source with `ast`, not by importing anything: every `import` and
`from ... import` anywhere in a module counts, inside functions (lazy imports) and inside
`if TYPE_CHECKING:` blocks alike. A type-only import does not run, but it ties the lower module to
the upper one's shapes just the same, so it obeys the same rule; a type a lower layer needs belongs
in that layer (a `Protocol`, or a shape in `core`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "backprop_mcp"

# Layers, lowest first: a module may import its own layer and the layers below it, never above.
# `runs` and `backends` are one layer (the service holds a backend; a backend reuses runs' launch
# code), so only a module cycle between them is refused, by the cycle test.
LAYERS: dict[str, int] = {
    "core": 1,
    "governor": 2,
    "runs": 3,
    "backends": 3,
    "sweeps": 3,
    "cli": 4,
    "mcp_server": 4,
}
# Modules that are their own island: they import nothing of the package (scripts import
# `backprop_mcp.script` under interpreters without backprop-mcp installed; every module may import
# the top-level package for `__version__`).
ISLANDS = frozenset({PACKAGE, f"{PACKAGE}.script"})
# The framework callbacks run inside training scripts beside the helper: they may import the helper
# and each other, nothing else of the package, and nothing of the package imports them.
SCRIPT_SIDE = f"{PACKAGE}.integrations"
# Entry points sit above everything: `python -m backprop_mcp`.
ENTRY_POINTS = frozenset({f"{PACKAGE}.__main__"})
# The two adapters never import each other: each is one service call plus its own rendering.
ADAPTERS = frozenset({"cli", "mcp_server"})
# Within one layer, packages that the others of the layer never import: sweeps use the runs
# (each trial is a run), never the other way round.
USED_ONLY_FROM_ABOVE = frozenset({"sweeps"})

MAX_LINES = 450
# The one module allowed past MAX_LINES: the script helper is copied next to training scripts as
# a single file (it must stay one self-contained, stdlib-only module), so it cannot be split.
LONG_MODULES = frozenset({f"{PACKAGE}.script"})


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = SRC) -> dict[str, Path]:
    """Every module of the package under `root`, by dotted name."""
    return {module_name(path, root): path for path in sorted((root / PACKAGE).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(target: str) -> None:
        # The nearest module that exists: `a.b.Name` is module `a.b`.
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(f"{PACKAGE}."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            if source != PACKAGE and not source.startswith(f"{PACKAGE}."):
                continue
            for alias in node.names:
                # `from pkg import module` imports that module; `from module import Name`, the module.
                submodule = f"{source}.{alias.name}"
                add(submodule if submodule in known else source)
    return found


def graph(root: Path = SRC) -> dict[str, set[str]]:
    found = modules(root)
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def layer_of(name: str) -> tuple[str, int] | None:
    """(subpackage, layer) of a module; None for the islands, the script side and entry points."""
    if name in ISLANDS or name in ENTRY_POINTS or _on_script_side(name):
        return None
    top = name.split(".")[1] if name.count(".") >= 1 else name
    if top not in LAYERS:
        raise AssertionError(f"{name} is in no layer: add its package to LAYERS in {__file__}")
    return top, LAYERS[top]


def wrong_imports(edges: dict[str, set[str]]) -> list[str]:
    """Each import against the dependency rule, as "module -> module (why)"."""
    wrong = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            why = _why_wrong(source, target)
            if why:
                wrong.append(f"{source} -> {target} ({why})")
    return wrong


def _on_script_side(name: str) -> bool:
    return name == SCRIPT_SIDE or name.startswith(f"{SCRIPT_SIDE}.")


def _why_wrong(source: str, target: str) -> str | None:
    if source in ISLANDS:
        return "it must import nothing of the package"
    if _on_script_side(source):
        if target in ISLANDS or _on_script_side(target):
            return None
        return "the integrations run inside training scripts: they import only backprop_mcp.script"
    if _on_script_side(target):
        return "nothing of the package imports the integrations (they run inside training scripts)"
    if source in ENTRY_POINTS or target in ISLANDS:
        return None
    if target in ENTRY_POINTS:
        return "nothing imports an entry point"
    source_at, target_at = layer_of(source), layer_of(target)
    if source_at is None or target_at is None:
        return None
    (source_pkg, source_layer), (target_pkg, target_layer) = source_at, target_at
    if target_layer > source_layer:
        return f"upward: {source_pkg} (layer {source_layer}) imports {target_pkg} (layer {target_layer})"
    if source_pkg != target_pkg and {source_pkg, target_pkg} <= ADAPTERS:
        return "the adapters never import each other"
    if source_pkg != target_pkg and target_pkg in USED_ONLY_FROM_ABOVE and target_layer == source_layer:
        return f"{source_pkg} never imports {target_pkg}, which sits on it"
    return None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles, one per strongly connected group of modules (Tarjan), each as a path
    `a -> b -> ... -> a` through the group."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1 or node in edges.get(node, ()):
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return [_cycle_path(group, edges) for group in groups]


def _cycle_path(group: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A concrete cycle inside a strongly connected group, from its first module back to it."""
    members, start = set(group), group[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(edges.get(node, set()) & members):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    return [*group, start]


def test_every_import_points_down_the_layers() -> None:
    wrong = wrong_imports(graph())
    assert not wrong, "imports against the dependency rule:\n" + "\n".join(wrong)


def test_no_module_imports_itself_through_others() -> None:
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_every_subpackage_says_what_it_owns_and_imports_nothing_heavy() -> None:
    for name, path in modules().items():
        if path.name != "__init__.py" or name == PACKAGE:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert ast.get_docstring(tree), f"{path} needs a docstring saying what it owns and may import"
        # Imports only inside functions: importing `backprop_mcp.cli.render` must not load the CLI.
        top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        light = ("__future__", "collections.abc")
        assert all(isinstance(n, ast.ImportFrom) and n.module in light for n in top_level), path


def test_no_module_is_longer_than_a_reader_can_hold() -> None:
    long = {
        name: lines
        for name, path in modules().items()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert set(long) <= LONG_MODULES, f"modules over {MAX_LINES} lines (split at a natural seam): {long}"


# --- the checks themselves can fail ---------------------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in {"__init__.py": "", **files}.items():
        path = root / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.mark.parametrize(
    "files",
    [
        # A lazy import inside a function.
        {"core/__init__.py": "", "core/a.py": "def f():\n    from backprop_mcp.runs import b\n"},
        # A relative import.
        {"core/__init__.py": "", "core/a.py": "from ..governor import b\n"},
        # A type-only import.
        {
            "core/__init__.py": "",
            "core/a.py": "import typing\nif typing.TYPE_CHECKING:\n    import backprop_mcp.cli.b\n",
        },
    ],
)
def test_an_upward_import_is_reported_with_both_modules(tmp_path: Path, files: dict[str, str]) -> None:
    files = {**files, "runs/__init__.py": "", "runs/b.py": "", "governor/__init__.py": ""}
    files |= {"governor/b.py": "", "cli/__init__.py": "", "cli/b.py": ""}
    wrong = wrong_imports(graph(_tree(tmp_path, files)))
    assert len(wrong) == 1
    assert wrong[0].startswith("backprop_mcp.core.a -> backprop_mcp.")
    assert "upward" in wrong[0]


def test_a_cycle_between_runs_and_backends_is_reported(tmp_path: Path) -> None:
    files = {
        "runs/__init__.py": "",
        "runs/service.py": "from backprop_mcp.backends.local import LocalBackend\n",
        "backends/__init__.py": "",
        "backends/local.py": "def f():\n    from backprop_mcp.runs import service\n",
    }
    edges = graph(_tree(tmp_path, files))
    assert wrong_imports(edges) == []  # one layer: allowed by direction...
    assert cycles(edges) == [  # ...but not in a circle
        ["backprop_mcp.backends.local", "backprop_mcp.runs.service", "backprop_mcp.backends.local"]
    ]


def test_the_script_helper_and_the_adapters_are_held_to_their_rules(tmp_path: Path) -> None:
    files = {
        "script.py": "from backprop_mcp.core import contract\n",
        "core/__init__.py": "",
        "core/contract.py": "",
        "cli/__init__.py": "",
        "cli/a.py": "from backprop_mcp.mcp_server import b\n",
        "mcp_server/__init__.py": "",
        "mcp_server/b.py": "",
    }
    assert wrong_imports(graph(_tree(tmp_path, files))) == [
        "backprop_mcp.cli.a -> backprop_mcp.mcp_server.b (the adapters never import each other)",
        "backprop_mcp.script -> backprop_mcp.core.contract (it must import nothing of the package)",
    ]


def test_the_integrations_import_only_the_script_helper_and_nothing_imports_them(tmp_path: Path) -> None:
    files = {
        "script.py": "",
        "core/__init__.py": "",
        "core/contract.py": "",
        "runs/__init__.py": "",
        "runs/a.py": "def f():\n    from backprop_mcp.integrations import common\n",
        "integrations/__init__.py": "",
        "integrations/common.py": "from backprop_mcp import script\n",
        "integrations/keras.py": "from .common import x\nfrom ..core import contract\n",
    }
    assert wrong_imports(graph(_tree(tmp_path, files))) == [
        "backprop_mcp.integrations.keras -> backprop_mcp.core.contract (the integrations run inside "
        "training scripts: they import only backprop_mcp.script)",
        "backprop_mcp.runs.a -> backprop_mcp.integrations.common (nothing of the package imports the "
        "integrations (they run inside training scripts))",
    ]
