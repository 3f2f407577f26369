"""The pytest plugin (fastapi_rwdb.testing), used as an application's own tests would.

Most tests run on one plain PostgreSQL 15 started here in a temporary directory
(no PgBouncer, no replica: what a CI job's service container gives), with the
read and write URLs both pointing at it; one runs the stale replica on the full
stack too.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

import fastapi_rwdb
from fastapi_rwdb import (
    AsyncReadSession,
    Database,
    ReadSession,
    RWDBSettings,
)
from fastapi_rwdb.observe import listeners as observers
from fastapi_rwdb.testing import RoutingRecorder, RWDBKit, StaleReplica

from ..helpers import KEY, add_writes, client, rwdb_app

PG_BIN = Path("/usr/lib/postgresql/15/bin")
TABLE = "CREATE TABLE IF NOT EXISTS kit_items (id bigserial PRIMARY KEY, name text NOT NULL)"
FOUND = "SELECT EXISTS (SELECT 1 FROM kit_items WHERE name = :n)"


def _as_db_owner(args: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the stack's user."""
    if os.geteuid() == 0:
        return ["setpriv", "--reuid=rwdb", "--regid=rwdb", "--init-groups", "--", *args]
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def plain_postgres() -> Iterator[str]:
    """A throwaway PostgreSQL 15, trust authentication; its URL."""
    if not (PG_BIN / "initdb").exists():
        pytest.fail(f"PostgreSQL 15 server binaries are needed in {PG_BIN}", pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="rwdb-plain-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "rwdb", "rwdb")
    data, port = root / "data", _free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C", "LC_ALL": "C"}

    def run(*args: str) -> None:
        subprocess.run(_as_db_owner(list(args)), check=True, capture_output=True, env=env)

    run(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync",
        "-E", "UTF8", "--locale=C")  # fmt: skip
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options, "-w",
        "start")  # fmt: skip
    try:
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(TABLE)
        yield url
    finally:
        run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def plain_settings(url: str, **overrides: Any) -> RWDBSettings:
    return RWDBSettings(
        write_url=url,  # type: ignore[arg-type]
        read_url=url,  # type: ignore[arg-type]
        secret_key=KEY,  # type: ignore[arg-type]
        routing_header=True,
        **overrides,
    )


def make_app(database: Database) -> FastAPI:
    app = rwdb_app(database)
    add_writes(app, "/items", "kit_items")

    @app.get("/items/{name}")
    def read(name: str, db: ReadSession) -> dict[str, Any]:
        return {"found": db.execute(text(FOUND), {"n": name}).scalar_one()}

    @app.get("/async/items/{name}")
    async def read_async(name: str, db: AsyncReadSession) -> dict[str, Any]:
        return {"found": (await db.execute(text(FOUND), {"n": name})).scalar_one()}

    return app


@asynccontextmanager
async def serving(database: Database) -> AsyncIterator[FastAPI]:
    app = make_app(database)
    async with app.router.lifespan_context(app):
        yield app


def write_fixture_row(kit: RWDBKit | None, c: httpx.AsyncClient, database: Database) -> str:
    """What a test's fixture does: insert a row outside any request."""
    name = f"fixture-{uuid.uuid4()}"
    insert = text("INSERT INTO kit_items (name) VALUES (:n)")
    if kit is None:
        with fastapi_rwdb.get_write_db_context() as db:
            db.execute(insert, {"n": name})
    else:
        with kit.seed(c, database=database) as db:
            db.execute(insert, {"n": name})
    return name


# -- on one plain PostgreSQL ---------------------------------------------------------------


async def test_a_seeded_row_is_seen_through_the_api_only_with_the_helper(
    plain_postgres: str, rwdb: RWDBKit, rwdb_routes: RoutingRecorder
) -> None:
    database = Database(plain_settings(plain_postgres))
    fastapi_rwdb.configure(database)  # get_write_db_context() writes here too
    async with serving(database) as app:
        with rwdb.stale_replica(database):
            # Without the helper: the fixture's row is not on the (stale) replica.
            async with client(app) as c:
                name = write_fixture_row(None, c, database)
                assert (await c.get(f"/items/{name}")).json() == {"found": False}
            # With it: the client holds the token for the fixture's commit.
            async with client(app) as c:
                name = write_fixture_row(rwdb, c, database)
                assert (await c.get(f"/items/{name}")).json() == {"found": True}
                assert (await c.get(f"/async/items/{name}")).json() == {"found": True}
                assert rwdb.token is not None
    read = rwdb_routes.last("GET", f"/items/{name}")
    assert read.read_targets == ["primary"] and read.pinned, read
    assert read.reads[0].reason == "replica-behind"


@pytest.mark.parametrize("flavour", ["", "/async"])
async def test_in_a_stale_block_the_writer_reads_its_write_and_others_the_old_data(
    plain_postgres: str, rwdb: RWDBKit, rwdb_routes: RoutingRecorder, flavour: str
) -> None:
    database = Database(plain_settings(plain_postgres))
    async with serving(database) as app, client(app) as writer, client(app) as stranger:
        before = (await writer.post(f"{flavour}/items")).json()["name"]
        with rwdb.stale_replica(database) as stale:
            assert isinstance(stale, StaleReplica)
            name = (await writer.post(f"{flavour}/items")).json()["name"]
            token = writer.cookies.get("rwdb_pin")
            assert token
            for _ in range(3):
                assert (await writer.get(f"{flavour}/items/{name}")).json()["found"] is True
            assert (await stranger.get(f"{flavour}/items/{name}")).json()["found"] is False
            # What was there when the block began is seen by everyone.
            assert (await stranger.get(f"{flavour}/items/{before}")).json()["found"] is True
            # A job handed the token waits for the stale side, then reads the primary.
            with fastapi_rwdb.get_read_db_context(after=token, wait=0.2) as db:
                assert db.execute(text(FOUND), {"n": name}).scalar_one() is True
            with fastapi_rwdb.get_read_db_context() as db:
                assert db.execute(text(FOUND), {"n": name}).scalar_one() is False
            # A fresh read sees it too (the primary has moved on since the snapshot).
            with fastapi_rwdb.get_fresh_read_db_context() as db:
                assert db.execute(text(FOUND), {"n": name}).scalar_one() is True
            # No token is cleared while the stale side lacks the write.
            response = await writer.get(f"{flavour}/items/{name}")
            assert response.headers.get("x-rwdb-pin") is None and writer.cookies.get("rwdb_pin")
        # After the block, reads see the database as it is.
        assert (await stranger.get(f"{flavour}/items/{name}")).json()["found"] is True
    post = rwdb_routes.last("POST", f"{flavour}/items")
    assert post.issued_token and post.reads == []
    mine = rwdb_routes.find("GET", f"{flavour}/items/{name}")
    assert mine[0].read_targets == ["primary"] and mine[0].pinned
    assert mine[0].reads[0].checked_lsn is not None
    theirs = rwdb_routes.last("GET", f"{flavour}/items/{before}")
    assert theirs.read_targets == ["replica"] and not theirs.pinned


async def test_the_recorder_tells_reads_tokens_and_pins_apart(
    plain_postgres: str, rwdb_routes: RoutingRecorder
) -> None:
    database = Database(plain_settings(plain_postgres))
    async with serving(database) as app, client(app) as c:
        await c.get("/items/nothing")
        name = (await c.post("/items")).json()["name"]
        await c.get(f"/items/{name}")
    plain = rwdb_routes.last("GET", "/items/nothing")
    assert plain.read_targets == ["replica"] and plain.reads[0].reason == "default"
    assert not plain.pinned and plain.tokens == []
    assert rwdb_routes.last("POST", "/items").tokens == ["issued"]
    pinned = rwdb_routes.last("GET", f"/items/{name}")
    # One server: it has the write, so the replica side serves, after a check.
    assert pinned.pinned and pinned.read_targets == ["replica"]
    assert pinned.reads[0].reason == "caught-up"
    assert rwdb_routes.outside.reads == []
    # A fresh read, with nothing written since it took the primary's position: the
    # replica side has it, and serves.
    fastapi_rwdb.configure(database)
    with fastapi_rwdb.get_fresh_read_db_context() as db:
        db.execute(text("SELECT 1"))
    (fresh,) = rwdb_routes.outside.reads
    assert (fresh.target, fresh.reason, fresh.pinned) == ("replica", "caught-up", True)
    assert fresh.checked_lsn is not None
    with fastapi_rwdb.get_read_db_context(primary=True) as db:
        db.execute(text("SELECT 1"))
    assert rwdb_routes.outside.reads[-1].reason == "primary-read"


def test_the_recorder_listens_only_while_installed() -> None:
    before = observers._routes
    recorder = RoutingRecorder()
    with recorder.installed():
        assert observers.active is True
        assert recorder.on_route in observers._routes
    assert observers._routes == before


@pytest.fixture
def plain_default(plain_postgres: str) -> Iterator[Database]:
    database = fastapi_rwdb.configure(plain_settings(plain_postgres))
    yield database
    database.dispose_sync()


@pytest.mark.rwdb_stale
def test_the_mark_freezes_the_process_wide_read_side(plain_default: Database) -> None:
    name = f"marked-{uuid.uuid4()}"
    with fastapi_rwdb.get_write_db_context() as db:
        db.execute(text("INSERT INTO kit_items (name) VALUES (:n)"), {"n": name})
    with fastapi_rwdb.get_read_db_context() as db:
        assert db.execute(text(FOUND), {"n": name}).scalar_one() is False
    with fastapi_rwdb.get_read_db_context(primary=True) as db:
        assert db.execute(text(FOUND), {"n": name}).scalar_one() is True


# -- on the full stack -----------------------------------------------------------------------


@pytest.mark.stack
@pytest.mark.parametrize("flavour", ["", "/async"])
async def test_the_stale_block_on_the_full_stack(
    rwdb: RWDBKit, rwdb_routes: RoutingRecorder, flavour: str
) -> None:
    import psycopg

    from ..helpers import dsn

    with psycopg.connect(dsn(), prepare_threshold=None, autocommit=True) as conn:
        conn.execute(TABLE)
    database = Database(RWDBSettings(secret_key=KEY))
    async with serving(database) as app, client(app) as writer, client(app) as stranger:
        with rwdb.stale_replica(database):
            name = (await writer.post(f"{flavour}/items")).json()["name"]
            for _ in range(3):
                assert (await writer.get(f"{flavour}/items/{name}")).json()["found"] is True
                assert (await stranger.get(f"{flavour}/items/{name}")).json()["found"] is False
            seed = f"seed-{uuid.uuid4()}"
            async with client(app) as seeded:
                async with rwdb.aseed(seeded, database=database) as db:
                    await db.execute(text("INSERT INTO kit_items (name) VALUES (:n)"), {"n": seed})
                assert (await seeded.get(f"{flavour}/items/{seed}")).json()["found"] is True
                assert (await stranger.get(f"{flavour}/items/{seed}")).json()["found"] is False
    seeded_read, stranger_read = rwdb_routes.find("GET", f"{flavour}/items/{seed}")
    assert seeded_read.read_targets == ["primary"] and seeded_read.pinned
    assert stranger_read.read_targets == ["replica"] and not stranger_read.pinned


def test_the_readme_example_with_a_test_client(
    plain_default: Database, rwdb: RWDBKit, rwdb_routes: RoutingRecorder
) -> None:
    """As docs/testing.md shows it: TestClient, the process-wide Database, seed then list."""
    from fastapi.testclient import TestClient

    client = TestClient(make_app(plain_default))
    name = f"readme-{uuid.uuid4()}"
    with rwdb.stale_replica():
        with rwdb.seed(client) as db:
            db.execute(text("INSERT INTO kit_items (name) VALUES (:n)"), {"n": name})
        assert client.get(f"/items/{name}").json() == {"found": True}
        assert TestClient(client.app).get(f"/items/{name}").json() == {"found": False}
    first, second = rwdb_routes.find("GET", f"/items/{name}")
    assert first.pinned and first.read_targets == ["primary"]
    assert second.read_targets == ["replica"] and not second.pinned
    client.post("/items")
    assert rwdb_routes.last("POST", "/items").issued_token
