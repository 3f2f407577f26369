"""Fresh reads and primary reads, with one replica's replay paused.

Someone else (a plain connection to the primary, no token) writes a row; right
after, a client with no token reads it. A plain read session may reach the
paused replica and miss it (the control); a fresh read never does, and neither
does a primary read.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI
from sqlalchemy import text

import fastapi_rwdb
from fastapi_rwdb import (
    AsyncFreshReadSession,
    AsyncPrimaryReadSession,
    AsyncReadSession,
    Database,
    FreshReadSession,
    PrimaryReadSession,
    ReadSession,
    RWDBSettings,
)
from tests.stack.test_unequal_replicas import WHERE, paused

from ..helpers import KEY, client, dsn, rwdb_app, serve, warm

pytestmark = pytest.mark.stack

__all__ = ["paused"]  # the module-scoped fixture: one replica paused for this module


def someone_else_writes() -> str:
    name = f"fresh-{uuid.uuid4()}"
    with psycopg.connect(dsn(), prepare_threshold=None, autocommit=True) as conn:
        conn.execute("INSERT INTO rwdb_items (name) VALUES (%s)", (name,))
    return name


def make_app(**overrides: Any) -> FastAPI:
    app = rwdb_app(routing_header=True, **overrides)

    def answer(row: Any) -> dict[str, Any]:
        port, replica, found = row
        return {"port": port, "replica": replica, "found": found}

    @app.get("/plain/{name}")
    def plain(name: str, db: ReadSession) -> dict[str, Any]:
        return answer(db.execute(text(WHERE), {"n": name}).one())

    @app.get("/fresh/{name}")
    def fresh(name: str, db: FreshReadSession) -> dict[str, Any]:
        return answer(db.execute(text(WHERE), {"n": name}).one())

    @app.get("/primary/{name}")
    def primary(name: str, db: PrimaryReadSession) -> dict[str, Any]:
        return answer(db.execute(text(WHERE), {"n": name}).one())

    @app.get("/async/plain/{name}")
    async def plain_async(name: str, db: AsyncReadSession) -> dict[str, Any]:
        return answer((await db.execute(text(WHERE), {"n": name})).one())

    @app.get("/async/fresh/{name}")
    async def fresh_async(name: str, db: AsyncFreshReadSession) -> dict[str, Any]:
        return answer((await db.execute(text(WHERE), {"n": name})).one())

    @app.get("/async/primary/{name}")
    async def primary_async(name: str, db: AsyncPrimaryReadSession) -> dict[str, Any]:
        return answer((await db.execute(text(WHERE), {"n": name})).one())

    return app


@pytest.mark.parametrize("flavour", ["", "/async"])
async def test_a_fresh_read_always_sees_what_someone_else_just_wrote(
    paused: tuple[int, int], flavour: str
) -> None:
    behind, _ = paused
    app = make_app(pin_wait_ms=300)
    fresh_missed, plain_missed, fresh_ports = 0, 0, []
    async with serve(app), client(app) as stranger:
        await warm(app, f"{flavour}/plain/warm", paused)
        for _ in range(15):
            name = someone_else_writes()
            # Several at once, so they take connections to both replicas.
            plains = await asyncio.gather(
                *(stranger.get(f"{flavour}/plain/{name}") for _ in range(6))
            )
            plain_missed += sum(not p.json()["found"] for p in plains)
            fresh = (await stranger.get(f"{flavour}/fresh/{name}")).json()
            fresh_missed += not fresh["found"]
            fresh_ports.append(fresh["port"] if fresh["replica"] else "primary")
            # A fresh read needs no token, and hands none out.
            assert not stranger.cookies.get("rwdb_pin")
    assert fresh_missed == 0, f"{fresh_missed} of 15 fresh reads missed the row"
    assert behind not in fresh_ports, fresh_ports
    # (That a replica which has the row does serve fresh reads is shown on one server,
    # deterministically, in test_testing_plugin: here it depends on the pool's order.)
    # The control: plain reads do reach the paused replica and miss the row.
    assert plain_missed > 0


@pytest.mark.parametrize("flavour", ["", "/async"])
async def test_a_primary_read_is_on_the_primary(paused: tuple[int, int], flavour: str) -> None:
    app = make_app()
    async with serve(app), client(app) as stranger:
        for _ in range(5):
            name = someone_else_writes()
            response = await stranger.get(f"{flavour}/primary/{name}")
            assert response.json()["found"] is True
            assert response.json()["replica"] is False


async def test_the_fresh_context_managers_see_what_someone_else_just_wrote(
    paused: tuple[int, int],
) -> None:
    database = fastapi_rwdb.configure(RWDBSettings(secret_key=KEY))
    # Several read connections at once, so the pool holds some to each replica.
    sessions = [database.read_session() for _ in range(8)]
    ports = {s.execute(text("SELECT inet_server_port()")).scalar_one() for s in sessions}
    for s in sessions:
        s.close()
    assert set(paused) <= ports, ports
    missed = {"fresh": 0, "async fresh": 0, "plain": 0}
    for _ in range(12):
        name = someone_else_writes()
        with fastapi_rwdb.get_fresh_read_db_context() as db:
            missed["fresh"] += not db.execute(text(WHERE), {"n": name}).one()[2]
        async with fastapi_rwdb.get_async_fresh_read_db_context() as adb:
            missed["async fresh"] += not (await adb.execute(text(WHERE), {"n": name})).one()[2]
        with fastapi_rwdb.get_read_db_context() as db:
            missed["plain"] += not db.execute(text(WHERE), {"n": name}).one()[2]
    assert missed["fresh"] == 0 and missed["async fresh"] == 0, missed
    assert missed["plain"] > 0, missed  # the control


def test_a_fresh_read_in_window_mode_is_a_primary_read() -> None:
    db = Database(RWDBSettings(secret_key=KEY, pin_mode="window"))
    try:
        with db.read_session(fresh=True) as session:
            assert session.execute(text("SELECT pg_is_in_recovery()")).scalar_one() is False
    finally:
        db.dispose_sync()
