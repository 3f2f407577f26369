"""The checkout: one round trip that proves a pooled connection alive and, when a
read asks, tells how far the server behind it has got.

SQLAlchemy pings asyncpg inside BEGIN/ROLLBACK: four round trips behind
PgBouncer. The ping here (:func:`install_ping`) is one round trip on both
drivers, outside any transaction. It is skipped for a connection opened just now
(as in SQLAlchemy: should it be unusable, the request's own statement fails and
the pool is invalidated), and for one returned to the pool less than
``RWDB_PING_SKIP_MS`` ago whose socket has nothing to say (as HikariCP's
``aliveBypassWindowMs``): a server or proxy that closed it makes the socket
readable, and then it is pinged after all; one that died silently is found by
the first statement, which :mod:`fastapi_rwdb.orm.reconnect` runs again.

A read that needs a position calls :func:`connect_at_position` instead of
``engine.connect()``. Its ping then reads the server's WAL position instead of
running a no-op, so read-your-writes costs no query of its own; when the session
will run its statements there, the same message opens their transaction
(:func:`fastapi_rwdb.engine.wire.begin_reading_position`). The ping
runs inside ``engine.connect()``, where no argument reaches it, so the question
travels in a contextvar and the answer comes back in the same object: both ends
are in this module, and nothing outside it sees either.

A connection whose server was short of the needed position a moment ago is not
asked again: it comes back with the remembered position, so a paused replica's
connections cost a read nothing.

A read may instead take a connection without asking and have its position
checked with its first statement (:class:`PositionCheck`; on psycopg while the read
pool is quiet): one round trip for the ``BEGIN``, the check and the statement, where
asking first costs one more. On psycopg the check is a query in the statement's
pipeline, and the statement's answer counts only once the position is known to be
far enough; on asyncpg it is a statement kept with the ``BEGIN`` that fails when the
replica is short, and the statement is then never run. Either way
:class:`ReplicaBehindError` is raised in its place and the read session routes the
statement again the careful way (:mod:`fastapi_rwdb.orm.reads`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import DisconnectionError, InvalidatePoolError

from ..errors import DatabaseUnavailableError
from ..routing.lsn import format_lsn, parse_lsn
from ..routing.rules import far_enough
from ..settings import RWDBSettings
from . import servers
from .sqlalchemy_internals import EXECUTE_INTERNAL
from .sqlstates import brief
from .wire import (
    POSITION,
    POSITION_AND_ISOLATION_SQL,
    NoAnswerError,
    abandon,
    begin_reading_position,
    forget_unused_transaction,
    looks_alive,
    ping_query,
    position_now,
)

#: How long a connection found short of a position is taken to still be short of
#: it (a paused or lagging replica): reads that need as much skip it without a
#: ping for that long. Short, as a lagging replica catches up within its lag.
BEHIND_FOR = 0.25

# Connection-record info keys, private to this module.
_FRESH = "rwdb_fresh"  # opened just now: not pinged
_RETURNED_AT = "rwdb_returned_at"  # time.monotonic() when last returned to the pool
_LAST_POSITION = "rwdb_last_position"  # (position, time.monotonic()) the ping last read
_REPORTED = "rwdb_reported_position"  # a position reported instead of the server's
_PING_TIMED_OUT = "rwdb_ping_timed_out"  # record_info: the last ping got no answer in time


@dataclass(slots=True)
class _Asked:
    """A read's question to the ping of the checkout it is making, and the answer."""

    begin: bool  # open the session's transaction in the same message
    needed: int | None  # the position the read needs (for the remembered shortcut)
    then: bytes  # sent with the BEGIN, when the ping opens the transaction
    answered: bool = False
    position: int | None = None
    remembered: bool = False  # the answer is the position remembered from moments ago


class ConnectionLostError(DatabaseUnavailableError):
    """A connection checked out, then lost while its position was read: unlike a
    connection that could not be opened at all, another may do."""


_asked: ContextVar[_Asked | None] = ContextVar("rwdb_position_asked", default=None)


def connect_at_position(
    engine: Engine,
    *,
    begin: bool = False,
    needed: int | None = None,
    then: bytes = b"",
    timeout: float | None = None,
) -> tuple[Connection, int | None, bool]:
    """A connection of ``engine``, its server's WAL position, and whether that position
    was remembered from moments ago rather than asked now.

    Read by the checkout's ping in its one round trip; a connection opened just now
    (not pinged) or one that reports another position is asked here. ``begin``: the
    caller's statements will run on this connection, so the ping may open their
    transaction too, with ``then`` in the same message (the read deadline's
    ``SET LOCAL``). ``needed``: the position the read needs (see module doc).
    ``timeout``: how long a position asked here (of a connection opened just now)
    may take, as :func:`position_of`'s.
    A connection that cannot answer is discarded and :class:`ConnectionLostError`
    raised; one that cannot be opened raises
    :class:`~fastapi_rwdb.errors.DatabaseUnavailableError` (from the connect retry).
    """
    asked = _Asked(begin, needed, then)
    reset = _asked.set(asked)
    try:
        conn = engine.connect()
    finally:
        _asked.reset(reset)
    try:
        if asked.answered and _REPORTED not in conn.connection.info:
            return conn, asked.position, asked.remembered
        return conn, position_of(conn, timeout), False
    except ConnectionLostError:  # given up already (position_of)
        conn.close()
        raise
    except Exception as exc:
        # Asked on the driver's connection, so SQLAlchemy did not see the failure: a
        # connection that cannot answer this serves nobody.
        conn.invalidate()
        conn.close()
        raise ConnectionLostError(
            "a database connection was lost while checking its WAL position"
        ) from exc
    except BaseException:
        conn.close()
        raise


class ReplicaBehindError(Exception):
    """A read's position was checked with its first statement and the replica was short
    of it (or its transaction's isolation level takes the snapshot before the check):
    the statement's answer is thrown away, for the read session to route it again.
    ``unfit``: the server's transactions are not READ COMMITTED, or the engine's
    connections cannot carry a check (asyncpg's statement cache), so no check with a
    first statement will ever do there."""

    def __init__(self, *, unfit: bool = False) -> None:
        super().__init__("the replica had not replayed the position the read needs")
        self.unfit = unfit


def check_with_first(connection: Connection, needed: int) -> PositionCheck | None:
    """How ``connection``'s transaction, just begun, makes sure of ``needed`` with its
    first statement: a :class:`PositionCheck`, or ``None`` when its position is known
    without asking (reported, as the test kit's stale replica does). Raises
    :class:`ReplicaBehindError` at once when the position is known to be short."""
    info = connection.connection.info
    if _REPORTED in info:
        if far_enough(info[_REPORTED], needed):
            return None
        raise ReplicaBehindError()
    if _known_behind(info, needed) is not None:
        raise ReplicaBehindError()
    return PositionCheck(info, needed)


#: What :meth:`PositionCheck.failing_query` says when it fails: the text its cast to
#: ``pg_lsn`` could not read, quoted in the error in any server language ("", »«, « »).
_BEHIND = "rwdb: short, at "
_UNFIT = "rwdb: isolation "
_FAILED = re.compile(f"{_BEHIND}([0-9A-F]+/[0-9A-F]+|none)|{_UNFIT}([a-z ]+[a-z])")


class PositionCheck:
    """The position query sent just before a read's first statement, in the same
    pipeline (psycopg) or kept with its ``BEGIN`` (asyncpg), and the verdict on what
    it returned.

    In READ COMMITTED the statement takes its snapshot after the position was read,
    so a position far enough means the statement saw the client's write. Under
    another isolation level the snapshot would be the check's own, taken before the
    position was read: no verdict, the read is routed again. A statement that failed
    on a replica short of the position (a table the client just created, not there
    yet) is no answer either: behind, not the error."""

    __slots__ = ("info", "needed")

    def __init__(self, info: dict[str, Any], needed: int) -> None:
        self.info = info
        self.needed = needed

    @staticmethod
    def query(timeout_ms: int) -> bytes:
        """The position query, which also gives the transaction its server-side
        statement timeout (``set_config(..., true)`` is ``SET LOCAL``): one command
        of the pipeline fewer."""
        timeout = f"set_config('statement_timeout', '{timeout_ms}', true)"
        return f"{POSITION_AND_ISOLATION_SQL}, {timeout}".encode()

    def run(
        self, raw: psycopg.Connection[Any], send: Callable[[psycopg.Cursor[Any]], None]
    ) -> None:
        """Open the transaction with :meth:`query` and the first statement through
        ``send``, the query's answer landing in the cursor ``send`` is given."""
        asked = raw.cursor()
        try:
            send(asked)
        except psycopg.Error:
            result = asked.pgresult  # (a connection lost on the way: its own error)
            if not raw.closed and result and result.status == psycopg.pq.ExecStatus.TUPLES_OK:
                self.confirm(asked.fetchone())
            raise
        self.confirm(asked.fetchone())

    def failing_query(self) -> str:
        """The check as a statement that fails when the replica is short, or when the
        transaction is not READ COMMITTED (asyncpg: a statement kept with the ``BEGIN``
        returns no row to read, only an error; see
        :mod:`fastapi_rwdb.engine.asyncpg_connection`). The failure is a cast to
        ``pg_lsn`` of a text it cannot read, which carries the replica's position;
        :meth:`judge` reads it. One command (no ``; ``), as the ``BEGIN``'s others."""
        isolation = "current_setting('transaction_isolation')"
        return (
            f"SELECT CASE WHEN {isolation} <> 'read committed'"
            f" THEN ('{_UNFIT}' || {isolation})::pg_lsn"
            f" WHEN {POSITION} >= '{format_lsn(self.needed)}' THEN NULL"
            f" ELSE ('{_BEHIND}' || coalesce({POSITION}::text, 'none'))::pg_lsn END"
        )

    def judge(self, error: BaseException | None) -> None:
        """After the first statement kept with :meth:`failing_query`: an ``error`` that is
        the check's own failure (the statement never ran) becomes
        :class:`ReplicaBehindError`; ``None`` (it passed) is remembered as the position."""
        if error is None:
            self.info[_LAST_POSITION] = (self.needed, time.monotonic())
            return
        failed = _check_failure(error)
        if failed is None:
            return
        at, isolation = failed.groups()
        if isolation is not None:
            raise ReplicaBehindError(unfit=True) from error
        self.info[_LAST_POSITION] = (None if at == "none" else parse_lsn(at), time.monotonic())
        raise ReplicaBehindError() from error

    def confirm(self, row: tuple[str | None, ...] | None) -> None:
        position_text, isolation = (row or (None, None))[:2]
        position = parse_lsn(position_text)
        self.info[_LAST_POSITION] = (position, time.monotonic())
        if isolation not in (None, "read committed"):
            raise ReplicaBehindError(unfit=True)
        if isolation is None or not far_enough(position, self.needed):
            raise ReplicaBehindError()


def _check_failure(error: BaseException) -> re.Match[str] | None:
    """What :meth:`PositionCheck.failing_query` said, if ``error`` (the driver's, or
    SQLAlchemy's adapter's around it) is its failure: SQLSTATE 22P02 with its text."""
    seen: BaseException | None = error
    while seen is not None:
        if getattr(seen, "sqlstate", None) == "22P02":
            found = _FAILED.search(str(seen))
            if found is not None:
                return found
        seen = seen.__cause__
    return None


def ping_timed_out(record: Any) -> bool:
    """Whether the connection ``record`` is reopening for was discarded because its
    checkout ping got no answer in time (asked once, by the connect hook)."""
    return bool(record.record_info.pop(_PING_TIMED_OUT, False))


def position_of(conn: Connection, timeout: float | None = None) -> int | None:
    """The WAL position of ``conn``'s server, asked now (see
    :func:`~fastapi_rwdb.engine.wire.position_now`). With no answer within
    ``timeout`` the path is frozen: the connection is given up at once, its replica
    passed over for a while, and :class:`ConnectionLostError` raised."""
    info = conn.connection.info
    if _REPORTED in info:
        reported: int | None = info[_REPORTED]
        return reported
    dbapi_connection = conn.connection.dbapi_connection
    try:
        return position_now(dbapi_connection, info, timeout)
    except (NoAnswerError, TimeoutError) as exc:
        servers.timed_out(info)
        abandon(dbapi_connection)
        conn.invalidate(exc)
        raise ConnectionLostError(
            "a database connection gave no answer in time while checking its WAL position"
        ) from exc


def report_position(engine: Engine, position: int) -> None:
    """Every connection ``engine`` opens reports ``position`` as its server's, whenever a
    read asks: the one hook for a read side that is behind by other means than
    replay (the test kit's stale replica, a snapshot of the primary)."""

    @event.listens_for(engine, "connect")
    def _report(dbapi_connection: Any, record: Any) -> None:
        record.info[_REPORTED] = position


def _known_behind(info: dict[str, Any], needed: int | None) -> int | None:
    """The position remembered for this connection, if it was short of ``needed``
    less than :data:`BEHIND_FOR` ago; else ``None``."""
    last = info.get(_LAST_POSITION)
    if (
        needed is None
        or last is None
        or last[0] is None
        or last[0] >= needed
        or time.monotonic() - last[1] >= BEHIND_FOR
    ):
        return None
    position: int = last[0]
    return position


def install_ping(engine: Engine, settings: RWDBSettings, *, side: str = "write") -> None:
    """Replace SQLAlchemy's pre-ping on ``engine`` with this module's checkout ping."""
    # Without the session hook that retries a statement on a dead connection
    # (orm.reconnect), every checkout pings.
    skip_window = settings.ping_skip_ms / 1000 if EXECUTE_INTERNAL else 0.0
    timeout = settings.connect_timeout
    limit = settings.read_timeout if side == "read" else settings.write_timeout
    if limit > 0:
        # A checkout is part of the read or write it serves: that deadline bounds it too.
        timeout = min(timeout, limit)

    @event.listens_for(engine, "connect")
    def _fresh(dbapi_connection: Any, record: Any) -> None:
        record.info[_FRESH] = True

    if skip_window:

        @event.listens_for(engine, "checkin")
        def _returned(dbapi_connection: Any, record: Any) -> None:
            if dbapi_connection is not None:  # None: invalidated, not coming back
                record.info[_RETURNED_AT] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        info = record.info
        forget_unused_transaction(info)
        if servers.benched(info):
            # Its replica gave no answer in time moments ago: not handed out. The pool
            # opens a new connection for this checkout, which the connect passes over
            # a benched replica for (engine.events).
            info.pop(_FRESH, None)
            raise DisconnectionError("its replica is benched")
        if info.pop(_FRESH, False):
            return
        asked = _asked.get()
        if asked is not None and (remembered := _known_behind(info, asked.needed)) is not None:
            asked.answered, asked.position, asked.remembered = True, remembered, True
            return
        if (
            asked is None
            and time.monotonic() - info.get(_RETURNED_AT, -skip_window) < skip_window
            and looks_alive(dbapi_connection)
        ):
            return
        try:
            if asked is not None and asked.begin:
                value = begin_reading_position(dbapi_connection, info, timeout, asked.then)
            else:
                value = ping_query(dbapi_connection, asked is not None, timeout)
        except (NoAnswerError, TimeoutError) as exc:
            # No answer within the deadline: this connection's path is frozen (a
            # stopped PgBouncer, a stalled server), perhaps only this one's: another
            # replica's connections stay. This one is discarded (its answer may
            # come later), never handed out. The pool then opens a new one for this
            # checkout, which the connect hook refuses at once (ping_timed_out): a
            # connect on a frozen path would cost the whole connect timeout again.
            record.record_info[_PING_TIMED_OUT] = True
            servers.timed_out(info)  # and its replica is passed over for a while
            abandon(dbapi_connection)  # discarded at once, not after a graceful close
            raise DisconnectionError(f"ping timed out: {brief(exc)}") from exc
        except Exception as exc:
            # After a failover every pooled connection is likely dead: discard
            # them all; the pool opens a new one for this checkout.
            raise InvalidatePoolError(f"ping failed: {brief(exc)}") from exc
        if asked is not None:
            asked.answered, asked.position = True, value
            info[_LAST_POSITION] = (value, time.monotonic())
