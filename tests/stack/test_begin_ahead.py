"""The kept BEGIN of engine/asyncpg_connection.py, against PgBouncer in transaction
mode: a read's ``BEGIN`` and ``SET LOCAL`` written just before the first statement's
describe step, in no round trip of their own.

The contract test of the trick: asyncpg's describe step must pass over the answers
to those messages, the statement must run inside the transaction they opened and
under its ``SET LOCAL``, an error must be the statement's, and a transaction that
never sent a statement must send nothing to end. Should an asyncpg release change
any of it, the probe says no and the package sends the BEGIN as before.
"""

import os
from collections.abc import AsyncIterator

import asyncpg  # type: ignore[import-untyped]
import pytest

from fastapi_rwdb.engine import asyncpg_connection

from ..helpers import NODE_PORTS, TEST_DB, replica_nodes
from .test_asyncpg_commit import connect

pytestmark = pytest.mark.stack

TIMEOUT = "SET LOCAL statement_timeout = 900"


@pytest.fixture
async def raw(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[asyncpg.Connection]:
    monkeypatch.setattr(asyncpg_connection, "_begin_ahead", True)
    conn = await connect()
    try:
        yield conn
    finally:
        await conn.close()


async def keep_begin(conn: asyncpg.Connection) -> None:
    conn.rwdb_pending = TIMEOUT
    assert await conn.execute("BEGIN READ ONLY;") == "BEGIN"
    assert conn.rwdb_ahead is not None and not conn.is_in_transaction()  # nothing sent


async def test_the_probe_finds_that_a_begin_can_wait_for_the_first_statement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(asyncpg_connection, "_commit_with_copy", None)
    monkeypatch.setattr(asyncpg_connection, "_begin_ahead", None)
    conn = await connect()
    try:
        await asyncpg_connection.probe(conn)
        assert asyncpg_connection._begin_ahead is True
        assert not conn.is_in_transaction()  # the probe leaves it as it found it
    finally:
        await conn.close()


async def test_the_first_statement_runs_in_the_kept_transaction_under_its_set_local(
    raw: asyncpg.Connection,
) -> None:
    await keep_begin(raw)
    started = await raw.fetchval("SELECT transaction_timestamp()")
    assert raw.is_in_transaction()
    assert await raw.fetchval("SELECT current_setting('statement_timeout')") == "900ms"
    assert await raw.fetchval("SELECT transaction_timestamp()") == started  # one transaction
    with pytest.raises(asyncpg.exceptions.ReadOnlySQLTransactionError):
        await raw.execute("CREATE TEMP TABLE begin_ahead (id int)")  # READ ONLY came too
    await raw.execute("ROLLBACK;")
    assert await raw.fetchval("SELECT current_setting('statement_timeout')") == "0"


@pytest.mark.parametrize("end", ["ROLLBACK;", "COMMIT;"])
async def test_ending_a_kept_transaction_that_ran_nothing_sends_nothing(
    raw: asyncpg.Connection, end: str
) -> None:
    await keep_begin(raw)
    transport, written = raw._transport, []
    send = transport.write
    transport.write = lambda data: (written.append(data), send(data))  # what goes out
    try:
        assert await raw.execute(end) == end.rstrip(";")
    finally:
        transport.write = send
    assert written == [] and raw.rwdb_ahead is None
    assert await raw.fetchval("SELECT current_setting('statement_timeout')") == "0"
    assert not raw.is_in_transaction()  # the next statement ran in no transaction


async def test_a_simple_query_and_a_copy_carry_the_kept_begin(raw: asyncpg.Connection) -> None:
    await keep_begin(raw)
    assert await raw.execute("SELECT 1") == "SELECT 1"
    assert raw.is_in_transaction()
    assert await raw.fetchval("SELECT current_setting('statement_timeout')") == "900ms"
    await raw.execute("ROLLBACK;")
    await keep_begin(raw)
    line = await asyncpg_connection._copy_out(
        raw, "COPY (SELECT current_setting('statement_timeout')) TO STDOUT", None
    )
    assert line == "900ms" and raw.is_in_transaction()
    await raw.execute("ROLLBACK;")


async def test_a_first_statement_that_fails_raises_its_own_error(raw: asyncpg.Connection) -> None:
    await keep_begin(raw)
    with pytest.raises(asyncpg.exceptions.UndefinedTableError):
        await raw.fetch("SELECT * FROM begin_ahead_no_such_table WHERE $1::int > 0", 1)
    assert raw.is_in_transaction()  # the kept BEGIN ran: the transaction is failed
    await raw.execute("ROLLBACK;")
    assert await raw.fetchval("SELECT 41 + $1::int", 1) == 42  # and the connection serves


async def test_with_a_statement_cache_the_begin_is_sent_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cached statement would be run without passing the choke point: with asyncpg's
    statement cache on (RWDB_PREPARED_STATEMENTS), each BEGIN goes as before. On a
    replica's own PostgreSQL: named statements need a server connection of their own,
    which PgBouncer's transaction mode does not give."""
    monkeypatch.setattr(asyncpg_connection, "_begin_ahead", True)
    e = os.environ
    conn = await asyncpg.connect(
        host=e["POSTGRES_SERVER"],
        port=NODE_PORTS[replica_nodes()[0]],
        user=e["POSTGRES_USER"],
        password=e["POSTGRES_PASSWORD"],
        database=TEST_DB,
        connection_class=asyncpg_connection.PackageConnection,
    )
    try:
        conn.rwdb_pending = TIMEOUT
        await conn.execute("BEGIN READ ONLY;")  # (answered by its last command, the SET)
        assert conn.rwdb_ahead is None and conn.is_in_transaction()
        assert await conn.fetchval("SELECT current_setting('statement_timeout')") == "900ms"
        await conn.execute("ROLLBACK;")
    finally:
        await conn.close()
