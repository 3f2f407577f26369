"""Reads with a token and the checkout ping. The ping reads the replica's
position and opens the session's transaction in the same message
(engine.wire.begin_reading_position; on asyncpg through SQLAlchemy's adapter); a
connection found behind a moment ago is not pinged again (engine.checkout).

What must still hold: the ``BEGIN`` is the one psycopg would send, a read sees
its client's write, a new isolation level for the session still works (the
unused transaction is ended first), and a position asked again while waiting is
asked in that transaction, which stays the session's.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from fastapi_rwdb import Database, RWDBSettings
from fastapi_rwdb.engine import checkout
from fastapi_rwdb.engine.checkout import BEHIND_FOR, connect_at_position
from fastapi_rwdb.engine.wire import _BEGUN as BEGUN_INFO
from fastapi_rwdb.engine.wire import _SNAPSHOT_AT_FIRST, _begin_command
from fastapi_rwdb.routing.lsn import MAX_LSN

from ..helpers import dsn, token_after

pytestmark = [pytest.mark.stack, pytest.mark.usefixtures("stack")]


def _write(db: Database) -> tuple[str, str]:
    """A row written on the primary, and a token for the position after it."""
    name = f"begin-ping-{uuid.uuid4().hex[:12]}"
    return name, token_after(db, f"INSERT INTO rwdb_items (name) VALUES ('{name}')")


def _warm(db: Database, token: str) -> None:
    """Open the read connection: a connection opened just now is not pinged."""
    with db.read_session(after=token) as session:
        session.execute(text("SELECT 1"))


def _count(session: object, name: str) -> int:
    return int(
        session.execute(  # type: ignore[attr-defined]
            text("SELECT count(*) FROM rwdb_items WHERE name = :n"), {"n": name}
        ).scalar_one()
    )


@pytest.mark.parametrize(
    ("isolation", "read_only", "deferrable"),
    [
        (None, None, None),
        (None, True, None),
        (psycopg.IsolationLevel.READ_COMMITTED, True, None),
        (psycopg.IsolationLevel.REPEATABLE_READ, False, True),
        (psycopg.IsolationLevel.SERIALIZABLE, None, False),
    ],
)
def test_the_begin_is_the_one_psycopg_sends(
    isolation: psycopg.IsolationLevel | None, read_only: bool | None, deferrable: bool | None
) -> None:
    """Contract with the installed psycopg: its own (private) BEGIN builder agrees."""
    with psycopg.connect(dsn(), prepare_threshold=None) as raw:
        raw.isolation_level = isolation
        raw.read_only = read_only
        raw.deferrable = deferrable
        assert _begin_command(raw) == raw._get_tx_start_command()


def test_a_read_with_a_token_runs_in_the_transaction_the_ping_opened(db: Database) -> None:
    name, token = _write(db)
    _warm(db, token)
    with db.read_session(after=token) as session:
        conn = session.connection()
        assert conn.connection.info.get(BEGUN_INFO) is True
        assert _count(session, name) == 1
        row = session.execute(
            text(
                "SELECT current_setting('transaction_read_only'),"
                " current_setting('transaction_isolation')"
            )
        ).one()
        assert tuple(row) == ("on", "read committed")


def test_a_session_may_still_choose_its_isolation_level(db: Database) -> None:
    """psycopg refuses a new isolation level inside a transaction: the ping's unused
    one is rolled back first."""
    name, token = _write(db)
    _warm(db, token)
    with db.read_session(after=token) as session:
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        level = session.execute(text("SELECT current_setting('transaction_isolation')"))
        assert level.scalar_one() == "repeatable read"
        assert _count(session, name) == 1


def test_a_server_default_other_than_read_committed_is_respected(db: Database) -> None:
    """Under REPEATABLE READ the snapshot is the first statement's: the ping must not
    be it. On a node directly (PgBouncer refuses the ``options`` startup parameter)."""
    name, _ = _write(db)
    settings = RWDBSettings()
    url = settings.url("read", "psycopg").set(
        port=_replica_node_port(),
        query={"options": "-c default_transaction_isolation=repeatable\\ read"},
    )
    node = Database(
        RWDBSettings(
            write_url=settings.url("write", "psycopg").render_as_string(False),
            read_url=url.render_as_string(False),
        )
    )
    try:
        _, token = _write(node)
        for attempt in range(2):  # a new connection is not pinged: the second is
            with node.read_session(after=token) as session:
                level = session.execute(text("SELECT current_setting('transaction_isolation')"))
                assert level.scalar_one() == "repeatable read"
                assert _count(session, name) == 1
                if attempt:
                    info = session.connection().connection.info
                    assert info.get(_SNAPSHOT_AT_FIRST) is True
    finally:
        node.dispose_sync()


def _replica_node_port() -> int:
    """The PostgreSQL port of a node that is a replica now."""
    with psycopg.connect(dsn("POSTGRES_READ_PORT"), prepare_threshold=None) as conn:
        port = conn.execute("SELECT inet_server_port()").fetchone()
    assert port is not None and port[0] is not None
    return int(port[0])


def test_a_connection_found_behind_is_passed_over_without_a_ping(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that tries replica connections does not ping one whose server was short
    of the needed position a moment ago (a paused replica's, say): it is passed over
    on the position remembered from the last ping, for a short while."""
    pings: list[bool] = []
    real = checkout.ping_query

    def counting(dbapi_connection: object, position: bool, timeout: float) -> int | None:
        pings.append(position)
        return real(dbapi_connection, position, timeout)

    monkeypatch.setattr(checkout, "ping_query", counting)
    engine = db.engines.read
    with engine.connect() as conn:  # open it: a new connection is not pinged
        conn.exec_driver_sql("SELECT 1")

    def check(needed: int | None) -> tuple[int | None, bool]:
        conn, position, remembered = connect_at_position(engine, needed=needed)
        conn.close()
        return position, remembered

    position, remembered = check(MAX_LSN)  # more than any server has
    assert (len(pings), remembered) == (1, False) and position is not None
    assert check(MAX_LSN) == (position, True)  # passed over: no round trip
    assert len(pings) == 1
    assert check(position)[1] is False  # the server has that much: pinged
    assert len(pings) == 2
    time.sleep(BEHIND_FOR + 0.05)  # a lagging replica catches up: ask again
    assert check(MAX_LSN)[1] is False
    assert len(pings) == 3


# -- asyncpg: the adapter's BEGIN carries the position query (engine.asyncpg_connection)


async def _async_warm(db: Database, token: str) -> None:
    async with db.async_read_session(after=token) as session:
        await session.execute(text("SELECT 1"))


async def test_an_async_read_with_a_token_runs_in_the_transaction_the_ping_opened(
    db: Database,
) -> None:
    name, token = _write(db)
    await _async_warm(db, token)
    async with db.async_read_session(after=token, timeout=4.0) as session:
        conn = await session.connection()
        assert conn.sync_connection is not None
        assert conn.sync_connection.connection.info.get(BEGUN_INFO) is True
        count = await session.execute(
            text("SELECT count(*) FROM rwdb_items WHERE name = :n"), {"n": name}
        )
        assert count.scalar_one() == 1
        row = (
            await session.execute(
                text(
                    "SELECT current_setting('transaction_read_only'),"
                    " current_setting('transaction_isolation'),"
                    " current_setting('statement_timeout'), pg_is_in_recovery()"
                )
            )
        ).one()
        # READ ONLY as every read, and the deadline's SET LOCAL went in the same BEGIN.
        assert tuple(row) == ("on", "read committed", "3200ms", True)
    # The next transaction of that connection carries nothing left over.
    async with db.async_read_session() as session:
        timeout = await session.execute(text("SELECT current_setting('statement_timeout')"))
        assert timeout.scalar_one() != "3200ms"


async def test_an_async_session_may_still_choose_its_isolation_level(db: Database) -> None:
    name, token = _write(db)
    await _async_warm(db, token)
    async with db.async_read_session(after=token) as session:
        await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        level = await session.execute(text("SELECT current_setting('transaction_isolation')"))
        assert level.scalar_one() == "repeatable read"
        count = await session.execute(
            text("SELECT count(*) FROM rwdb_items WHERE name = :n"), {"n": name}
        )
        assert count.scalar_one() == 1


async def test_an_async_server_default_other_than_read_committed_is_respected() -> None:
    """asyncpg's twin of the psycopg test above: on a node directly, the server's
    default isolation given as a startup setting."""
    settings = RWDBSettings()
    url = settings.url("read", "psycopg").set(port=_replica_node_port())
    node = Database(
        RWDBSettings(
            write_url=settings.url("write", "psycopg").render_as_string(False),
            read_url=url.render_as_string(False),
        )
    )

    dialect = node.async_engines.read.sync_engine.dialect
    connect = dialect.connect

    def repeatable_read(*cargs: Any, **cparams: Any) -> Any:  # what the connect hook calls
        cparams["server_settings"] = {"default_transaction_isolation": "repeatable read"}
        return connect(*cargs, **cparams)

    dialect.connect = repeatable_read  # type: ignore[method-assign]

    try:
        name, token = _write(node)
        for attempt in range(2):  # a new connection is not pinged: the second is
            async with node.async_read_session(after=token) as session:
                level = await session.execute(
                    text("SELECT current_setting('transaction_isolation')")
                )
                assert level.scalar_one() == "repeatable read"
                count = await session.execute(
                    text("SELECT count(*) FROM rwdb_items WHERE name = :n"), {"n": name}
                )
                assert count.scalar_one() == 1
                if attempt:
                    conn = await session.connection()
                    info = conn.sync_connection.connection.info  # type: ignore[union-attr]
                    assert info.get(_SNAPSHOT_AT_FIRST) is True
                    assert not info.get(BEGUN_INFO)
    finally:
        await node.dispose()
        node.dispose_sync()
