"""Finds the fixed run and sweep ids that test code gives to the product, by reading its syntax."""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from backprop_mcp.core.ids import valid_run_id

# The names under which a test hands an id (or a list of them) to the product or to a helper.
ID_NAMES = frozenset({"run_id", "run_ids", "sweep_id"})
# The keys of a request, or of a seed's config file (`runId`), that name a run or sweep.
ID_KEYS = ID_NAMES | {"runId"}
# The command-line options that name the run or sweep being created.
ID_FLAGS = frozenset({"--run-id", "--sweep-id"})


@dataclass(frozen=True)
class FixedId:
    """A fixed id at one place in a test file: `how` says which pattern gave it away."""

    file: str
    line: int
    how: str
    value: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.how} {self.value!r}"


def fixed_value(node: ast.expr | None) -> str | None:
    """The fixed id an expression always gives, or None when it is computed (a variable, a call,
    an f-string that starts with a value). A well-formed literal and an f-string with a literal
    head (`f"r{n}"`: the same ids in every suite) are fixed; a deliberately invalid id is not
    returned, since the product refuses it before anything runs. Lists, tuples and
    comprehensions are fixed when any id in them is."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value if valid_run_id(node.value) else None
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return ast.unparse(node)
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return next((v for v in map(fixed_value, node.elts) if v is not None), None)
    if isinstance(node, (ast.ListComp, ast.GeneratorExp, ast.SetComp)):
        return fixed_value(node.elt)
    return None


def id_parameters(tree: ast.Module) -> dict[str, dict[str, int]]:
    """For each function the module defines, the positions of its id parameters (`run_id` ...)."""
    found: dict[str, dict[str, int]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            positional = [*node.args.posonlyargs, *node.args.args]
            names = {a.arg: i for i, a in enumerate(positional) if a.arg in ID_NAMES}
            if names:
                found[node.name] = names
    return found


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _in_call(call: ast.Call, helpers: dict[str, dict[str, int]]) -> Iterator[tuple[int, str, str]]:
    name = _called_name(call)
    for keyword in call.keywords:
        if keyword.arg in ID_NAMES and (value := fixed_value(keyword.value)) is not None:
            yield keyword.value.lineno, f"{name}({keyword.arg}=)", value
    for parameter, index in helpers.get(name or "", {}).items():
        if index < len(call.args) and (value := fixed_value(call.args[index])) is not None:
            yield call.args[index].lineno, f"{name}({parameter}=)", value


def _in_argv(items: list[ast.expr]) -> Iterator[tuple[int, str, str]]:
    for flag, given in itertools.pairwise(items):
        if (
            isinstance(flag, ast.Constant)
            and flag.value in ID_FLAGS
            and (value := fixed_value(given)) is not None
        ):
            yield given.lineno, f"{flag.value}", value


def _in_dict(node: ast.Dict) -> Iterator[tuple[int, str, str]]:
    for key, item in zip(node.keys, node.values, strict=True):
        if (
            isinstance(key, ast.Constant)
            and key.value in ID_KEYS
            and (value := fixed_value(item)) is not None
        ):
            yield item.lineno, f'"{key.value}":', value


def _id_name(target: ast.expr) -> str | None:
    """The name of a variable that holds ids by its name: `run_id`, `ids`, `first_id`, `run_ids` ..."""
    if isinstance(target, ast.Name) and (
        target.id in ("ids", *ID_NAMES) or target.id.endswith(("_id", "_ids"))
    ):
        return target.id
    return None


def _in_binding(node: ast.Assign | ast.For) -> Iterator[tuple[int, str, str]]:
    """`run_id = "x"`, and `for run_id, steps in (("x", "2"), ...)` (each row's id column)."""
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    source = node.value if isinstance(node, ast.Assign) else node.iter
    for target in targets:
        if (name := _id_name(target)) is not None:
            rows: list[ast.expr] = (
                source.elts
                if isinstance(node, ast.For) and isinstance(source, (ast.List, ast.Tuple))
                else [source]
            )
            for row in rows:
                if (value := fixed_value(row)) is not None:
                    yield row.lineno, f"{name} =", value
        elif isinstance(target, ast.Tuple) and isinstance(source, (ast.List, ast.Tuple)):
            columns = [i for i, t in enumerate(target.elts) if _id_name(t) is not None]
            for row in source.elts:
                for i in columns:
                    cell = (
                        row.elts[i] if isinstance(row, (ast.List, ast.Tuple)) and i < len(row.elts) else None
                    )
                    if (value := fixed_value(cell)) is not None:
                        yield row.lineno, "for ... in", value


def scan(source: str, file: str, helpers: dict[str, dict[str, int]] | None = None) -> list[FixedId]:
    """Every fixed id the code gives away: as a keyword (`run_id="x"`), after `--run-id` in an
    argument list, under a "run_id" key, to a helper's id parameter, or bound to a `run_id` name.
    `helpers` adds the id parameters of functions defined elsewhere (tests/helpers.py ...)."""
    tree = ast.parse(source)
    known = {**(helpers or {}), **id_parameters(tree)}
    found: list[tuple[int, str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            found += _in_call(node, known)
            found += _in_argv(node.args)
        elif isinstance(node, (ast.List, ast.Tuple)):
            found += _in_argv(node.elts)
        elif isinstance(node, ast.Dict):
            found += _in_dict(node)
        elif isinstance(node, (ast.Assign, ast.For)):
            found += _in_binding(node)
    return sorted(
        {FixedId(file, line, how, value) for line, how, value in found}, key=lambda f: (f.line, f.how)
    )


def scan_tests(folder: Path) -> list[FixedId]:
    """`scan` over every test module of the folder, knowing the helpers' id parameters."""
    helpers: dict[str, dict[str, int]] = {}
    for module in sorted(folder.glob("*.py")):
        if not module.name.startswith("test_"):
            helpers.update(id_parameters(ast.parse(module.read_text(encoding="utf-8"))))
    return [
        fixed
        for module in sorted(folder.glob("test_*.py"))
        for fixed in scan(module.read_text(encoding="utf-8"), module.name, helpers)
    ]
