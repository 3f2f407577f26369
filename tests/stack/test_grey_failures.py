"""Grey failures (issue 20): a replica's PgBouncer that stops answering without
closing anything (SIGSTOP: its kernel still completes TCP handshakes and takes
bytes), as a stopped proxy or a host stalled on I/O looks to a client.

Run under the machine-wide lock like every stack test; each freeze is undone
whatever the test does (see :mod:`.faults`).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

import psycopg
import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from fastapi_rwdb import (
    Database,
    ReplicaTimeoutError,
    RWDBSettings,
    WriteOutcomeUnknownError,
    make_engine,
)
from fastapi_rwdb.engine.sqlstates import sqlstate_of
from fastapi_rwdb.routing.lsn import MAX_LSN
from fastapi_rwdb.routing.request import RequestState, request_state

from ..helpers import dsn, replica_nodes
from .faults import bouncer_url, frozen_bouncer, read_one

pytestmark = pytest.mark.stack


def bouncer_settings(node: str, **overrides: object) -> RWDBSettings:
    url = bouncer_url(node)
    return RWDBSettings(write_url=url, read_url=url, **overrides)  # type: ignore[arg-type]


FREEZE = 8.0  # seconds: well beyond every deadline below


def test_the_checkout_ping_has_a_deadline_and_never_hands_out_what_timed_out() -> None:
    """Issue 20, item 4. A pooled connection whose PgBouncer froze: its checkout ping
    gives up after RWDB_CONNECT_TIMEOUT, the connection is discarded (never handed
    out), and the checkout opens no new one on the same frozen path: an outage
    (ReplicaTimeoutError) within the ping's deadline, well within the freeze.
    (Before: psycopg's ping waited for an answer until the freeze ended.)"""
    node = replica_nodes()[0]
    settings = bouncer_settings(node, connect_timeout=1, connect_retries=0, ping_skip_ms=0)
    engine = make_engine(settings.url("read", "psycopg"), settings, side="read")
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_is_in_recovery()")).scalar_one() is True
            pooled = conn.connection.dbapi_connection
        assert pooled is not None and not pooled.closed
        with frozen_bouncer(node, at_most=FREEZE + 5):
            started = time.monotonic()
            with pytest.raises(ReplicaTimeoutError), engine.connect():
                pass
            took = time.monotonic() - started
            assert pooled.closed, "the connection whose ping timed out was kept"
            time.sleep(max(0.0, FREEZE - (time.monotonic() - started)))
        # the ping's deadline (1 s), with room for a slow machine; no connect after it
        assert took < 2.0, f"the checkout took {took:.1f} s"
        with engine.connect() as conn:  # the path is back: a new connection serves
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
            assert conn.connection.dbapi_connection is not pooled
    finally:
        engine.dispose()


# -- item 1: the read deadline -------------------------------------------------------

DEADLINE = 1.0  # seconds: the routes' timeout= below


def replica_database(node: str) -> Database:
    """Reads on ``node``'s own PgBouncer (so the frozen path is certain), writes and
    primary reads through HAProxy's write port."""
    # The deadline alone: with the bench on, the replica would stay passed over after
    # the freeze (tests/stack/test_bench.py).
    settings = RWDBSettings(  # type: ignore[call-arg]
        read_url=bouncer_url(node),  # type: ignore[arg-type]
        connect_retries=0,
        read_timeout=DEADLINE,
        replica_bench_seconds=0,
    )
    return Database(settings)


def on_primary(session: Session) -> bool:
    return session.execute(text("SELECT pg_is_in_recovery()")).scalar_one() is False


def test_a_first_read_with_no_answer_runs_again_on_the_primary_within_the_deadline() -> None:
    """psycopg. The replica's PgBouncer freezes with a pooled connection warm: the
    read's first statement is abandoned at the deadline and runs on the primary, in
    well under the deadline plus 1 s; a read whose transaction ran a text statement
    before (it could have set something up there) fails with ReplicaTimeoutError (a
    503) just as fast; the pool keeps no connection that
    timed out."""
    node = replica_nodes()[0]
    database = replica_database(node)
    try:
        with database.read_session(timeout=DEADLINE) as s, database.read_session() as t:
            assert not on_primary(s) and not on_primary(t)  # warm: two pooled connections
        with database.read_session(timeout=DEADLINE) as later:
            assert not on_primary(later)  # a transaction that has read on the replica
            with frozen_bouncer(node, at_most=FREEZE + 10):
                started = time.monotonic()
                with database.read_session(timeout=DEADLINE) as s:
                    assert on_primary(s), "the abandoned first read did not go to the primary"
                first = time.monotonic() - started
                started = time.monotonic()
                with pytest.raises(ReplicaTimeoutError):
                    later.execute(text("SELECT 1")).scalar_one()
                second = time.monotonic() - started
        assert DEADLINE * 0.9 < first < DEADLINE + 1.0, f"first statement: {first:.2f} s"
        assert DEADLINE * 0.9 < second < DEADLINE + 1.0, f"later statement: {second:.2f} s"
        with database.read_session(timeout=DEADLINE) as s:  # the path is back
            assert not on_primary(s)
    finally:
        database.dispose_sync()


async def test_async_a_first_read_with_no_answer_runs_again_on_the_primary() -> None:
    """The asyncpg twin: abandoned at the deadline (the connection terminated, no
    cancel request), run on the primary; a later statement: ReplicaTimeoutError."""
    node = replica_nodes()[0]
    database = replica_database(node)

    async def primary(session: AsyncSession) -> bool:
        result = await session.execute(text("SELECT pg_is_in_recovery()"))
        return result.scalar_one() is False

    try:
        async with database.async_read_session() as s, database.async_read_session() as t:
            assert not await primary(s) and not await primary(t)  # warm: two connections
        async with database.async_read_session(timeout=DEADLINE) as later:
            assert not await primary(later)
            with frozen_bouncer(node, at_most=FREEZE + 10):
                started = time.monotonic()
                async with database.async_read_session(timeout=DEADLINE) as s:
                    assert await primary(s), "the abandoned first read did not go to the primary"
                first = time.monotonic() - started
                started = time.monotonic()
                with pytest.raises(ReplicaTimeoutError):
                    await later.execute(text("SELECT 1"))
                second = time.monotonic() - started
        assert DEADLINE * 0.9 < first < DEADLINE + 1.0, f"first statement: {first:.2f} s"
        assert DEADLINE * 0.9 < second < DEADLINE + 1.0, f"later statement: {second:.2f} s"
        async with database.async_read_session(timeout=DEADLINE) as s:
            assert not await primary(s)
    finally:
        await database.dispose()


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_a_busy_replica_answers_57014_in_time_and_the_read_stays_there(driver: str) -> None:
    """A read slower than its deadline on a healthy replica: the server's statement
    timeout (a little under the deadline) ends it with 57014 before the client gives
    up, so it is not taken for a frozen path and not moved to the primary; with a
    deadline that allows it (a report's route), the same read is served by the replica."""
    node = replica_nodes()[0]
    database = replica_database(node)
    slow = text("SELECT pg_sleep(:s), pg_is_in_recovery()")
    try:
        started = time.monotonic()
        with pytest.raises(DBAPIError) as caught:
            await read_one(database, driver, slow, {"s": 2 * DEADLINE}, timeout=DEADLINE)
        took = time.monotonic() - started
        assert sqlstate_of(caught.value) == "57014"
        assert took < DEADLINE, f"the server's timeout came after the deadline: {took:.2f} s"
        row = await read_one(database, driver, slow, {"s": 2 * DEADLINE}, timeout=4 * DEADLINE)
        assert row[1] is True, "a slow read allowed by its deadline left the replica"
    finally:
        await database.dispose()


# -- item 6: the write side, honestly -------------------------------------------------

WRITE_DEADLINE = 1.0


def _rows(name: str) -> int:
    with psycopg.connect(dsn(), prepare_threshold=None, connect_timeout=5) as conn:
        row = conn.execute("SELECT count(*) FROM rwdb_grey_writes WHERE name = %s", (name,))
        return int(row.fetchone()[0])  # type: ignore[index]


def test_a_frozen_primary_path_answers_writes_within_the_write_timeout() -> None:
    """The primary's PgBouncer frozen (HAProxy's write port still sends to it): a write
    statement, and a COMMIT, each raise WriteOutcomeUnknownError (a 503 that says the
    write may or may not have happened) within RWDB_WRITE_TIMEOUT + 1 s; neither is
    run again (each name is found at most once afterwards)."""
    database = Database(RWDBSettings(write_timeout=WRITE_DEADLINE, connect_retries=0))
    with psycopg.connect(dsn(), autocommit=True, prepare_threshold=None) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS rwdb_grey_writes (name text)")
        port = conn.execute("SELECT inet_server_port()").fetchone()[0]  # type: ignore[index]
    node = f"node{int(port) - 15431}"  # stack.sh: node1..3 listen on 15432..15434
    insert = text("INSERT INTO rwdb_grey_writes VALUES (:n)")
    statement, committed = f"s-{uuid.uuid4()}", f"c-{uuid.uuid4()}"
    try:
        with database.write_session() as a, database.write_session() as b:  # two warm
            a.execute(text("SELECT 1"))
            b.execute(text("SELECT 1"))
            a.commit()
            b.commit()
        with database.write_session() as pending:
            pending.execute(insert, {"n": committed})  # written, not yet committed
            with frozen_bouncer(node, at_most=FREEZE + 10):
                started = time.monotonic()
                with pytest.raises(WriteOutcomeUnknownError), database.write_session() as s:
                    s.execute(insert, {"n": statement})
                    s.commit()
                took_statement = time.monotonic() - started
                started = time.monotonic()
                with pytest.raises(WriteOutcomeUnknownError) as caught:
                    pending.commit()
                took_commit = time.monotonic() - started
        assert "may or may not have happened" in str(caught.value)
        for took in (took_statement, took_commit):
            assert took < WRITE_DEADLINE + 1.0, f"a write was answered after {took:.2f} s"
        time.sleep(1.0)  # whatever the thawed PgBouncer still had is done
        assert _rows(statement) <= 1 and _rows(committed) <= 1, "a write ran twice"
    finally:
        database.dispose_sync()


def test_the_position_read_after_a_commit_has_the_write_deadline() -> None:
    """A transaction that wrote only through a function its SELECT called: nothing
    showed it would write, so its COMMIT did not carry the position, which is read
    after it. The primary's PgBouncer frozen right after that COMMIT: the commit
    returns within RWDB_WRITE_TIMEOUT + 1 s (before: after the freeze), the client is
    pinned to the primary, the connection given up, and the write stands."""
    database = Database(RWDBSettings(write_timeout=WRITE_DEADLINE, connect_retries=0))
    with psycopg.connect(dsn(), autocommit=True, prepare_threshold=None) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS rwdb_grey_writes (name text)")
        conn.execute(
            "CREATE OR REPLACE FUNCTION rwdb_grey_write(n text) RETURNS text LANGUAGE sql"
            " AS 'INSERT INTO rwdb_grey_writes VALUES (n) RETURNING name'"
        )
        port = conn.execute("SELECT inet_server_port()").fetchone()[0]  # type: ignore[index]
    node = f"node{int(port) - 15431}"  # stack.sh: node1..3 listen on 15432..15434
    name = f"f-{uuid.uuid4()}"
    state = RequestState(database=database)
    reset = request_state.set(state)
    thaw = contextlib.ExitStack()

    def freeze(session: Session) -> None:  # before the package's own after_commit
        thaw.enter_context(frozen_bouncer(node, at_most=FREEZE + 10))

    used: list[Any] = []
    event.listen(
        database.engines.write, "begin", lambda c: used.append(c.connection.driver_connection)
    )
    try:
        with database.write_session() as s:
            # A compiled SELECT (a text() one would count as a possible write).
            assert s.execute(select(func.rwdb_grey_write(name))).scalar_one() == name
            raw = used[0]  # (not s.connection(): that too counts as a possible write)
            event.listen(type(s), "after_commit", freeze, insert=True)
            try:
                started = time.monotonic()
                s.commit()
                took = time.monotonic() - started
            finally:
                event.remove(type(s), "after_commit", freeze)
                thaw.close()
        assert took < WRITE_DEADLINE + 1.0, f"the commit returned after {took:.2f} s"
        assert state.commit_lsn == MAX_LSN  # no replica reports it: the primary serves
        assert raw.closed, "the connection that gave no answer was kept"
        assert _rows(name) == 1
    finally:
        request_state.reset(reset)
        thaw.close()
        database.dispose_sync()


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_a_read_with_a_token_whose_ping_opens_its_transaction_on_a_frozen_path(
    driver: str,
) -> None:
    """A read with a token reads the replica's position in the message that opens its
    transaction (engine.wire.begin_reading_position; on asyncpg through the adapter's
    BEGIN). On a frozen path that message is bounded by the read deadline like any
    ping: the connection is discarded, and the read served by the primary within the
    deadline plus 1 s."""
    node = replica_nodes()[0]
    database = replica_database(node)
    statement = text("SELECT pg_is_in_recovery()")
    try:
        with database.write_session() as w:
            lsn = w.execute(text("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")).scalar_one()
        token = database.token_for(int(lsn))

        async def in_recovery() -> bool:
            if driver == "psycopg":
                with database.read_session(after=token, timeout=DEADLINE) as s:
                    return bool(s.execute(statement).scalar_one())
            async with database.async_read_session(after=token, timeout=DEADLINE) as a:
                return bool((await a.execute(statement)).scalar_one())

        deadline = time.monotonic() + 5
        while not await in_recovery():  # warm, and the replica has the position
            assert time.monotonic() < deadline, "the replica never served the token"
        with frozen_bouncer(node, at_most=FREEZE + 10):
            started = time.monotonic()
            assert not await in_recovery(), "the read was not served by the primary"
            took = time.monotonic() - started
        assert DEADLINE * 0.9 < took < DEADLINE + 1.0, f"the read took {took:.2f} s"
        deadline = time.monotonic() + 5
        while not await in_recovery():  # the path is back
            assert time.monotonic() < deadline, "the replica never served again"
    finally:
        await database.dispose()
        database.dispose_sync()


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_a_read_whose_path_froze_after_its_last_statement_closes_within_the_deadline(
    driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The ROLLBACK that ends a read transaction is watched like its statements: a
    replica path that froze between the last statement and the session's close
    (which FastAPI runs after the response) costs the close the deadline, not the
    freeze, and the close raises nothing (the transaction ended with the discarded
    connection). Before, the close waited for as long as the freeze lasted, holding
    the connection and, on a sync route, a worker thread."""
    node = replica_nodes()[0]
    database = replica_database(node)
    statement = text("SELECT pg_is_in_recovery()")
    caplog.set_level("INFO", logger="fastapi_rwdb")
    try:
        if driver == "psycopg":
            s = database.read_session(timeout=DEADLINE)
            assert s.execute(statement).scalar_one() is True
            with frozen_bouncer(node, at_most=FREEZE + 10):
                started = time.monotonic()
                s.close()
                took = time.monotonic() - started
        else:
            a = database.async_read_session(timeout=DEADLINE)
            assert (await a.execute(statement)).scalar_one() is True
            with frozen_bouncer(node, at_most=FREEZE + 10):
                started = time.monotonic()
                await a.close()
                took = time.monotonic() - started
        assert DEADLINE * 0.9 < took < DEADLINE + 1.0, f"the close took {took:.2f} s"
        assert "connection was lost before it was closed" in caplog.text
        if driver == "psycopg":  # the path is back: the pool serves again
            assert read_session_in_recovery(database)
        else:
            async with database.async_read_session() as a:
                assert (await a.execute(statement)).scalar_one() is True
    finally:
        await database.dispose()
        database.dispose_sync()


def read_session_in_recovery(database: Database) -> bool:
    with database.read_session() as s:
        return bool(s.execute(text("SELECT pg_is_in_recovery()")).scalar_one())


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_a_read_waiting_for_a_replica_to_catch_up_meets_a_frozen_path(
    driver: str,
) -> None:
    """A read with a token whose replica is behind asks the held connection again
    every few milliseconds while it waits (RWDB_PIN_WAIT_MS, here wait=3). Each
    question has the read deadline: when the path freezes during the wait, the read
    goes to the primary within the deadline, not after the freeze (before: the
    question waited for as long as the freeze lasted)."""
    import threading

    node = replica_nodes()[0]
    database = replica_database(node)
    statement = text("SELECT pg_is_in_recovery()")
    with database.write_session() as w:
        lsn = w.execute(text("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")).scalar_one()
    token = database.token_for(int(lsn) + 10**12)  # a position no replica reaches
    frozen, thawed = threading.Event(), threading.Event()

    def freeze_soon() -> None:
        time.sleep(0.3)
        with frozen_bouncer(node, at_most=FREEZE + 10):
            frozen.set()
            thawed.wait(FREEZE)

    try:
        with database.read_session() as s:  # warm: a pooled connection to that node
            assert s.execute(statement).scalar_one() is True
        async with database.async_read_session() as a:
            assert (await a.execute(statement)).scalar_one() is True
        freezer = threading.Thread(target=freeze_soon, daemon=True)
        started = time.monotonic()
        freezer.start()
        if driver == "psycopg":
            with database.read_session(after=token, wait=3.0, timeout=DEADLINE) as s:
                in_recovery = s.execute(statement).scalar_one()
        else:
            async with database.async_read_session(after=token, wait=3.0, timeout=DEADLINE) as a:
                in_recovery = (await a.execute(statement)).scalar_one()
        took = time.monotonic() - started
        assert frozen.is_set(), "the path froze only after the read"
        assert in_recovery is False, "the read was not served by the primary"
        assert took < 3.0 + DEADLINE + 1.0, f"the read took {took:.2f} s"
    finally:
        thawed.set()
        await database.dispose()
        database.dispose_sync()
