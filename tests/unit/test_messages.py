"""Every warning and error message the package writes, rendered and proof-read.

Log calls (``logger.warning("... %s ...", value)``) and exception messages
(``raise SomeError(f"... {value} ...")``) are found in the source, rendered with
sample values, and checked for what a reader would trip over: a word doubled,
a placeholder left unformatted, an unbalanced backtick or parenthesis. The
lifespan warning, which once read "for the app this app", is also rendered for
every case it has. No database.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastapi_rwdb import RWDBSettings
from fastapi_rwdb.web.middleware import lifespan_missing_message

PACKAGE = Path(__file__).resolve().parents[2] / "fastapi_rwdb"
LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}
_DOUBLED = re.compile(r"\b(\w{2,})\s+\1\b", re.IGNORECASE)
_LEFT_OVER = re.compile(r"%[sdrf]|%\.\d+f|\{[a-z_]+\}")


def _literal(node: ast.AST) -> str | None:
    """A message as text, every interpolated value replaced by a distinct sample."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for i, value in enumerate(node.values):
            text = _literal(value) if isinstance(value, ast.Constant) else f"value{i}"
            parts.append(text or "")
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal(node.left), _literal(node.right)
        return None if left is None or right is None else left + right
    return None


def _render_log(fmt: str) -> str:
    count = 0

    def sample(match: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return "3" if match.group(0) != "%s" else f"sample{count}"

    return re.sub(r"%(?:\.\d+)?[sdrf]", sample, fmt)


def messages() -> Iterator[tuple[str, str]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        where = str(path.relative_to(PACKAGE.parent))
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in LEVELS:
                text = _literal(node.args[0])
                if text is not None:
                    yield f"{where}:{node.lineno}", _render_log(text)
            elif isinstance(func, ast.Name) and func.id.endswith(("Error", "Exception")):
                text = _literal(node.args[0])
                if text is not None:
                    yield f"{where}:{node.lineno}", text


MESSAGES = list(messages())


def proofread(text: str) -> list[str]:
    problems = [f"doubled word {m.group(0)!r}" for m in _DOUBLED.finditer(text)]
    left = _LEFT_OVER.search(text)
    if left is not None:
        problems.append(f"placeholder left: {left.group(0)!r}")
    if text.count("`") % 2:
        problems.append("unbalanced backtick")
    if text.count("(") != text.count(")"):
        problems.append("unbalanced parenthesis")
    return problems


def test_the_source_has_messages_to_read() -> None:
    assert len(MESSAGES) > 40


@pytest.mark.parametrize(("where", "text"), MESSAGES, ids=[w for w, _ in MESSAGES])
def test_message_reads_well(where: str, text: str) -> None:
    assert proofread(text) == []


def test_the_proofreader_finds_what_it_looks_for() -> None:
    assert proofread("requests for the app this app, the the end") == ["doubled word 'the the'"]
    assert proofread("cannot connect to %s") == ["placeholder left: '%s'"]
    assert proofread("use `with x:") == ["unbalanced backtick"]


SETTINGS = [
    RWDBSettings(write_url="postgresql://u:p@h:5432/d", read_url="postgresql://u:p@h:5433/d"),
    RWDBSettings(
        write_url="postgresql://u:p@h:5432/d",
        read_url="postgresql://u:p@h:5433/d",
        max_replica_lag=5,
    ),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["no-lag-limit", "lag-limit"])
@pytest.mark.parametrize("root_path", ["", "/api"])
def test_the_lifespan_warning_in_every_case(root_path: str, settings: RWDBSettings) -> None:
    text = lifespan_missing_message(root_path, settings)
    assert proofread(text) == []
    assert ("mounted at /api" in text) is bool(root_path)
    assert ("fastapi_rwdb.lifespan(" in text) is bool(root_path)  # only a mounted app needs it
    assert ("without its lifespan" in text) is not bool(root_path)
    assert ("replica-lag watch" in text) is (settings.max_replica_lag is not None)
    assert "this app this app" not in text and "the app this app" not in text
