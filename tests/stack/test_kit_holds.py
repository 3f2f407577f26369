"""The stale block holds whatever the app does inside it, on one plain PostgreSQL, and
raises where it cannot keep its promise (issue 21's first item; the unit side is
tests/unit/test_stand_ins.py, a whole sample suite is test_kit_fidelity.py)."""

from __future__ import annotations

import uuid

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

import fastapi_rwdb
from fastapi_rwdb import Database
from fastapi_rwdb.testing import StaleReplicaError, stale_replica

from .test_testing_plugin import FOUND, make_app, plain_postgres, plain_settings

__all__ = ["plain_postgres"]


def insert(database: Database) -> str:
    name = f"holds-{uuid.uuid4()}"
    with database.write_session() as db:
        db.execute(text("INSERT INTO kit_items (name) VALUES (:n)"), {"n": name})
        db.commit()
    return name


def found(client: TestClient, name: str, flavour: str = "") -> bool:
    response = client.get(f"{flavour}/items/{name}")
    assert response.status_code == 200, response.text
    return bool(response.json()["found"])


def test_lifespans_dispose_and_new_databases_inside_the_block(plain_postgres: str) -> None:
    database = Database(plain_settings(plain_postgres))
    app = make_app(database)
    with fastapi_rwdb.using(database), stale_replica(database):
        name = insert(database)
        for flavour in ("", "/async"):
            with TestClient(app) as c:  # a lifespan that starts and ends in the block
                assert not found(c, name, flavour)
            assert not found(TestClient(app), name, flavour)  # no lifespan at all
            with TestClient(app) as c:  # the engines rebuilt after that dispose()
                assert not found(c, name, flavour)
        # An app set up anew inside the block, with a Database of its own.
        again = fastapi_rwdb.configure(plain_settings(plain_postgres))
        with TestClient(make_app(again)) as c:
            assert not found(c, name)
            assert not found(c, name, "/async")
        # A job's read session after all that.
        with fastapi_rwdb.get_read_db_context() as db:
            assert db.execute(text(FOUND), {"n": name}).scalar_one() is False
        again.dispose_sync()
    with TestClient(app) as c:
        assert found(c, name)  # the block is over: the read side is the server again
    database.dispose_sync()


async def test_an_async_client_with_a_lifespan_per_test(plain_postgres: str) -> None:
    database = Database(plain_settings(plain_postgres))
    app = make_app(database)
    with stale_replica(database):
        name = insert(database)
        for _ in range(2):  # two "tests", each with its own lifespan
            transport = httpx.ASGITransport(app=app)
            async with (
                app.router.lifespan_context(app),
                httpx.AsyncClient(transport=transport, base_url="http://t") as c,
            ):
                assert (await c.get(f"/async/items/{name}")).json() == {"found": False}
                assert (await c.get(f"/items/{name}")).json() == {"found": False}
    await database.dispose()


def test_a_whole_run_block_refuses_a_cluster_it_does_not_stand_in_for(
    plain_postgres: str,
) -> None:
    with psycopg.connect(plain_postgres, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'kit_other'").fetchone():
            conn.execute("CREATE DATABASE kit_other")
    database = Database(plain_settings(plain_postgres))
    other = Database(plain_settings(plain_postgres.rsplit("/", 1)[0] + "/kit_other"))
    with (
        stale_replica(database, everywhere=True),
        pytest.raises(StaleReplicaError, match=r"kit_other.*--rwdb-stale"),
        other.read_session() as db,
    ):
        db.execute(text("SELECT 1"))
    with other.read_session() as db:  # the block is over: nothing to refuse
        assert db.execute(text("SELECT 1")).scalar_one() == 1
    database.dispose_sync()
    other.dispose_sync()


def test_a_lost_snapshot_fails_the_read_instead_of_reading_current_data(
    plain_postgres: str,
) -> None:
    database = Database(plain_settings(plain_postgres))
    with stale_replica(database):
        with psycopg.connect(plain_postgres, autocommit=True) as conn:
            # The connection holding the snapshot open, gone (as a server restart would).
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name LIKE '%stale-replica'"
            )
        with (
            pytest.raises(StaleReplicaError, match="snapshot could not be imported"),
            database.read_session() as db,
        ):
            db.execute(text("SELECT 1"))
    database.dispose_sync()
