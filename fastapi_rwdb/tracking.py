"""Which commits wrote, and the primary's WAL position right after them.

A commit earns the client a token only if its transaction changed data. ORM
flushes and Core DML mark the connection as they run, at no cost; a textual
statement could be anything, so it marks the connection "maybe" and the
question goes to PostgreSQL before COMMIT (``pg_current_xact_id_if_assigned()``
is NULL for a transaction that wrote nothing). The LSN is read *after* COMMIT:
a position read before it is behind the commit record, and a replica could
reach it without showing the row.

On psycopg, a transaction that may have written commits with one message that
asks the question, commits and reads the LSN: no round trip more than a plain
COMMIT. asyncpg describes every statement before running it and cannot send
several in one go with results, so there the LSN is read after the COMMIT,
on the same connection (two round trips more).

Outside a request (no request state) nothing is tracked and nothing is paid.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, event
from sqlalchemy.orm import Session

from .context import request_state
from .engines import fetch_outside_transaction

logger = logging.getLogger("fastapi_rwdb")

_WROTE = "rwdb_wrote"  # Connection.info: True, or "maybe" after textual SQL
_CONNECTIONS = "rwdb_write_connections"  # Session.info: connections of this transaction
_COMMIT_WROTE = "rwdb_commit_wrote"
_COMMITTED_LSN = "rwdb_committed_lsn"

XACT_SQL = "SELECT pg_current_xact_id_if_assigned() IS NOT NULL"
CURRENT_LSN_SQL = "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"
#: One message, one round trip: did the transaction write, commit it, and where
#: the WAL is after the commit. (psycopg sends statements without parameters
#: in the simple query protocol, so three statements travel together.)
COMMIT_READING_LSN_SQL = f"{XACT_SQL}; COMMIT; {CURRENT_LSN_SQL}"
#: The highest pg_lsn: no replica ever reports having replayed it.
UNKNOWN_LSN = 2**64 - 1


def watch_engine(engine: Engine) -> None:
    """Mark a write engine's connections when they run DML inside a request."""
    event.listen(engine, "before_cursor_execute", _mark)


def _mark(
    conn: Connection, cursor: Any, statement: str, params: Any, context: Any, many: bool
) -> None:
    if context is None or request_state.get() is None:
        return
    if context.isinsert or context.isupdate or context.isdelete:
        conn.info[_WROTE] = True
    elif (context.compiled is None or context.is_text) and not conn.info.get(_WROTE):
        conn.info[_WROTE] = "maybe"


def watch_session_class(cls: type[Session]) -> None:
    event.listen(cls, "after_begin", _after_begin)
    event.listen(cls, "before_commit", _before_commit)
    event.listen(cls, "after_commit", _after_commit)
    event.listen(cls, "after_rollback", _forget)


def _after_begin(session: Session, transaction: Any, connection: Connection) -> None:
    if transaction.parent is not None:  # a savepoint: same connection, same transaction
        return
    connection.info.pop(_WROTE, None)
    session.info.setdefault(_CONNECTIONS, []).append(connection)


def _before_commit(session: Session) -> None:
    # Savepoint commits fire this too; only the real COMMIT makes a write visible.
    if request_state.get() is None or session.in_nested_transaction():
        return
    # before_commit runs before the commit's own flush. Flush first: when the pending
    # objects are all the transaction has, it is this flush that begins it (and
    # registers its connection through after_begin).
    session.flush()
    connections = session.info.get(_CONNECTIONS)
    if not connections:
        return
    if (
        len(connections) == 1
        and connections[0].info.get(_WROTE)
        and session.info.get("rwdb_pin_mode", "lsn") == "lsn"
        and isinstance(connections[0].connection.driver_connection, psycopg.Connection)
    ):
        wrote, lsn = _commit_reading_lsn(connections[0])
        if wrote:
            session.info[_COMMITTED_LSN] = lsn
        return
    for conn in connections:
        mark = conn.info.get(_WROTE)
        if mark == "maybe":
            mark = bool(conn.exec_driver_sql(XACT_SQL).scalar())
        if mark:
            session.info[_COMMIT_WROTE] = conn
            return


def _after_commit(session: Session) -> None:
    state = request_state.get()
    if state is None or session.in_nested_transaction():
        return
    conn = session.info.pop(_COMMIT_WROTE, None)
    committed_lsn = session.info.pop(_COMMITTED_LSN, None)
    session.info.pop(_CONNECTIONS, None)
    if committed_lsn is not None:
        state.note_commit(committed_lsn)
        return
    if conn is None:
        return
    if session.info.get("rwdb_pin_mode", "lsn") != "lsn":
        state.note_commit(0)
        return
    try:
        lsn = current_lsn(conn)
    except Exception:
        # The COMMIT went through; only reading the position after it failed (the
        # connection died with it: a switchover, a crash). The write stands, so the
        # request must not fail for it; the client is pinned to the primary instead.
        logger.warning(
            "fastapi_rwdb: committed, but the WAL position could not be read after it; "
            "this client reads from the primary until its token expires",
            exc_info=True,
        )
        lsn = UNKNOWN_LSN
    state.note_commit(lsn)


def _forget(session: Session) -> None:
    if session.in_nested_transaction():
        return
    session.info.pop(_COMMITTED_LSN, None)
    session.info.pop(_COMMIT_WROTE, None)
    session.info.pop(_CONNECTIONS, None)


def _commit_reading_lsn(conn: Connection) -> tuple[bool, int]:
    """COMMIT on psycopg with the write check and the LSN read in the same round trip.

    Sent through SQLAlchemy, so a failing COMMIT (a deferred constraint, a lost
    connection, a demoted primary) raises its usual wrapped error and goes
    through the package's error handling; the session then rolls back and no
    token is issued. After it, psycopg's own commit() finds no transaction open
    and sends nothing.
    """
    result = conn.exec_driver_sql(COMMIT_READING_LSN_SQL)
    cursor = result.cursor
    try:
        wrote = cursor.fetchone()
        cursor.nextset()  # COMMIT
        cursor.nextset()
        lsn = cursor.fetchone()
    finally:
        result.close()
    assert wrote is not None and lsn is not None
    return bool(wrote[0]), int(lsn[0])


def current_lsn(conn: Connection) -> int:
    """The primary's WAL position, read on ``conn`` outside any transaction.

    Straight on the driver connection: through SQLAlchemy it would cost a
    BEGIN and a ROLLBACK around the one SELECT.
    """
    return int(fetch_outside_transaction(conn.connection.driver_connection, CURRENT_LSN_SQL))
