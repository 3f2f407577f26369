"""Shared fixtures. Tests marked ``stack`` run against the local cluster started by
``scripts/stack.sh up``; when it is not reachable they fail (never skip) and say so.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
import pytest

# The local stack's address, as in .env.example. A developer's own environment wins.
STACK_ENV = {
    "POSTGRES_SERVER": "127.0.0.1",
    "POSTGRES_PORT": "5432",
    "POSTGRES_READ_PORT": "5433",
    "POSTGRES_USER": "rwdb_app",
    "POSTGRES_PASSWORD": "rwdb_app_pw",
    "POSTGRES_DB": "rwdb",
}
for _name, _value in STACK_ENV.items():
    os.environ.setdefault(_name, _value)


def dsn(port_var: str = "POSTGRES_PORT") -> str:
    e = os.environ
    return (
        f"host={e['POSTGRES_SERVER']} port={e[port_var]} user={e['POSTGRES_USER']} "
        f"password={e['POSTGRES_PASSWORD']} dbname={e['POSTGRES_DB']}"
    )


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
            f"the local stack is not reachable ({exc.__class__.__name__}); "
            "start it with: bash scripts/stack.sh up",
            pytrace=False,
        )
    yield


@pytest.fixture(autouse=True)
def _restore_default_database() -> Iterator[None]:
    """setup()/configure() replace the process-wide Database; give the next test the old one."""
    import fastapi_rwdb

    with fastapi_rwdb.using(fastapi_rwdb.get_database()):
        yield


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("stack"):
            item.fixturenames.insert(0, "stack")  # type: ignore[attr-defined]
    # The reliability suite changes which node is primary: it runs after everything else.
    items.sort(key=lambda item: item.get_closest_marker("reliability") is not None)
