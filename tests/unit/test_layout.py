"""The package's shape, checked by reading its source: every import runs down the
layers (none up, none in a circle, none hidden behind ``TYPE_CHECKING``), no module
is over 400 lines, every module is on the architecture page, and the documented
import paths exist. No database."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import fastapi_rwdb

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "fastapi_rwdb"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
MODULES = sorted(
    ".".join(path.relative_to(PACKAGE).with_suffix("").parts) for path in PACKAGE.rglob("*.py")
)

#: The layers, bottom first: a module imports only from its own layer or those below
#: (without a circle, which test_no_import_circle_at_all looks for).
LAYERS: dict[str, int] = {
    "errors": 0,
    "settings": 0,
    "settings_values": 0,
    "routing": 1,
    "observe": 2,
    "engine": 3,
    "orm": 4,
    "database": 5,
    "current": 5,
    "stand_ins": 5,
    "web": 6,
    "__init__": 7,
    "__main__": 7,
    "wiring": 7,
    "jobs": 7,
    "sqlmodel": 7,
    "testing": 7,
    "audit": 7,
}


def _room(module: str) -> str:
    """The layer's key: the folder, or the root module itself."""
    return module.split(".")[0]


def _as_module(parts: list[str]) -> str | None:
    name = ".".join(parts)
    if name in MODULES:
        return name
    init = ".".join([*parts, "__init__"])
    return init if init in MODULES else None


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """The package modules one ``from ... import`` statement in ``module`` reads."""
    if node.level:
        package = module.split(".")[:-1]  # the folder of a module, or of an __init__
        base = package[: len(package) - (node.level - 1)]
    elif (node.module or "").split(".")[0] == "fastapi_rwdb":
        base = []
    else:
        return []
    parts = [*base, *(node.module.split(".") if node.module else [])]
    if parts[:1] == ["fastapi_rwdb"]:
        parts = parts[1:]
    targets = []
    for alias in node.names:
        target = _as_module([*parts, alias.name]) or _as_module(parts)
        assert target is not None, f"{module}: cannot resolve {ast.unparse(node)}"
        targets.append(target)
    return targets


def imports_of(module: str) -> tuple[set[str], list[str]]:
    """The package modules ``module`` imports (deferred ones too: they still run), and
    the ones it imports only for the type checker."""
    path = PACKAGE / Path(*module.split(".")).with_suffix(".py")
    found: set[str] = set()
    typing_only: list[str] = []

    def visit(node: ast.AST, hidden: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden = True
        if isinstance(node, ast.ImportFrom):
            for target in _resolve(module, node):
                (typing_only.append if hidden else found.add)(target)  # type: ignore[operator]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "fastapi_rwdb":
                    target = _as_module(parts[1:]) or "__init__"
                    (typing_only.append if hidden else found.add)(target)  # type: ignore[operator]
        for child in ast.iter_child_nodes(node):
            visit(child, hidden)

    visit(ast.parse(path.read_text()), False)
    found.discard(module)
    return found, typing_only


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import that does not run down the layers."""
    wrong = []
    for module, targets in graph.items():
        source = _room(module)
        for target in targets:
            room = _room(target)
            if room == source:
                continue  # inside one folder (or one module)
            if LAYERS[room] > LAYERS[source]:  # a circle in one layer: test_no_import_circle
                wrong.append(f"{module} -> {target}")
    return sorted(wrong)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> None:
        for dependency in sorted(graph.get(module, ())):
            if dependency in path:
                found.append([*path[path.index(dependency) :], dependency])
            elif dependency not in done:
                walk(dependency, [*path, dependency])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            walk(module, [module])
    return found


GRAPH = {module: imports_of(module)[0] for module in MODULES}


def test_every_room_has_a_layer() -> None:
    assert sorted({_room(m) for m in MODULES} - set(LAYERS)) == []
    assert GRAPH["orm.reads"] >= {"routing.rules", "engine.checkout"}  # the walk sees imports


def test_imports_run_down_the_layers() -> None:
    assert upward(GRAPH) == []


def test_the_layer_check_finds_an_import_that_runs_up() -> None:
    assert upward({"engine.wire": {"orm.reads"}, "orm.reads": {"engine.wire"}}) == [
        "engine.wire -> orm.reads"
    ]
    assert upward({"web.debug": {"jobs"}}) == ["web.debug -> jobs"]


def test_no_import_circle_at_all() -> None:
    assert cycles(GRAPH) == []
    hidden = {m: imports_of(m)[1] for m in MODULES}
    assert {m: t for m, t in hidden.items() if t} == {}


def test_the_circle_check_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


@pytest.mark.parametrize("module", MODULES)
def test_no_module_over_400_lines(module: str) -> None:
    path = PACKAGE / Path(*module.split(".")).with_suffix(".py")
    assert len(path.read_text().splitlines()) <= 400


def test_the_architecture_page_names_every_module() -> None:
    page = ARCHITECTURE.read_text()
    missing = [m for m in MODULES if f"`{m.replace('.', '/')}.py`" not in page]
    assert missing == []


@pytest.mark.parametrize("name", fastapi_rwdb.__all__)
def test_the_public_api_is_listed_once_and_importable(name: str) -> None:
    assert fastapi_rwdb.__all__.count(name) == 1
    assert getattr(fastapi_rwdb, name) is not None


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("fastapi_rwdb.routing", "choose_read_route"),  # README names it
        ("fastapi_rwdb.testing", "RWDBKit"),
        ("fastapi_rwdb.sqlmodel", "ReadSession"),
        ("fastapi_rwdb.audit", "audit_app"),
    ],
)
def test_documented_import_paths_exist(module: str, name: str) -> None:
    assert hasattr(importlib.import_module(module), name)
