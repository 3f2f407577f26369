"""The asyncpg COMMIT that reads the WAL position in its own message
(engine/asyncpg_connection.py), against the stack's write port: PgBouncer in
transaction mode, then the primary.

The contract test of the module's trick: a ``COPY`` after the ``COMMIT`` in one
simple-query message, read through asyncpg's private ``_copy_out``. If an asyncpg
release stops discarding the COMMIT's completion message before the COPY's, the
probe must say so (and the package fall back to a round trip of its own), never
report a COMMIT that went through as failed.
"""

import os
import uuid

import asyncpg  # type: ignore[import-untyped]
import pytest

from fastapi_rwdb.engine import asyncpg_connection
from fastapi_rwdb.engine.asyncpg_connection import PackageConnection, arm, committed_at
from fastapi_rwdb.routing.lsn import parse_lsn

from ..helpers import TEST_DB

pytestmark = pytest.mark.stack

TABLE = "rwdb_asyncpg_commit"


async def connect(connection_class: type = PackageConnection) -> asyncpg.Connection:
    e = os.environ
    return await asyncpg.connect(
        host=e["POSTGRES_SERVER"],
        port=int(e["POSTGRES_PORT"]),
        user=e["POSTGRES_USER"],
        password=e["POSTGRES_PASSWORD"],
        database=TEST_DB,
        statement_cache_size=0,  # PgBouncer, transaction mode
        connection_class=connection_class,
    )


async def test_a_commit_reads_the_position_after_it_in_the_same_message() -> None:
    conn = await connect()
    assert type(conn) is PackageConnection
    try:
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (name text UNIQUE DEFERRABLE INITIALLY DEFERRED)"
        )
        await asyncpg_connection.probe(conn)
        assert asyncpg_connection._commit_with_copy is True

        before = parse_lsn(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))
        name = str(uuid.uuid4())
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {TABLE} VALUES ($1)", name)
            assert arm(conn)
        sent, position = committed_at(conn)
        after = parse_lsn(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))
        assert sent and position is not None
        lsn = parse_lsn(position)
        assert lsn is not None and before is not None and after is not None
        assert before < lsn <= after  # after the commit record, not past what followed
        assert await conn.fetchval(f"SELECT count(*) FROM {TABLE} WHERE name = $1", name) == 1
        assert not conn.is_in_transaction()

        # A COMMIT that fails (a deferred unique check) fails as a plain one does: the
        # COPY after it never runs, nothing was written, the connection goes on.
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {TABLE} VALUES ($1), ($1)", "twice-" + name)
                assert arm(conn)
        assert committed_at(conn) == (True, None)
        assert (
            await conn.fetchval(f"SELECT count(*) FROM {TABLE} WHERE name = $1", "twice-" + name)
            == 0
        )
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        await conn.close()


async def test_a_plain_connection_is_never_armed() -> None:
    conn = await connect(asyncpg.Connection)
    try:
        assert not arm(conn)  # a connection class of the application's own
    finally:
        await conn.close()


async def test_a_copy_read_with_the_reading_never_paused_gets_every_chunk() -> None:
    # The package's COPYs run with the transport's pause and resume made no-ops
    # (engine/asyncpg_connection.py). A COPY of a few megabytes arrives in many reads,
    # asyncpg handing each batch to the sink before the next: none may be lost or
    # arrive with nobody waiting, and the transport reads again afterwards.
    conn = await connect()
    try:
        rows = 3000
        sql = f"COPY (SELECT i, repeat('x', 1000) FROM generate_series(1, {rows}) i) TO STDOUT"
        sink = asyncpg_connection._Lines()
        with asyncpg_connection._reading_unpaused(conn._transport):
            status = await conn._protocol.copy_out(sql, sink, None)
        assert status == f"COPY {rows}"
        assert len(sink.chunks) > 1  # arrived in several batches
        lines = b"".join(sink.chunks).decode().splitlines()
        assert [line.split("\t")[0] for line in lines] == [str(i) for i in range(1, rows + 1)]
        assert "pause_reading" not in vars(conn._transport)
        assert conn._transport.is_reading()
        ok = await asyncpg_connection._copy_out(conn, "COPY (SELECT 'ok') TO STDOUT", None)
        assert ok == "ok"
        assert conn._transport.is_reading()
        assert await conn.fetchval("SELECT 2") == 2
    finally:
        await conn.close()
