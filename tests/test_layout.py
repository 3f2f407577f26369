"""The package's shape, checked by reading its source: no import cycle between its
modules, every module named in README's Layout table, and the names that moved
out of ``engines.py`` still importable from there. No database."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastapi_rwdb"
README = PACKAGE.parent / "README.md"
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported_modules(module: str) -> set[str]:
    """The package's modules ``module`` imports, at import time or deferred in a
    function (a deferred import still runs, and still cycles); imports for the type
    checker only are left out. Importing a name the package's ``__init__`` holds
    counts as importing ``__init__``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking(node):
            return
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or (node.module or "").split(".")[0] == "fastapi_rwdb":
                parts = (node.module or "").split(".")
                target = parts[0] if node.level == 1 else (parts[1] if len(parts) > 1 else "")
                if target:
                    found.add(target)
                else:  # from . import x / from fastapi_rwdb import x
                    found.update(a.name if a.name in MODULES else "__init__" for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "fastapi_rwdb":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse((PACKAGE / f"{module}.py").read_text()))
    found.discard(module)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> None:
        for dependency in sorted(graph.get(module, ())):
            if dependency in path:
                cycles.append([*path[path.index(dependency) :], dependency])
            elif dependency not in done:
                walk(dependency, [*path, dependency])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            walk(module, [module])
    return cycles


def test_no_import_cycle_between_the_modules() -> None:
    graph = {module: _imported_modules(module) for module in MODULES}
    assert graph["engines"] >= {"hooks", "pooling"}  # the walk sees the imports at all
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_readme_layout_names_every_module() -> None:
    section = README.read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    missing = [m for m in MODULES if f"`{m}.py`" not in section]
    assert missing == []


#: Where each name imported from ``fastapi_rwdb.engines`` lives since that module
#: was split (or earlier moves); importing it from engines must keep working.
MOVED_FROM_ENGINES = {
    "COMMIT_INFO": "channel",
    "POSITION_INFO": "channel",
    "REPORTED_POSITION": "channel",
    "want_position": "channel",
    "POSITION_SQL": "driver",
    "fetch_outside_transaction": "driver",
    "looks_alive": "driver",
    "ROLE_OPTION": "hooks",
    "READ_ONLY_SQLSTATE": "faults",
    "is_transient_connect_error": "faults",
    "sqlstate_of": "faults",
    "parse_lsn": "lsn",
}


@pytest.mark.parametrize(("name", "home"), sorted(MOVED_FROM_ENGINES.items()))
def test_moved_names_still_import_from_engines(name: str, home: str) -> None:
    engines = importlib.import_module("fastapi_rwdb.engines")
    assert name in engines.__all__
    assert getattr(engines, name) is getattr(importlib.import_module(f"fastapi_rwdb.{home}"), name)
