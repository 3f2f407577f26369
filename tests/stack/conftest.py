"""Fixtures of the stack tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fastapi_rwdb import Database, RWDBSettings


@pytest.fixture
def db() -> Iterator[Database]:
    """A Database with the environment's settings, disposed of after the test."""
    database = Database(RWDBSettings())
    try:
        yield database
    finally:
        database.dispose_sync()
