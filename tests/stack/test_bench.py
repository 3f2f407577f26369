"""The bench (issue 20, item 2): a replica whose path froze costs one read its
deadline, not every read that meets it.

Reads go through HAProxy's read port (both replicas, round robin), as in
production; one replica's PgBouncer is frozen (SIGSTOP, undone in a ``finally``:
see :mod:`.faults`). Run under the machine-wide lock like every stack test.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from contextlib import AsyncExitStack, ExitStack

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from fastapi_rwdb import (
    AsyncReadSession,
    Database,
    ReadSession,
    RWDBSettings,
    get_database,
    using,
)
from fastapi_rwdb.engine.sqlstates import sqlstate_of
from fastapi_rwdb.observe import metrics

from ..helpers import client, replica_nodes, rwdb_app, serve
from .faults import read_one

pytestmark = pytest.mark.stack

DEADLINE = 1.0  # RWDB_READ_TIMEOUT
BENCH = 3.0  # RWDB_REPLICA_BENCH_SECONDS
WARM = 6  # pooled read connections opened before the freeze, over both replicas
READS = 20  # reads one after another while frozen
SLOW = 0.5  # seconds: a read longer than this paid a deadline (a replica read takes ms)
FREEZE_AT_MOST = 18.0  # the dead-man switch: the freeze never outlives it

#: Where a read ran: the replica's member name (its WAL receiver's slot), or "primary".
WHERE = text("SELECT coalesce((SELECT slot_name::text FROM pg_stat_wal_receiver), 'primary')")


def bench_database(bench: float = BENCH) -> Database:
    return Database(
        RWDBSettings(
            read_timeout=DEADLINE,
            replica_bench_seconds=bench,
            debug_routes=True,
            secret_key="test-secret-key-0123456789abcdef",
        )  # type: ignore[call-arg]
    )


def read_sync(database: Database) -> tuple[float, str]:
    started = time.monotonic()
    with database.read_session() as session:
        where = session.execute(WHERE).scalar_one()
    return time.monotonic() - started, str(where)


async def read_async(database: Database) -> tuple[float, str]:
    started = time.monotonic()
    async with database.async_read_session() as session:
        where = (await session.execute(WHERE)).scalar_one()
    return time.monotonic() - started, str(where)


def warm_sync(database: Database) -> Counter[str]:
    """WARM read connections open at once, so the pool keeps them: HAProxy spreads them."""
    with ExitStack() as stack:
        sessions = [stack.enter_context(database.read_session()) for _ in range(WARM)]
        return Counter(str(s.execute(WHERE).scalar_one()) for s in sessions)


async def warm_async(database: Database) -> Counter[str]:
    async with AsyncExitStack() as stack:
        sessions = [
            await stack.enter_async_context(database.async_read_session()) for _ in range(WARM)
        ]
        return Counter([str((await s.execute(WHERE)).scalar_one()) for s in sessions])


async def frozen_run(
    database: Database, node: str, driver: str
) -> tuple[Counter[str], list[tuple[float, str]], Counter[str]]:
    """Warm the pool, freeze ``node``'s PgBouncer, read READS times one after another;
    resume it, wait out the bench, open WARM connections again. (Where each of those
    went, before and after, and the reads while frozen.)"""
    # Imported here: the fault helpers send signals; nothing else in this module does.
    from .faults import frozen_bouncer

    warmed = warm_sync(database) if driver == "psycopg" else await warm_async(database)
    assert warmed[node] >= 2, f"the pool did not reach {node} twice: {warmed}"
    await asyncio.sleep(0.6)  # idle beyond RWDB_PING_SKIP_MS: each checkout pings
    during: list[tuple[float, str]] = []
    with frozen_bouncer(node, at_most=FREEZE_AT_MOST):
        for _ in range(READS):
            during.append(
                await asyncio.to_thread(read_sync, database)
                if driver == "psycopg"
                else await read_async(database)
            )
    await asyncio.sleep(BENCH + 0.2)
    # New connections (the pool kept only the healthy replica's): HAProxy spreads them.
    after = warm_sync(database) if driver == "psycopg" else await warm_async(database)
    return warmed, during, after


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_a_frozen_replica_costs_one_read_its_deadline_then_is_passed_over(
    driver: str,
) -> None:
    """Of READS reads after the freeze, one pays the deadline (it benches the replica);
    the others are fast and served by the healthy replica; the bench shows in the debug
    route and the gauge; after the bench time (the PgBouncer resumed) the replica
    serves reads again."""
    node = replica_nodes()[0]
    database = bench_database()
    app = rwdb_app(database)
    metrics.install(get_database)
    try:
        async with serve(app):
            warmed, during, after = await frozen_run(database, node, driver)
            slow = [round(took, 2) for took, _ in during if took > SLOW]
            longest = max(took for took, _ in during)
            places = Counter(where for _, where in during)
            assert len(slow) == 1, f"reads that paid a deadline: {slow} ({places}, warm {warmed})"
            assert longest < DEADLINE + 1.0, f"longest read while frozen: {longest:.2f} s"
            assert node not in places, f"a read was served by the frozen {node}: {places}"
            assert places["primary"] <= 1, f"reads moved to the primary: {places}"
            assert not database.health.bench.is_benched(node), "still benched after the time"
            assert after[node] >= 1, f"the replica never served again: {after}"
            print(f"{driver}: slow {slow}, longest {longest:.2f} s, {dict(places)}; after {after}")
    finally:
        await database.dispose()


async def test_the_bench_shows_in_the_debug_route_and_the_gauge() -> None:
    """While benched: ``/debug/read-write-split`` lists the replica with its time left,
    and ``rwdb_replica_benched{replica}`` is 1 (the healthy replica's is 0)."""
    from .faults import frozen_bouncer

    node = replica_nodes()[0]
    database = bench_database(bench=15.0)
    app = rwdb_app(database)
    metrics.install(get_database)
    try:
        async with serve(app):
            warmed = warm_sync(database)
            assert warmed[node] >= 1, warmed
            others = set(warmed) - {node, "primary"}
            await asyncio.sleep(0.6)
            with frozen_bouncer(node, at_most=FREEZE_AT_MOST):
                for _ in range(WARM):
                    await asyncio.to_thread(read_sync, database)
            assert database.health.bench.is_benched(node)
            async with client(app, timeout=20) as c:
                body = (await c.get("/debug/read-write-split")).json()
            benched = body["replicas"]["benched"]
            assert set(benched) == {node}, body["replicas"]
            assert 0 < benched[node] <= 15.0
            with using(database):
                assert REGISTRY.get_sample_value("rwdb_replica_benched", {"replica": node}) == 1
                for other in others:
                    labels = {"replica": other}
                    assert REGISTRY.get_sample_value("rwdb_replica_benched", labels) == 0
    finally:
        await database.dispose()


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_a_busy_replica_is_not_benched(driver: str) -> None:
    """A read slower than its deadline on a healthy replica ends with the server's 57014
    before the client gives up: that is an answer, so nothing is benched, and the same
    heavy read with a deadline that allows it stays on the replica."""
    database = bench_database()
    slow = text(
        "SELECT pg_sleep(:s),"
        " coalesce((SELECT slot_name::text FROM pg_stat_wal_receiver), 'primary')"
    )
    try:
        for _ in range(2):  # both replicas, likely (round robin)
            with pytest.raises(DBAPIError) as caught:
                await read_one(database, driver, slow, {"s": 2 * DEADLINE}, timeout=DEADLINE)
            assert sqlstate_of(caught.value) == "57014"
        assert database.health.bench.seconds_left() == {}, "a busy replica was benched"
        row = await read_one(database, driver, slow, {"s": 2 * DEADLINE}, timeout=4 * DEADLINE)
        assert row[1] != "primary", "a heavy read its deadline allows left the replicas"
        assert database.health.bench.seconds_left() == {}
    finally:
        await database.dispose()


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_new_connections_that_reach_a_benched_replica_are_replaced(driver: str) -> None:
    """No freeze: one replica benched as a read deadline would have. Every new connection
    the pool opens is asked once which replica it reached; one that reached the benched
    replica is closed and the connect made again, so HAProxy's round robin sends it to
    the other: every read is served by the healthy replica, none by the primary."""
    node = replica_nodes()[0]
    database = bench_database(bench=30.0)
    database.health.bench.bench(node)
    try:
        warmed = warm_sync(database) if driver == "psycopg" else await warm_async(database)
        assert node not in warmed, f"a new connection to the benched {node} served: {warmed}"
        assert warmed["primary"] == 0, f"reads left the replicas: {warmed}"
        assert database.health.bench.states()[node] is True
    finally:
        await database.dispose()


async def test_every_replica_benched_a_first_read_goes_to_the_primary_with_the_reason() -> None:
    """Both replicas benched: the connect gives up after servers.LANDINGS connections
    that each reached a benched replica, and the first read runs on the primary in the
    same request (``X-RWDB-Read: primary; reason=replica-benched``): a 200, never a
    hang or a 500. Both drivers."""
    database = Database(
        RWDBSettings(read_timeout=DEADLINE, routing_header=True, secret_key="k" * 32)  # type: ignore[call-arg]
    )
    for node in replica_nodes():
        database.health.bench.bench(node)
    app = rwdb_app(database)

    @app.get("/where")
    def where(db: ReadSession) -> str:
        return str(db.execute(WHERE).scalar_one())

    @app.get("/async/where")
    async def where_async(db: AsyncReadSession) -> str:
        return str((await db.execute(WHERE)).scalar_one())

    try:
        async with serve(app), client(app, timeout=20) as c:
            for path in ("/where", "/async/where"):
                started = time.monotonic()
                response = await c.get(path)
                took = time.monotonic() - started
                assert response.status_code == 200, (path, response.text)
                assert response.json() == "primary", path
                assert response.headers["X-RWDB-Read"] == "primary; reason=replica-benched"
                assert took < DEADLINE + 1.0, f"{path}: {took:.2f} s"
    finally:
        await database.dispose()
