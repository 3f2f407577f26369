"""Which commits wrote, and the primary's WAL position right after them.

A commit earns the client a token only if its transaction changed data. The
write session notes what its statements may have done as they pass through it,
at no cost to the database: a flush or Core DML wrote; textual SQL, DDL or a
connection taken with ``session.connection()`` *may* have written, so that
question goes to PostgreSQL before COMMIT (``pg_current_xact_id_if_assigned()``
is NULL for a transaction that wrote nothing); a compiled ``SELECT`` with an
INSERT, UPDATE or DELETE in a CTE wrote. A compiled ``SELECT`` may still have
written through a function it called: on psycopg that question goes in the
COMMIT's message too (see :func:`_before_commit` for what it costs); asyncpg
is not asked. (Nothing is hooked per statement on the engine: a single engine
event listener puts every statement of the application on SQLAlchemy's slower,
event-dispatching path.)

The LSN is read *after* COMMIT: a position read before it is behind the commit
record, and a replica could reach it without showing the row. On psycopg the
COMMIT and the LSN read (and the question, when there is one) go in one
message: no round trip more than a plain COMMIT. That message is sent where
SQLAlchemy commits the connection, after every ``before_commit`` listener has
run (:mod:`fastapi_rwdb.engine.commit` says why there). On asyncpg the COMMIT
carries the LSN read too, as a COPY after it in the same message
(:mod:`fastapi_rwdb.engine.asyncpg_connection`); where that cannot be done, the
LSN is read right after the COMMIT, on the same connection, in one more round trip.

Outside a request (no request state) nothing is read and nothing is paid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import Connection, event
from sqlalchemy.orm import Session
from sqlalchemy.sql import visitors
from sqlalchemy.sql.selectable import CTE

from ..engine import asyncpg_connection, commit
from ..engine.sqlalchemy_internals import EXECUTE_INTERNAL
from ..engine.wire import (
    NoAnswerError,
    abandon,
    fetch_outside_transaction,
    simple_query_results,
)
from ..routing.lsn import MAX_LSN, parse_lsn
from ..routing.request import request_state
from .session_info import is_own_unit, pin_mode_of, write_timeout_of

logger = logging.getLogger("fastapi_rwdb")

_WROTE = "rwdb_wrote"  # Session.info: True, or "maybe"
_CONNECTIONS = "rwdb_write_connections"  # Session.info: connections of this transaction
_COMMIT_WROTE = "rwdb_commit_wrote"
_ONE_MESSAGE = "rwdb_one_message_commit"
_ARMED = "rwdb_asyncpg_commit_armed"  # Session.info: the asyncpg connection whose COMMIT reads

XACT_SQL = "SELECT pg_current_xact_id_if_assigned() IS NOT NULL"
CURRENT_LSN_SQL = "SELECT pg_current_wal_lsn()::text"
#: One message, one round trip (psycopg sends a statement without parameters in
#: the simple query protocol, so the statements travel together).
COMMIT_READING_LSN_SQL = f"COMMIT; {CURRENT_LSN_SQL}"
CHECK_COMMIT_READING_LSN_SQL = f"{XACT_SQL}; COMMIT; {CURRENT_LSN_SQL}"
CHECK_COMMIT_SQL = f"{XACT_SQL}; COMMIT"
#: A commit whose position could not be read: no replica ever reports having replayed it.
UNKNOWN_LSN = MAX_LSN


class TrackedWrites(Session):
    """Mixed in before the application's session class: notes what may have written.

    ``execute``, ``scalar``, ``scalars`` (and SQLModel's ``exec``) all pass
    through ``_execute_internal``: private SQLAlchemy API, see
    engine/sqlalchemy_internals.py (1.).
    Without it every transaction counts as "may have written" (``_after_begin``).
    """

    if EXECUTE_INTERNAL:

        def _execute_internal(self, statement: Any, *args: Any, **kw: Any) -> Any:
            result = super()._execute_internal(statement, *args, **kw)
            if statement.is_dml:
                self.info[_WROTE] = True
            elif not (statement.is_select and not statement.is_text):
                _maybe(self)  # text, DDL, anything else
            elif self.info.get(_WROTE) is not True and _writes_in_cte(statement):
                self.info[_WROTE] = True
            return result

    def connection(self, *args: Any, **kw: Any) -> Connection:
        conn = super().connection(*args, **kw)
        _maybe(self)  # what runs on it directly is out of sight
        return conn

    def bulk_save_objects(self, *args: Any, **kw: Any) -> None:
        super().bulk_save_objects(*args, **kw)
        self.info[_WROTE] = True

    def bulk_insert_mappings(self, *args: Any, **kw: Any) -> None:
        super().bulk_insert_mappings(*args, **kw)
        self.info[_WROTE] = True

    def bulk_update_mappings(self, *args: Any, **kw: Any) -> None:
        super().bulk_update_mappings(*args, **kw)
        self.info[_WROTE] = True


def _writes_in_cte(statement: Any) -> bool:
    """Whether a compiled SELECT carries an INSERT, UPDATE or DELETE in a CTE
    (``WITH w AS (INSERT ... RETURNING ...) SELECT ...``, or one attached with
    ``add_cte()``): PostgreSQL runs those whatever the SELECT does with them.

    A walk over the statement's elements, paid only by SELECTs in write sessions
    before the transaction's first known write. (SQLAlchemy's compiler does not
    record a DML CTE anywhere.)
    """
    return any(isinstance(e, CTE) and e.element.is_dml for e in visitors.iterate(statement))


def _maybe(session: Session) -> None:
    if not session.info.get(_WROTE):
        session.info[_WROTE] = "maybe"


def watch_session_class(cls: type[Session]) -> None:
    event.listen(cls, "after_begin", _after_begin)
    event.listen(cls, "after_flush", _after_flush)
    event.listen(cls, "before_commit", _before_commit)
    event.listen(cls, "after_commit", _after_commit)
    # Not after_rollback: close() and reset() end a transaction without it, and what
    # was noted about that transaction must not leak into the session's next one.
    event.listen(cls, "after_transaction_end", _after_transaction_end)


@dataclass(slots=True, eq=False)
class _OneMessageCommit:
    """The COMMIT of a psycopg transaction, sent with the LSN read (and, if
    ``check``, the question whether it wrote) when SQLAlchemy commits the
    connection; what it read is kept for ``after_commit``."""

    check: bool
    read_lsn: bool
    sent: bool = False
    wrote: bool = False
    lsn: int | None = None
    left_in: dict[str, Any] | None = None  # see engine.commit.commit_with

    def withdraw(self) -> None:
        if self.left_in is not None:
            commit.withdraw(self.left_in, self)
            self.left_in = None

    def __call__(self, driver_connection: psycopg.Connection[Any]) -> None:
        self.wrote, self.lsn = _commit_reading_lsn(
            driver_connection, check=self.check, read_lsn=self.read_lsn
        )
        self.sent = True


def _after_begin(session: Session, transaction: Any, connection: Connection) -> None:
    if transaction.parent is not None:  # a savepoint: same connection, same transaction
        return
    connections = session.info.setdefault(_CONNECTIONS, [])
    if not connections:  # the transaction's first connection: nothing written yet
        session.info.pop(_WROTE, None)
        if not EXECUTE_INTERNAL:  # statements unseen (sqlalchemy_internals): ask at commit
            session.info[_WROTE] = "maybe"
    connections.append(connection)


def _after_flush(session: Session, flush_context: Any) -> None:
    session.info[_WROTE] = True


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
    mark = session.info.get(_WROTE)
    one = len(connections) == 1 and pin_mode_of(session) == "lsn"
    raw = connections[0].connection.driver_connection
    if one and isinstance(raw, psycopg.Connection):
        # Only compiled SELECTs ran (no mark): they may still have written, through
        # a function they called. Asking costs no round trip here, only one statement
        # in the COMMIT's message; the WAL position is then read in a round trip of
        # its own, after the COMMIT, and only if the SELECTs did write. asyncpg is not
        # asked: there the question would be a round trip of its own (the cost of
        # both is in benchmarks/notes.md, "Asking whether a transaction wrote").
        plan = _OneMessageCommit(check=mark is not True, read_lsn=bool(mark))
        plan.left_in = commit.commit_with(connections[0], plan)
        session.info[_ONE_MESSAGE] = plan
        return
    if not mark:
        return
    for conn in connections:
        # With several connections the note cannot say which one wrote: ask each.
        if (mark is True and len(connections) == 1) or conn.exec_driver_sql(XACT_SQL).scalar():
            if one and asyncpg_connection.arm(raw):
                # asyncpg's COMMIT reads the position in its own message (a COPY after it).
                session.info[_ARMED] = raw
            else:
                session.info[_COMMIT_WROTE] = conn
            return


def _after_commit(session: Session) -> None:
    if session.in_nested_transaction():
        return
    conn = session.info.pop(_COMMIT_WROTE, None)
    plan: _OneMessageCommit | None = session.info.pop(_ONE_MESSAGE, None)
    armed = session.info.pop(_ARMED, None)
    sent_with = asyncpg_connection.committed_at(armed) if armed is not None else None
    connections = session.info.get(_CONNECTIONS) or [None]
    _forget(session)
    state = request_state.get()
    if state is None:
        return
    if plan is not None:
        if not plan.sent:
            # The engine did not send it (an engine not made by make_engine, or a
            # transaction not the session's to commit): as on asyncpg, read the
            # position after the COMMIT if the transaction was seen writing.
            plan.withdraw()
            if not plan.read_lsn:
                return
        elif not plan.wrote:
            return
        elif plan.lsn is not None:
            state.note_commit(plan.lsn, own=is_own_unit(session))
            return
        # (else only SELECTs ran and yet it wrote, through a function: read it now)
        conn = connections[0]
    if sent_with is not None:
        sent, position = sent_with
        if sent:
            state.note_commit(_lsn_or_unknown(position), own=is_own_unit(session))
            return
        conn = connections[0]  # committed some other way: read the position now
    if conn is None:
        return
    if pin_mode_of(session) != "lsn":
        state.note_commit(0, own=is_own_unit(session))
        return
    try:
        lsn = current_lsn(conn, write_timeout_of(session))
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
    state.note_commit(lsn, own=is_own_unit(session))


def _after_transaction_end(session: Session, transaction: Any) -> None:
    if transaction.parent is None:  # the session's transaction, not a savepoint
        _forget(session)


def _forget(session: Session) -> None:
    # (Every key below comes with the transaction's connections: none, nothing to forget.)
    if _CONNECTIONS not in session.info or session.in_nested_transaction():
        return
    plan: _OneMessageCommit | None = session.info.pop(_ONE_MESSAGE, None)
    if plan is not None:
        plan.withdraw()
    armed = session.info.pop(_ARMED, None)
    if armed is not None:
        asyncpg_connection.committed_at(armed)  # disarmed: the transaction ended otherwise
    for key in (_COMMIT_WROTE, _CONNECTIONS, _WROTE):
        session.info.pop(key, None)


def _commit_reading_lsn(
    raw: psycopg.Connection[Any], *, check: bool, read_lsn: bool
) -> tuple[bool, int | None]:
    """COMMIT on psycopg with the LSN read (if ``read_lsn``) and the question whether
    the transaction wrote (if ``check``) in the same round trip.

    Sent on the driver's own connection (:func:`~fastapi_rwdb.engine.wire.simple_query_results`):
    through ``exec_driver_sql`` it would cost SQLAlchemy's whole statement
    machinery, and a first result without rows (the COMMIT) would close the
    cursor before the LSN could be fetched; a psycopg cursor costs its own
    machinery per result, which shows when the process is bound by CPU. Called
    by the engine's ``do_commit``, so a failure is handled as SQLAlchemy handles
    any failed COMMIT: wrapped as usual (a deferred constraint, a lost
    connection, a demoted primary), the package's error hook sees it, the
    connection is invalidated if it died; no token is issued. psycopg's own
    ``commit()`` is not called: the transaction is over.
    """
    if not read_lsn:
        sql = CHECK_COMMIT_SQL
    else:
        sql = CHECK_COMMIT_READING_LSN_SQL if check else COMMIT_READING_LSN_SQL
    results = simple_query_results(raw, sql)
    # One result per statement: the question, the COMMIT, the position. Should any
    # be missing, the safe answers: it wrote, at a position no replica reports.
    complete = len(results) == check + 1 + read_lsn
    wrote = True
    if check and complete:
        wrote = _value(results[0]) != "f"
    if not read_lsn:
        return wrote, None
    return wrote, _lsn_or_unknown(_value(results[-1]) if complete else None)


def _value(result: Any) -> str | None:
    """The first column of a simple-query result's first row, as text."""
    if result.status != psycopg.pq.ExecStatus.TUPLES_OK or not result.ntuples:
        return None
    value = result.get_value(0, 0)
    return None if value is None else bytes(value).decode()


def current_lsn(conn: Connection, timeout: float | None = None) -> int:
    """The primary's WAL position, read on ``conn`` outside any transaction.

    Straight on the driver connection, in one round trip: through SQLAlchemy
    it would cost a BEGIN and a ROLLBACK around the one SELECT. With no answer
    within ``timeout`` (the write deadline) the path froze after the COMMIT: the
    connection is given up at once (its answer may still come) and the error raised.
    """
    raw = conn.connection.driver_connection
    try:
        position = fetch_outside_transaction(raw, CURRENT_LSN_SQL, timeout)
    except (NoAnswerError, TimeoutError) as exc:
        abandon(raw)
        conn.invalidate(exc)
        raise
    return _lsn_or_unknown(position)


def _lsn_or_unknown(text: str | None) -> int:
    lsn = parse_lsn(text)
    return UNKNOWN_LSN if lsn is None else lsn
