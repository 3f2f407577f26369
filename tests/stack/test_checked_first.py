"""A read with a token whose position is checked with its first statement (psycopg
with a quiet pool, and asyncpg: orm.reads, engine.checkout.PositionCheck): one round
trip for the BEGIN, the check and the statement (on asyncpg its describe step).

What must hold: the statement's answer is used only when the replica had the
client's write; a replica short of it costs the read its statement, never its
guarantee: the answer (or the error, for a table the write created and the replica
lacks) is thrown away and the statement routed again, and the routing is counted
once. Replicas are held back with `lag 1s` (each commit applied a second late) from
the first test that asks for it to the end of the module.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session

from fastapi_rwdb import Database, RWDBSettings
from fastapi_rwdb.engine import checkout
from fastapi_rwdb.engine.wire import _BEGUN as BEGUN_INFO
from fastapi_rwdb.observe import listeners
from fastapi_rwdb.routing.lsn import MAX_LSN

from ..helpers import dsn, replicas_lagging, token_after

pytestmark = [pytest.mark.stack, pytest.mark.usefixtures("stack")]

MARK = "/* checked-first */"


@pytest.fixture(scope="module")
def lagging() -> Iterator[None]:
    with replicas_lagging():
        yield


@contextlib.contextmanager
def _marked(replica: Engine, primary: Engine) -> Iterator[list[str]]:
    """Each marked statement as it is sent: on which engine."""
    seen: list[str] = []

    def watcher(side: str) -> Any:
        def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if MARK in statement:
                seen.append(side)

        return before

    hooks = [(replica, watcher("replica")), (primary, watcher("primary"))]
    for engine, hook in hooks:
        event.listen(engine, "before_cursor_execute", hook)
    try:
        yield seen
    finally:
        for engine, hook in hooks:
            event.remove(engine, "before_cursor_execute", hook)


@pytest.fixture
def sent(db: Database) -> Iterator[list[str]]:
    with _marked(db.engines.read, db.primary_read_engine) as seen:
        yield seen


@pytest.fixture
def routes() -> Iterator[list[tuple[str, str]]]:
    counted: list[tuple[str, str]] = []
    remove = listeners.listen(on_route=lambda target, reason, lsn: counted.append((target, reason)))
    try:
        yield counted
    finally:
        remove()


def _read(db: Database, token: str) -> Session:
    """A read session after ``token`` that does not wait for a replica: one short of
    the position sends the read to the primary at once. Its deadline: 4 s."""
    return db.read_session(after=token, wait=0, timeout=4.0)


def _warm(db: Database) -> None:
    """A pooled read connection, so that the next read is not one just opened."""
    with db.read_session() as session:
        session.execute(text("SELECT 1"))


def test_a_caught_up_replica_answers_the_statement_sent_once(
    db: Database, sent: list[str], routes: list[tuple[str, str]]
) -> None:
    """(The one round trip for the BEGIN, the check and the statement:
    tests/stack/test_round_trips.py.)"""
    token = token_after(db, "SELECT 1")  # a position the replicas have in a moment
    _warm(db)
    for _ in range(50):
        sent.clear()
        routes.clear()
        with _read(db, token) as session:
            row = session.execute(
                text(f"SELECT pg_is_in_recovery(), current_setting('statement_timeout') {MARK}")
            ).one()
            if row[0]:
                break
    assert sent == ["replica"]
    assert routes == [("replica", "caught-up")]
    # The deadline's server-side timeout came with the check, for this transaction.
    assert row[1] == "3200ms"


def test_a_transaction_begun_by_session_connection_is_routed_the_careful_way(
    db: Database, sent: list[str]
) -> None:
    """What runs on session.connection() cannot be sent again: after a transaction
    checked with its first statement, one begun that way has its position asked
    first, and goes elsewhere when the answer is short (here every read connection
    reports a position no write has, as a replica far behind would)."""
    token = token_after(db, "SELECT 1")
    _warm(db)

    def behind(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        record.info[checkout._REPORTED] = 0

    with _read(db, token) as session:
        session.execute(text(f"SELECT 1 {MARK}"))  # routed with a check at the statement
        session.commit()
        event.listen(db.engines.read, "checkout", behind)
        try:
            conn = session.connection()  # the next transaction
            in_recovery = conn.exec_driver_sql(f"SELECT pg_is_in_recovery() {MARK}")
            assert in_recovery.scalar_one() is False
        finally:
            event.remove(db.engines.read, "checkout", behind)
    assert sent == ["replica", "primary"]


def test_a_replica_short_of_the_write_never_answers(
    db: Database, lagging: None, sent: list[str], routes: list[tuple[str, str]]
) -> None:
    name = f"checked-{uuid.uuid4().hex[:12]}"
    _warm(db)
    token = token_after(db, f"INSERT INTO rwdb_items (name) VALUES ('{name}')")
    routes.clear()
    with _read(db, token) as session:
        count = session.execute(
            text(f"SELECT count(*), pg_is_in_recovery() FROM rwdb_items WHERE name = :n {MARK}"),
            {"n": name},
        ).one()
    assert tuple(count) == (1, False)  # the write, from the primary
    assert sent == ["replica", "primary"]  # checked with the statement, found short
    assert routes == [("primary", "replica-behind")]  # counted once, where it went


def test_an_error_of_a_replica_short_of_the_write_is_no_answer_either(
    db: Database, lagging: None, sent: list[str]
) -> None:
    """The client's write created a table the replica does not have yet: the
    replica's error is thrown away with its answer."""
    table = f"rwdb_checked_{uuid.uuid4().hex[:8]}"
    _warm(db)
    token = token_after(db, f"CREATE TABLE {table} (id int)", f"INSERT INTO {table} VALUES (7)")
    try:
        with _read(db, token) as session:
            value = session.execute(text(f"SELECT id FROM {table} {MARK}")).scalar_one()
        assert value == 7
        assert sent == ["replica", "primary"]
    finally:
        token_after(db, f"DROP TABLE {table}")


def test_a_connection_known_to_be_behind_is_not_sent_the_statement(
    db: Database, lagging: None, sent: list[str]
) -> None:
    """Found short a moment ago (checkout.BEHIND_FOR): the next read routes the careful
    way at once, no statement thrown away."""
    _warm(db)
    token = token_after(db, "SELECT 1")
    with _read(db, token) as session:
        session.execute(text(f"SELECT 1 {MARK}"))  # finds the replicas behind
    assert sent == ["replica", "primary"]
    sent.clear()
    with _read(db, token) as session:  # a pooled connection found behind just now
        session.execute(text(f"SELECT 2 {MARK}"))
    assert sent == ["primary"]


def test_a_transaction_the_caller_began_is_not_checked_with_its_statement(
    db: Database, lagging: None, sent: list[str]
) -> None:
    """Inside session.begin() the transaction is the caller's: it cannot be rolled
    back to send the statement again, so its position is asked first."""
    _warm(db)
    token = token_after(db, "SELECT 1")
    with _read(db, token) as session, session.begin():
        session.execute(text(f"SELECT 1 {MARK}"))
    assert sent == ["primary"]


# -- psycopg, a busy pool: the check in the BEGIN's message, before the statement -----


@contextlib.contextmanager
def _busy(db: Database) -> Iterator[None]:
    """Another read connection in use meanwhile: the check leaves the pipeline."""
    with db.engines.read.connect() as other:
        other.exec_driver_sql("SELECT 1")
        yield


@pytest.fixture
def careful(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times a read was routed the careful way (its position asked first)."""
    from fastapi_rwdb.orm import reads

    taken: list[int] = []
    original = reads._replica_at

    def counted(*args: Any, **kwargs: Any) -> Any:
        taken.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(reads, "_replica_at", counted)
    return taken


def _busy_read(db: Database, token: str, sql: str, **params: Any) -> Any:
    with _busy(db), _read(db, token) as session:
        return session.execute(text(sql), params).one()


def test_busy_a_caught_up_replica_answers_without_asking_first(
    db: Database, sent: list[str], routes: list[tuple[str, str]], careful: list[int]
) -> None:
    token = token_after(db, "SELECT 1")
    _warm(db)
    for _ in range(50):
        sent.clear()
        routes.clear()
        careful.clear()
        row = _busy_read(
            db, token, f"SELECT pg_is_in_recovery(), current_setting('statement_timeout') {MARK}"
        )
        if row[0]:
            break
        time.sleep(0.1)  # (the replicas may be held back: `lag 1s`)
    assert sent == ["replica"]
    assert routes == [("replica", "caught-up")]
    assert row[1] == "3200ms"  # the deadline's timeout came with the check
    assert careful == []  # checked in the BEGIN's message, not asked the careful way


def test_busy_a_replica_short_of_the_write_is_never_sent_the_statement(
    db: Database,
    lagging: None,
    sent: list[str],
    routes: list[tuple[str, str]],
    careful: list[int],
) -> None:
    name = f"checked-{uuid.uuid4().hex[:12]}"
    _warm(db)
    token = token_after(db, f"INSERT INTO rwdb_items (name) VALUES ('{name}')")
    routes.clear()
    row = _busy_read(
        db,
        token,
        f"SELECT count(*), pg_is_in_recovery() FROM rwdb_items WHERE name = :n {MARK}",
        n=name,
    )
    assert tuple(row) == (1, False)  # the write, from the primary
    assert sent == ["primary"]  # found short before the statement went
    assert routes == [("primary", "replica-behind")]  # counted once, where it went
    assert careful == [1]  # then routed the careful way


# -- asyncpg: the check kept with the BEGIN, failing when the replica is short --------


@pytest.fixture
def async_sent(db: Database) -> Iterator[list[str]]:
    aio = db.async_engines.read.sync_engine, db.async_primary_read_engine.sync_engine
    with _marked(*aio) as seen:
        yield seen


async def _async_warm(db: Database) -> None:
    async with db.async_read_session() as session:
        await session.execute(text("SELECT 1"))


async def test_async_a_caught_up_replica_answers_the_statement_sent_once(
    db: Database, async_sent: list[str], routes: list[tuple[str, str]]
) -> None:
    token = token_after(db, "SELECT 1")
    await _async_warm(db)
    for _ in range(50):
        async_sent.clear()
        routes.clear()
        async with db.async_read_session(after=token, wait=0, timeout=4.0) as session:
            result = await session.execute(
                text(f"SELECT pg_is_in_recovery(), current_setting('statement_timeout') {MARK}")
            )
            row = result.one()
            conn = await session.connection()
            assert conn.sync_connection is not None
            info = conn.sync_connection.connection.info
        if row[0]:
            break
        await asyncio.sleep(0.1)  # (the replicas may be held back: `lag 1s`)
    assert async_sent == ["replica"]
    assert routes == [("replica", "caught-up")]
    assert row[1] == "3200ms"
    # No ping opened that transaction: the check went with the statement.
    assert not info.get(BEGUN_INFO)


async def test_async_a_replica_short_of_the_write_never_answers(
    db: Database, lagging: None, async_sent: list[str], routes: list[tuple[str, str]]
) -> None:
    name = f"checked-{uuid.uuid4().hex[:12]}"
    await _async_warm(db)
    token = token_after(db, f"INSERT INTO rwdb_items (name) VALUES ('{name}')")
    routes.clear()
    async with db.async_read_session(after=token, wait=0, timeout=4.0) as session:
        result = await session.execute(
            text(f"SELECT count(*), pg_is_in_recovery() FROM rwdb_items WHERE name = :n {MARK}"),
            {"n": name},
        )
        count = result.one()
    assert tuple(count) == (1, False)  # the write, from the primary
    assert async_sent == ["replica", "primary"]  # checked with the statement, found short
    assert routes == [("primary", "replica-behind")]  # counted once, where it went


async def test_async_a_table_the_replica_lacks_yet_is_no_error(
    db: Database, lagging: None, async_sent: list[str]
) -> None:
    """The check fails before the statement is run: the replica never reports the
    table it does not have yet."""
    table = f"rwdb_checked_{uuid.uuid4().hex[:8]}"
    await _async_warm(db)
    token = token_after(db, f"CREATE TABLE {table} (id int)", f"INSERT INTO {table} VALUES (7)")
    try:
        async with db.async_read_session(after=token, wait=0, timeout=4.0) as session:
            value = (await session.execute(text(f"SELECT id FROM {table} {MARK}"))).scalar_one()
        assert value == 7
        assert async_sent == ["replica", "primary"]
    finally:
        token_after(db, f"DROP TABLE {table}")


async def test_async_a_connection_known_to_be_behind_is_not_sent_the_statement(
    db: Database, lagging: None, async_sent: list[str]
) -> None:
    """The failed check said how far the replica was: remembered, as a ping's answer."""
    await _async_warm(db)
    token = token_after(db, "SELECT 1")
    async with db.async_read_session(after=token, wait=0, timeout=4.0) as session:
        await session.execute(text(f"SELECT 1 {MARK}"))
    assert async_sent == ["replica", "primary"]
    async_sent.clear()
    async with db.async_read_session(after=token, wait=0, timeout=4.0) as session:
        await session.execute(text(f"SELECT 2 {MARK}"))
    assert async_sent == ["primary"]


async def test_async_a_check_that_never_went_does_not_reach_the_next_transaction(
    db: Database,
) -> None:
    """A first statement that fails before reaching the driver (a missing parameter)
    leaves its check unsent: the connection goes back to the pool without it, and the
    next read on it (no token) runs as any other, not failing a check it never asked
    for (the position here is more than any server has)."""
    await _async_warm(db)
    token = db.token_for(MAX_LSN - 1)
    async with db.async_read_session(after=token, wait=0, timeout=4.0) as session:
        with pytest.raises(StatementError):
            await session.execute(text(f"SELECT :missing {MARK}"))
    for _ in range(3):  # (the pool's one idle connection, whichever it is)
        # No deadline: nothing of its own would ride with its BEGIN (and hide a leftover).
        async with db.async_read_session(timeout=0) as session:
            assert (await session.execute(text("SELECT 1"))).scalar_one() == 1


def _node_port(port_variable: str) -> int:
    """The PostgreSQL port of the node behind a port of HAProxy's."""
    with psycopg.connect(dsn(port_variable), prepare_threshold=None) as conn:
        row = conn.execute("SELECT inet_server_port()").fetchone()
    assert row is not None and row[0] is not None
    return int(row[0])


async def test_async_with_the_statement_cache_on_a_token_read_is_asked_first(
    lagging: None,
) -> None:
    """A cached statement would pass by the kept BEGIN and its check: with asyncpg's
    statement cache on (RWDB_PREPARED_STATEMENTS, on the nodes directly: named
    statements need a server connection of their own), the position is asked first,
    and the replica, a second behind, is not read (a check skipped would count 0)."""
    settings = RWDBSettings()
    write = settings.url("write", "psycopg").set(port=_node_port("POSTGRES_PORT"))
    read = settings.url("read", "psycopg").set(port=_node_port("POSTGRES_READ_PORT"))
    node = Database(
        RWDBSettings(
            write_url=write.render_as_string(False),
            read_url=read.render_as_string(False),
            prepared_statements=True,
        )
    )
    count = text("SELECT count(*), pg_is_in_recovery() FROM rwdb_items WHERE name = :n")
    try:
        # The statement prepared and cached on the replica's pooled connection, by a
        # read that needs no position: SQLAlchemy's adapter then runs it without asyncpg's
        # describe step, where a kept BEGIN would go.
        async with node.async_read_session() as session:
            assert tuple((await session.execute(count, {"n": "-"})).one()) == (0, True)
        for _ in range(2):  # the second: the engine no longer tries the check first
            name = f"checked-cache-{uuid.uuid4().hex[:12]}"
            token = token_after(node, f"INSERT INTO rwdb_items (name) VALUES ('{name}')")
            async with node.async_read_session(after=token, wait=0, timeout=4.0) as session:
                result = await session.execute(count, {"n": name})
                assert tuple(result.one()) == (1, False)
            await asyncio.sleep(checkout.BEHIND_FOR)  # not known to be behind: asked
    finally:
        await node.dispose()
        node.dispose_sync()
