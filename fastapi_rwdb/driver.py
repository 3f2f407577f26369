"""Queries sent on the driver's own connection (psycopg or asyncpg), below SQLAlchemy.

Each saves round trips that SQLAlchemy's way would cost behind PgBouncer: no
BEGIN/ROLLBACK around a ping or a position read, no describe step on asyncpg.
The pool's hooks (:mod:`fastapi_rwdb.hooks`), the read sessions and the write
tracking all ask the server through these.
"""

from __future__ import annotations

import select
from typing import Any

import psycopg

from .internals import await_
from .lsn import parse_lsn

#: How far the server behind a connection is: the replay position on a replica,
#: the current position on a primary (whose data is all there is). As text: see lsn.py.
POSITION_SQL = (
    "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
    " ELSE pg_current_wal_lsn() END)::text"
)


def ping_query(dbapi_connection: Any, position: bool, timeout: float) -> int | None:
    """The checkout ping's one round trip: the server's position when ``position``
    (see :data:`fastapi_rwdb.channel.want_position`), else a no-op."""
    # psycopg's connection is the DBAPI connection; asyncpg's sits under SQLAlchemy's adapter.
    raw = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if position:
        return parse_lsn(fetch_outside_transaction(raw, POSITION_SQL, timeout))
    if isinstance(raw, psycopg.Connection):
        # An empty query, as SQLAlchemy's own ping: the server has nothing to parse.
        _execute_autocommit(raw, ";")
    else:  # asyncpg (which cannot take an empty query): the simple protocol, one round trip
        await_(raw.execute("SELECT 1", timeout=timeout))
    return None


def looks_alive(dbapi_connection: Any) -> bool:
    """Whether an idle connection shows no sign of having been closed, asked of the
    local socket: no round trip.

    An idle connection's socket has nothing to read. If it has (the server or a
    proxy closed it, or sent a notice), the caller pings to find out. asyncpg's
    event loop has already read any such thing and marked the connection closed.
    """
    raw = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if isinstance(raw, psycopg.Connection):
        if raw.closed or raw.broken:
            return False
        try:
            poller = select.poll()
            poller.register(raw.fileno(), select.POLLIN)
            return not poller.poll(0)
        except (OSError, ValueError, psycopg.Error):
            return False
    is_closed = getattr(raw, "is_closed", None)
    return not (is_closed is None or is_closed())


def fetch_outside_transaction(raw: Any, sql: str, timeout: float | None = None) -> str | None:
    """The first column of ``sql``'s first row, as text, run on a driver connection
    (psycopg or asyncpg) outside any transaction: one statement, one round trip,
    no BEGIN and no ROLLBACK around it. ``sql`` must return one text column."""
    if isinstance(raw, psycopg.Connection):
        row = _execute_autocommit(raw, sql).fetchone()
        return None if row is None else row[0]
    return _fetch_by_copy(raw, sql, timeout)


def _execute_autocommit(raw: psycopg.Connection[Any], sql: str) -> psycopg.Cursor[Any]:
    """``sql`` on psycopg outside any transaction (no BEGIN first); the cursor holds
    the results, so they can be fetched after autocommit is restored."""
    was = raw.autocommit
    raw.autocommit = True
    try:
        return raw.execute(sql)
    finally:
        raw.autocommit = was


def _fetch_by_copy(raw: Any, sql: str, timeout: float | None) -> str | None:
    """:func:`fetch_outside_transaction` on asyncpg.

    asyncpg's ``fetchval`` costs two round trips (it describes the statement
    first); a ``COPY (...) TO STDOUT`` of the same query goes in the simple
    protocol and returns its row, as text, in one.
    """
    chunks: list[bytes] = []

    async def collect(data: bytes) -> None:
        chunks.append(bytes(data))

    await_(raw.copy_from_query(sql, output=collect, timeout=timeout))
    line = b"".join(chunks).split(b"\n", 1)[0].decode()
    return None if line in ("", "\\N") else line
