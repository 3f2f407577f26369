"""Round trips per request, counted on the wire, and the connections the checkout
ping no longer checks: a dead one is retried, never shown to the caller.

The proxy of ``benchmarks/wire.py`` sits between the app and HAProxy: it counts
what the client sends (every message the client then waits on is a round trip)
and can make every open connection die the moment it is next used, as one does
whose server went away silently.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

import fastapi_rwdb
from benchmarks.common import prepare_table, wait_replicas_have
from benchmarks.overhead import count_round_trips
from benchmarks.wire import WireCounter, round_trips
from fastapi_rwdb import (
    Database,
    RWDBSettings,
)

from ..helpers import add_named_item_routes, dsn

pytestmark = pytest.mark.stack


async def test_round_trips_per_route() -> None:
    """Issue 14's targets, and issue 22's for the reads: sync read 2 (its BEGIN
    goes with its statement), async read 3 (its BEGIN goes with the statement's
    describe step), writes one fewer than with a ping on every checkout and their
    WAL position read in their COMMIT's message (sync 3, async 4: BEGIN, asyncpg's
    describe and execute, COMMIT); a read with a token none more than one without."""
    ids = await asyncio.to_thread(prepare_table, 200)
    await asyncio.to_thread(wait_replicas_have, ids)
    counted = (await count_round_trips(ids, per_route=10))["routes"]
    rwdb = {key: route["rwdb"]["round_trips"] for key, route in counted.items()}
    assert rwdb["sync_read"] <= 2
    assert rwdb["async_read"] <= 3
    assert rwdb["sync_write"] <= 3
    assert rwdb["async_write"] <= 4
    # A token costs no round trip: the position is checked in the first statement's
    # own (orm.reads; psycopg: a quiet pool; asyncpg: a check kept with the BEGIN).
    assert rwdb["sync_read_token"] <= rwdb["sync_read"]
    assert rwdb["async_read_token"] <= rwdb["async_read"]
    print({key: rwdb[key] for key in sorted(rwdb)})
    for route in counted.values():
        assert route["rwdb"]["connects"] == 0  # pools warm: nothing opened


def upstream() -> dict[str, tuple[str, int]]:
    host = os.environ["POSTGRES_SERVER"]
    return {
        "write": (host, int(os.environ["POSTGRES_PORT"])),
        "read": (host, int(os.environ["POSTGRES_READ_PORT"])),
    }


def make_app(wire: WireCounter, **overrides: Any) -> FastAPI:
    settings = RWDBSettings(
        write_port=wire.ports["write"],
        read_port=wire.ports["read"],
        secret_key="round-trips-test-key-0123456789",
        routing_header=True,
        **overrides,
    )
    app = FastAPI()
    fastapi_rwdb.setup(app, Database(settings))
    add_named_item_routes(app)
    return app


@pytest.fixture
async def wire() -> AsyncIterator[WireCounter]:
    with WireCounter(upstream()) as counter:
        yield counter


def rows_named(name: str) -> int:
    with psycopg.connect(dsn(), prepare_threshold=None) as conn:
        row = conn.execute("SELECT count(*) FROM rwdb_items WHERE name = %s", (name,)).fetchone()
    return int(row[0]) if row else -1


WRITES = ["/core", "/orm", "/async/core", "/async/orm"]
READS = ["/read", "/async/read"]


@pytest.mark.parametrize("path", WRITES + READS)
async def test_a_connection_dead_at_its_first_statement_is_retried(
    wire: WireCounter, path: str
) -> None:
    """Pooled connections used moments ago are not pinged; when they are dead the
    first statement finds out, and it runs again on a new connection: the caller
    gets its answer, and a write is made exactly once."""
    app = make_app(wire)
    method = "POST" if path in WRITES else "GET"
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        for _ in range(3):  # pooled connections, no longer fresh, used just now
            warm = await client.request(method, f"{path}/warm-{uuid.uuid4()}")
            assert warm.status_code == 200, warm.text
        wire.reset()
        wire.break_established()
        name = f"retried-{uuid.uuid4()}"
        response = await client.request(method, f"{path}/{name}")
        assert response.status_code == 200, response.text
        counts = wire.counts()
    assert counts["startup"] >= 1  # it did meet a dead connection and opened another
    if method == "POST":
        assert await asyncio.to_thread(rows_named, name) == 1
    else:
        assert response.json() == {"count": 0}


async def test_without_the_window_every_checkout_pings(wire: WireCounter) -> None:
    app = make_app(wire, ping_skip_ms=0)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        for _ in range(3):
            await client.get(f"/read/warm-{uuid.uuid4()}")
        wire.reset()
        for _ in range(5):
            await client.get(f"/read/x-{uuid.uuid4()}")
        counts = wire.counts()
    # The ping (an empty query), BEGIN with the SELECT, ROLLBACK: three round trips each.
    assert round_trips(counts) == 3 * 5


def test_the_first_read_statement_opens_its_transaction_with_its_deadline() -> None:
    """psycopg: the BEGIN and the deadline's SET LOCAL are sent with the first
    statement (one round trip): the statement and the next run in one READ ONLY
    transaction with the server's statement timeout; a first statement that fails
    leaves the connection as psycopg keeps it (not in autocommit), and the next
    read on it works."""
    database = Database(RWDBSettings(read_timeout=5, pool_size=1))  # type: ignore[call-arg]
    show = text(
        "SELECT current_setting('statement_timeout'), current_setting('transaction_read_only'),"
        " now()"
    )
    try:
        for _ in range(2):
            with database.read_session() as s:
                timeout, read_only, started = s.execute(show).one()
                assert (timeout, read_only) == ("4s", "on")
                assert s.execute(text("SELECT now()")).scalar_one() == started
                raw = s.connection().connection.driver_connection
                assert raw.autocommit is False
        with pytest.raises(DBAPIError), database.read_session() as s:
            s.execute(text("SELECT 1 / 0"))
        assert raw.autocommit is False
        assert raw.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with database.read_session() as s:
            assert s.execute(show).one()[:2] == ("4s", "on")
            assert s.connection().connection.driver_connection is raw  # the same connection
    finally:
        database.dispose_sync()


async def test_a_read_connection_lost_as_its_begin_goes_is_discarded_alone(
    wire: WireCounter,
) -> None:
    """psycopg sends a read's BEGIN with its first statement: a connection found dead
    there is discarded alone, as one whose BEGIN went on its own was (the pool's
    other connections may reach another replica), and the read runs again."""
    app = make_app(wire)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        for _ in range(3):
            warm = await client.get(f"/read/warm-{uuid.uuid4()}")
            assert warm.status_code == 200, warm.text
        pool = fastapi_rwdb.get_database().engines.read.pool
        wire.break_established()
        response = await client.get(f"/read/{uuid.uuid4()}")
        assert response.status_code == 200, response.text
        assert wire.counts()["startup"] >= 1  # it met the dead connection
    assert pool._invalidate_time == 0  # type: ignore[attr-defined]  # not the whole pool
