"""Queries sent on the driver's own connection (psycopg or asyncpg), below SQLAlchemy.

Each saves round trips that SQLAlchemy's way would cost behind PgBouncer: no
BEGIN/ROLLBACK around a ping or a position read, no describe step on asyncpg.
The checkout (:mod:`.checkout`) and the write tracking
(:mod:`fastapi_rwdb.orm.writes`) ask the server through these.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from typing import Any

import psycopg

from ..routing.lsn import parse_lsn
from .asyncpg_connection import begin_reading, first_copied_line, is_ours
from .sqlalchemy_internals import adapter_transaction_opener, await_

#: Connection-record info key: the checkout's ping left a transaction open that no
#: statement may have used yet (see :func:`end_unused_transaction`).
_BEGUN = "rwdb_begun"

#: How far the server behind a connection is: the replay position on a replica,
#: the current position on a primary (whose data is all there is). As text: see lsn.py.
POSITION = (
    "(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)"
)
POSITION_SQL = f"SELECT {POSITION}::text"


def ping_query(dbapi_connection: Any, position: bool, timeout: float) -> int | None:
    """The checkout ping's one round trip: the server's position when ``position``
    (a read asked for it), else a no-op."""
    # psycopg's connection is the DBAPI connection; asyncpg's sits under SQLAlchemy's adapter.
    raw = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if position:
        return parse_lsn(fetch_outside_transaction(raw, POSITION_SQL, timeout))
    if isinstance(raw, psycopg.Connection):
        # An empty query, as SQLAlchemy's own ping: the server has nothing to parse.
        # Sent on the low-level handle, as psycopg's own execute() has no deadline.
        _answer(_simple_query(raw.pgconn, b";", timeout))
    else:  # asyncpg (which cannot take an empty query): the simple protocol, one round trip
        await_(raw.execute("SELECT 1", timeout=timeout))
    return None


#: Connection-record info key: this connection's transactions take their snapshot
#: at their first statement (not READ COMMITTED): the ping must not open them.
_SNAPSHOT_AT_FIRST = "rwdb_snapshot_at_first"


def begin_reading_position(
    dbapi_connection: Any, info: dict[str, Any], timeout: float, then: bytes = b""
) -> int | None:
    """The server's WAL position, read in the message that opens the transaction
    the session's statements will run in.

    The drivers send their ``BEGIN`` as a round trip of its own; sent here with the
    position query, the question costs nothing. psycopg: ``BEGIN ...; SELECT``, one
    simple-query message on its documented low-level handle, with the ``BEGIN``
    psycopg would send (same options), so psycopg sends none. asyncpg: SQLAlchemy's
    adapter opens its transaction as before a first statement, and the package's
    connection class adds the query to that ``BEGIN``'s message
    (:func:`~fastapi_rwdb.engine.asyncpg_connection.begin_reading`).

    Sound only where every statement takes its own snapshot (READ COMMITTED): the
    snapshot of the session's first statement is then taken after the position
    was read, so it holds everything up to it. Under REPEATABLE READ the snapshot
    would be the position query's own, possibly older than the position it
    reads: such a connection gets the position outside any transaction instead.
    ``then``: a statement of the transaction sent in the same message (the read
    deadline's ``SET LOCAL``), only where the transaction is opened here.
    """
    raw = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if isinstance(raw, psycopg.Connection):
        if raw.isolation_level in (None, psycopg.IsolationLevel.READ_COMMITTED) and not info.get(
            _SNAPSHOT_AT_FIRST
        ):
            last = _answer(
                _simple_query(
                    raw.pgconn,
                    _begin_command(raw)
                    + (b"; " + then if then else b"")
                    + b"; "
                    + POSITION_AND_ISOLATION_SQL.encode(),
                    timeout,
                )
            )
            position, isolation = first_row(last, 2)
            return _begun(dbapi_connection, info, position, isolation)
    elif (
        getattr(dbapi_connection, "isolation_level", "?") in (None, "read_committed")
        and not info.get(_SNAPSHOT_AT_FIRST)
        and is_ours(raw)
        and (start := adapter_transaction_opener(dbapi_connection)) is not None
    ):
        query, then_sql = POSITION_AND_ISOLATION_SQL, then.decode() or None
        sent, line = await_(begin_reading(raw, start, query, then_sql, timeout))
        if sent:
            position, _, isolation = (line or "").partition("\t")
            known = None if position == "\\N" else position
            return _begun(dbapi_connection, info, known, isolation)
        if raw.is_in_transaction():  # opened some other way: without the deadline's SET
            dbapi_connection.rollback()
    return parse_lsn(fetch_outside_transaction(raw, POSITION_SQL, timeout))


def _begun(
    dbapi_connection: Any, info: dict[str, Any], position: str | None, isolation: str | None
) -> int | None:
    """After :func:`begin_reading_position`'s message: keep its transaction for the
    session, unless the server's default isolation level is another than READ
    COMMITTED (then ask outside any transaction from now on)."""
    if isolation != "read committed":
        info[_SNAPSHOT_AT_FIRST] = True
        dbapi_connection.rollback()
    else:
        info[_BEGUN] = True
    return parse_lsn(position)


def begin_with(raw: psycopg.Connection[Any], then: bytes, timeout: float) -> Any:
    """Open ``raw``'s transaction with the ``BEGIN`` psycopg would send and ``then`` in
    the same message (one round trip, as psycopg's own ``BEGIN``); psycopg sends none.
    ``then``'s result; :class:`NoAnswerError` after ``timeout``."""
    return _answer(_simple_query(raw.pgconn, _begin_command(raw) + b"; " + then, timeout))


def _pipelined_begin_supported() -> bool:
    """psycopg's pipeline mode (libpq 14 or later), and ``autocommit`` a property over
    the attribute :func:`begin_with_first` sets (a contract test reads it back);
    without them, :func:`begin_with` is used instead."""
    prop = getattr(psycopg.Connection, "autocommit", None)
    return psycopg.Pipeline.is_supported() and isinstance(prop, property)


#: Whether :func:`begin_with_first` can send a ``BEGIN`` with the first statement;
#: where not, the transaction's opening costs a round trip of its own (:func:`begin_with`).
PIPELINED_BEGIN = _pipelined_begin_supported()


def begin_with_first(
    raw: psycopg.Connection[Any],
    then: bytes,
    first: Callable[[], None],
    own: psycopg.Cursor[Any] | None = None,
) -> None:
    """Open ``raw``'s transaction with the ``BEGIN`` psycopg would send and ``then`` (on
    ``own``, which then holds ``then``'s answer), and send ``first`` (the first statement,
    run by psycopg's cursor) in the same flush: one round trip, where :func:`begin_with`
    costs one before the statement's own.

    In pipeline mode psycopg follows its own ``BEGIN`` with a Sync and waits for it,
    so for the pipeline the connection is put in autocommit (psycopg then sends no
    ``BEGIN``), switched through the attribute under psycopg's property (the one
    private psycopg name used here; a contract test reads it back): its setter
    refuses to turn it off inside the transaction this opened.

    Errors are psycopg's own, raised as the first statement's for SQLAlchemy (a lost
    connection is discarded, the statement run again). Pipelined only when idle.
    """
    if raw.autocommit or raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        sent = then if own is None else b""
        if raw.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            sent = _begin_command(raw) + (sent and b"; " + sent)
        if sent:
            _answer(_simple_query(raw.pgconn, sent, None))
        if own is not None:
            own.execute(then)
        first()
        return
    raw._autocommit = True  # idle, as psycopg's setter checks (it costs a generator)
    try:
        with raw.pipeline():
            own = raw.cursor() if own is None else own
            own.execute(_begin_command(raw))
            own.execute(then)
            first()
    except psycopg.Error as exc:
        if raw.pgconn.pipeline_status == psycopg.pq.PipelineStatus.OFF:
            raise
        # Left in pipeline mode, its answers cut short (a terminated server
        # connection): psycopg then raises that it cannot leave the mode, over the
        # server's own error. The connection can serve nobody: closed, so SQLAlchemy
        # discards it, and the server's error raised, for the first statement's retry.
        raw.close()
        cause = exc.__context__
        if isinstance(cause, psycopg.Error):
            raise cause from None
        raise
    finally:
        raw._autocommit = False


def _simple_query(pgconn: Any, sql: bytes, timeout: float | None) -> list[Any]:
    """Every result of a simple-query message, waiting on the socket as psycopg does.

    Not libpq's blocking ``PQgetResult``: psycopg calls it holding the GIL (it only
    ever calls it once a result is there), so waiting in it would stop every other
    thread of the process for the round trip. ``timeout`` ``None``: as long as the
    server takes.
    """
    pgconn.send_query(sql)
    deadline = None if timeout is None else time.monotonic() + timeout
    while pgconn.flush():  # the socket took part of the message: wait to send the rest
        _wait(pgconn.socket, select.POLLOUT, deadline, timeout)
    results: list[Any] = []
    while True:
        pgconn.consume_input()
        while not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:
                return results
            results.append(result)
        _wait(pgconn.socket, select.POLLIN, deadline, timeout)


class NoAnswerError(psycopg.OperationalError):
    """The server sent nothing back within the deadline. The connection is left
    mid-query and must be discarded, never used again: its answer may come later."""


def _wait(fd: int, events: int, deadline: float | None, timeout: float | None) -> None:
    poller = select.poll()
    poller.register(fd, events)
    wait_ms = -1 if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
    if not poller.poll(wait_ms):
        raise NoAnswerError(f"no answer within {timeout:g} s")


def _answer(results: list[Any]) -> Any:
    """The last result of a simple query, or the server's error as psycopg's."""
    last = results[-1] if results else None
    ok = (
        psycopg.pq.ExecStatus.TUPLES_OK,
        psycopg.pq.ExecStatus.COMMAND_OK,
        psycopg.pq.ExecStatus.EMPTY_QUERY,
    )
    if last is None or last.status not in ok:
        message = "" if last is None else (last.error_message or b"").decode(errors="replace")
        raise psycopg.OperationalError(message.strip() or "no answer to the query")
    return last


def simple_query_results(raw: psycopg.Connection[Any], sql: str) -> list[Any]:
    """Every result of ``sql``, sent as one simple-query message on psycopg's
    documented low-level handle: a message of several statements whose results are
    all wanted (the write tracking's COMMIT and WAL position) without psycopg's
    cursor machinery, some 50 Python calls per message.

    No deadline (a COMMIT timed out after the server committed would be a write of
    unknown outcome); a statement that failed raises psycopg's own exception for
    it, as a cursor would, so SQLAlchemy wraps and reports it as before.
    """
    results = _simple_query(raw.pgconn, sql.encode(), None)
    for result in results:
        if result.status == psycopg.pq.ExecStatus.FATAL_ERROR:
            raise psycopg.errors.error_from_result(result, encoding=raw.info.encoding)
    return results


#: The position and the transaction's isolation level (the server's default may not
#: be READ COMMITTED): see begin_reading_position.
POSITION_AND_ISOLATION_SQL = POSITION_SQL + ", current_setting('transaction_isolation')"


def _begin_command(raw: psycopg.Connection[Any]) -> bytes:
    """The ``BEGIN`` psycopg sends for this connection's options.

    Built from its public attributes; a contract test compares it with
    psycopg's own on the installed release.
    """
    parts = [b"BEGIN"]
    if raw.isolation_level is not None:
        level = psycopg.IsolationLevel(raw.isolation_level)
        parts.append(b"ISOLATION LEVEL " + level.name.replace("_", " ").encode())
    if raw.read_only is not None:
        parts.append(b"READ ONLY" if raw.read_only else b"READ WRITE")
    if raw.deferrable is not None:
        parts.append(b"DEFERRABLE" if raw.deferrable else b"NOT DEFERRABLE")
    return b" ".join(parts)


def first_row(result: Any, n: int) -> tuple[str | None, ...]:  # (its first n values, as text)
    return tuple(None if (v := result.get_value(0, i)) is None else v.decode() for i in range(n))


def end_unused_transaction(connection_info: dict[str, Any], dbapi_connection: Any) -> None:
    """Roll back the transaction the checkout ping opened, if no statement has run
    in it (SQLAlchemy has not begun one of its own): before something that
    psycopg refuses inside a transaction, such as a change of isolation level,
    or a query that must run outside it."""
    if not connection_info.pop(_BEGUN, False):
        return
    raw = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if isinstance(raw, psycopg.Connection):
        if raw.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
            raw.rollback()
    elif raw.is_in_transaction():  # asyncpg: the adapter forgets its transaction too
        dbapi_connection.rollback()


def position_now(
    dbapi_connection: Any, connection_info: dict[str, Any], timeout: float | None
) -> int | None:
    """The server's WAL position, asked now, so that the session's first statement
    takes a newer snapshot: outside any transaction, or in the unused one the ping
    opened (READ COMMITTED: each later statement takes its own; no ROLLBACK first).
    After ``timeout``: :class:`NoAnswerError` (psycopg), ``TimeoutError`` (asyncpg)."""
    raw = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if connection_info.get(_BEGUN) and isinstance(raw, psycopg.Connection):
        return parse_lsn(_fetch_simple(raw, POSITION_SQL, timeout))
    return parse_lsn(fetch_outside_transaction(raw, POSITION_SQL, timeout))


def forget_unused_transaction(connection_info: dict[str, Any]) -> None:
    """A connection checked out anew: any transaction a ping opened on it before
    ended when it went back to the pool."""
    connection_info.pop(_BEGUN, None)


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
        idle = raw.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if timeout is not None and idle:
            # Outside a transaction a simple query is one of its own: the deadline holds.
            return _fetch_simple(raw, sql, timeout)
        row = _execute_autocommit(raw, sql).fetchone()
        return None if row is None else row[0]
    return _fetch_by_copy(raw, sql, timeout)


def _fetch_simple(raw: psycopg.Connection[Any], sql: str, timeout: float | None) -> str | None:
    """``sql``'s first value as text, in one simple-query message, where ``raw`` is."""
    last = _answer(_simple_query(raw.pgconn, sql.encode(), timeout))
    return first_row(last, 1)[0] if last.ntuples else None


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
    line: str | None = await_(
        first_copied_line(lambda sink: raw.copy_from_query(sql, output=sink, timeout=timeout))
    )
    return line


def abandon(dbapi_connection: Any) -> None:
    """End a connection whose server may never answer, without waiting for it.

    Discarding an asyncpg connection, SQLAlchemy's adapter first tries a graceful
    close and waits up to 2 s for the server's goodbye, which a frozen path never
    sends: the driver's own connection is terminated here first, so that close
    returns at once. psycopg's close sends its goodbye and waits for nothing."""
    raw = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if raw is not None and not isinstance(raw, psycopg.Connection):
        raw.terminate()
