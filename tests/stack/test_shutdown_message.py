"""A server's goodbye read before its socket closes (asyncpg).

A PostgreSQL that shuts down (``patronictl``/``pg_ctl stop``, a restart) sends each
of its sessions ``FATAL 57P01 terminating connection due to administrator command``
and then closes the socket. asyncpg reads that message even when it asked nothing,
and from then until it has read the socket's end, a statement sent on the
connection fails with asyncpg's ``InternalClientError`` ("cannot switch to state
11; another operation (2) is in progress") instead of "connection is closed". The
reliability suite met it once ("both replicas stopped", asyncpg 0.31.0): three 503s
"the database connection was lost" on one route.

Which statement meets it cannot be scheduled on a real wire (the two arrive
microseconds apart), so these tests hand the driver's protocol those very bytes at
the moment in question, on a connection whose server is alive. What must hold is
what holds for any lost connection: a transaction's first statement is answered
(run again on a new replica connection, whose position is checked again against a
token); a later statement runs on the primary
when all its transaction ran before were SELECTs the session compiled (nothing set
up there to lose), and is otherwise an outage (a 503 with ``Retry-After``: moving
it could drop what the transaction set up, a ``SET LOCAL`` in a text statement);
either way the connection is discarded, never handed out again, and the next read
is served.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import DBAPIError

from fastapi_rwdb import Database
from fastapi_rwdb.web.unavailable import unavailable_reason

from ..helpers import replicas_lagging, token_after

pytestmark = [pytest.mark.stack, pytest.mark.usefixtures("stack")]

MARK = "/* goodbye */"
TOKEN_OR_NOT = pytest.mark.parametrize("with_token", [False, True], ids=["plain", "token"])


def goodbye() -> bytes:
    """The ErrorResponse a backend sends its session as the server shuts down."""
    fields = b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0"
    return b"E" + struct.pack("!i", len(fields) + 4) + fields


@pytest.fixture
def told(db: Database) -> Iterator[list[Any]]:
    """Before the first statement marked ``MARK`` on the async read engine, its
    connection reads the goodbye (once: not the statement's retry); yields the
    asyncpg connection it was given to."""
    given: list[Any] = []
    engine = db.async_engines.read.sync_engine

    def deliver(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if MARK in statement and not given:
            raw = conn.connection.driver_connection
            raw._protocol.data_received(goodbye())  # what the server's socket would carry
            given.append(raw)

    event.listen(engine, "before_cursor_execute", deliver)
    try:
        yield given
    finally:
        event.remove(engine, "before_cursor_execute", deliver)


def _after(db: Database) -> str:
    """A token for a write the replicas may not have yet."""
    return token_after(db, f"INSERT INTO rwdb_items (name) VALUES ('goodbye-{uuid.uuid4()}')")


async def _served(db: Database) -> bool:
    async with db.async_read_session() as session:
        return bool((await session.execute(text("SELECT true"))).scalar_one())


@pytest.fixture
def lagging() -> Iterator[None]:
    with replicas_lagging():
        yield


async def test_a_goodbye_before_the_first_statement_is_answered_elsewhere(
    db: Database, told: list[Any]
) -> None:
    async with db.async_read_session() as session:
        await session.execute(text("SELECT 1"))  # a pooled connection, not one just opened
    async with db.async_read_session() as session:
        served_by = await session.execute(text(f"SELECT pg_is_in_recovery() {MARK}"))
        in_recovery = served_by.scalar_one()
    assert len(told) == 1 and told[0].is_closed(), "the connection that read it was kept"
    assert in_recovery is True  # a new connection of the read port
    assert await _served(db)


async def test_a_goodbye_before_a_first_statement_with_a_token_keeps_its_guarantee(
    db: Database, told: list[Any], lagging: None
) -> None:
    """The statement runs again on a new connection, and its position is checked again
    there: the replicas, a second behind, do not have the client's write, so the
    primary answers (a retry that skipped the check would count 0 on a replica)."""
    async with db.async_read_session() as session:
        await session.execute(text("SELECT 1"))
    name = f"goodbye-{uuid.uuid4()}"
    after = token_after(db, f"INSERT INTO rwdb_items (name) VALUES ('{name}')")
    async with db.async_read_session(after=after, wait=0) as session:
        served_by = await session.execute(
            text(
                "SELECT pg_is_in_recovery(), (SELECT count(*) FROM rwdb_items WHERE name = :n)"
                f" {MARK}"
            ),
            {"n": name},
        )
        in_recovery, count = served_by.one()
    assert len(told) == 1 and told[0].is_closed(), "the connection that read it was kept"
    assert (in_recovery, count) == (False, 1)
    assert await _served(db)


@TOKEN_OR_NOT
async def test_a_goodbye_before_a_later_statement_is_an_outage_and_poisons_nothing(
    db: Database, told: list[Any], with_token: bool
) -> None:
    after = _after(db) if with_token else None
    with pytest.raises(DBAPIError) as info:
        async with db.async_read_session(after=after) as session:
            assert (await session.execute(text("SELECT pg_is_in_recovery()"))).scalar_one()
            await session.execute(text(f"SELECT 2 {MARK}"))
    reason = unavailable_reason(info.value)
    assert reason == "the database connection was lost (failover or restart)"
    assert len(told) == 1 and told[0].is_closed(), "the connection that read it was kept"
    for _ in range(db.settings.pool_limits("read")[0] + 1):  # each pooled one: not it
        assert await _served(db)


@TOKEN_OR_NOT
async def test_a_goodbye_before_a_later_statement_after_compiled_selects_moves_it(
    db: Database, told: list[Any], with_token: bool
) -> None:
    """Only compiled SELECTs before it: the later statement is answered by the primary,
    in a new transaction (READ COMMITTED: a newer snapshot, as the replica's next
    would have been)."""
    after = _after(db) if with_token else None
    async with db.async_read_session(after=after) as session:
        assert (await session.execute(select(func.pg_is_in_recovery()))).scalar_one()
        served_by = await session.execute(text(f"SELECT pg_is_in_recovery() {MARK}"))
        assert served_by.scalar_one() is False, "the later statement stayed on a replica"
        # The session stays on the primary: never older data after newer.
        assert (await session.execute(select(func.pg_is_in_recovery()))).scalar_one() is False
    assert len(told) == 1 and told[0].is_closed(), "the connection that read it was kept"
    for _ in range(db.settings.pool_limits("read")[0] + 1):
        assert await _served(db)


async def test_a_goodbye_after_more_selects_than_remembered_is_an_outage(
    db: Database, told: list[Any]
) -> None:
    """A transaction's statements are kept for that judgement up to a bound (memory
    stays flat in a long transaction): past it, a later statement stays an outage."""
    from fastapi_rwdb.orm.replay import _REMEMBERED

    with pytest.raises(DBAPIError) as info:
        async with db.async_read_session() as session:
            for _ in range(_REMEMBERED + 1):
                assert (await session.execute(select(func.pg_is_in_recovery()))).scalar_one()
            await session.execute(text(f"SELECT 2 {MARK}"))
    reason = unavailable_reason(info.value)
    assert reason == "the database connection was lost (failover or restart)"
    assert len(told) == 1 and told[0].is_closed()
