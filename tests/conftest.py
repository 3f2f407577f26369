"""Shared fixtures. Tests marked ``stack`` run against the local cluster started by
``scripts/stack.sh up``; when it is not reachable they fail (never skip) and say so.

The tests use a database of their own (``rwdb_test``, or ``RWDB_TEST_DB``), never the
app's (``POSTGRES_DB``, ``rwdb`` in .env.example): ``scripts/dev.sh demo`` then shows
only what the demo wrote. It is set here, before anything reads the environment, so
that every app, engine and subprocess a test starts inherits it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
import pytest

from .helpers import TEST_DB, dsn

os.environ["POSTGRES_DB"] = TEST_DB


@pytest.fixture(scope="session")
def stack() -> Iterator[None]:
    """The cluster is up, and the test table exists on the primary."""
    try:
        with psycopg.connect(dsn(), connect_timeout=5, prepare_threshold=None) as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS rwdb_items ("
                " id bigserial PRIMARY KEY, name text NOT NULL,"
                " created_at timestamptz DEFAULT now())"
            )
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"the local stack is not reachable, or has no database {TEST_DB} "
            f"({exc.__class__.__name__}); start it with: bash scripts/stack.sh up "
            "(which also creates the database)",
            pytrace=False,
        )
    yield


@pytest.fixture(autouse=True)
def _restore_default_database() -> Iterator[None]:
    """setup()/configure() replace the process-wide Database; give the next test the old one."""
    import fastapi_rwdb

    with fastapi_rwdb.using(fastapi_rwdb.get_database()):
        yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # On demand only, when the run asks for them by marker: the soak (minutes of the
    # stack) and the grey read scenarios (their throughput bounds sit within this
    # machine's noise: docs/reliability.md, "Grey faults, measured").
    for marker in ("soak", "grey"):
        if marker in (config.getoption("markexpr") or ""):
            continue
        asked = [item for item in items if item.get_closest_marker(marker)]
        if asked:
            config.hook.pytest_deselected(items=asked)
            items[:] = [item for item in items if not item.get_closest_marker(marker)]
    for item in items:
        if item.get_closest_marker("stack"):
            item.fixturenames.insert(0, "stack")  # type: ignore[attr-defined]
    # The reliability suite changes which node is primary: it runs after everything else.
    items.sort(key=lambda item: item.get_closest_marker("reliability") is not None)
