"""The no-cluster layer: pure logic, in seconds (``pytest tests/unit``). A test here
that asks for the local stack belongs in tests/stack/: collection stops and says so."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        in_unit = "tests/unit/" in item.nodeid
        if in_unit and item.get_closest_marker("stack"):
            raise pytest.UsageError(f"{item.nodeid} needs the stack: move it to tests/stack/")
