"""Fixtures as an application's suite has them: rows written through a session of
their own, clients of several scopes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from fastapi_rwdb import get_write_db_context

from .schema import TABLE


@pytest.fixture
def fixture_user() -> Iterator[int]:
    """A user the test did not create through the API: no client has its token."""
    with get_write_db_context() as db:
        row = db.execute(
            text(f"INSERT INTO {TABLE} (name) VALUES (:n) RETURNING id"),
            {"n": f"fixture-{uuid.uuid4()}"},
        ).one()
    yield int(row[0])


@pytest.fixture(scope="session")
def session_client() -> Any:
    """One client for the whole run, never entered with ``with``: no lifespan at all."""
    from fastapi.testclient import TestClient

    from .app import app  # setup() must run after collection, as in an app

    return TestClient(app)


@pytest.fixture(scope="session")
def session_lifespan_client() -> Iterator[Any]:
    """One client for the whole run, with the app's lifespan: it overlaps the module
    clients', whose ends dispose of the app's engines under it."""
    from fastapi.testclient import TestClient

    from .app import app

    with TestClient(app) as c:
        yield c
