"""A pooled connection found dead by the first statement of a transaction: that
statement runs once more, on a fresh connection, and the caller never knows.

The checkout ping is skipped for a connection used moments ago
(``RWDB_PING_SKIP_MS``, as HikariCP's ``aliveBypassWindowMs``): it saves a round
trip on nearly every request under load. A connection that died in those
moments (a switchover, a crash, HAProxy closing a node's sessions, PgBouncer
restarting) is then found by the request's first statement instead of by the
ping. When that statement is the first of its transaction, nothing can have
been read or committed on it: the transaction is rolled back and the statement
sent again. SQLAlchemy has already discarded the connection and invalidated the
rest of its pool (as after a failed ping), so the retry runs on a connection
opened for it. Once only: a second failure is an outage, reported as one.

Not retried: a statement after the first (the transaction has read or written:
running it again elsewhere could contradict that), a transaction the caller began
with ``session.begin()`` (theirs to end), and a read bound to the very
connection whose replayed position was checked against the client's token
(another may not have the client's write; that checkout always pings, so it
rarely meets a dead connection). A flush that begins the transaction is
retried only when it inserts and nothing else: a rollback forgets the changes
of loaded objects, but pending objects can be added again.

Like :mod:`.writes` and :mod:`.replay` it hooks
SQLAlchemy's private ``Session._execute_internal``, where every ORM and Core
statement of a session passes (the async session's included).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, SessionTransactionOrigin

logger = logging.getLogger("fastapi_rwdb")

_CONNECTIONS = "rwdb_transaction_connections"  # Session.info: connections of this transaction
_COMMITTING = "rwdb_committing"
_RETRYING = "rwdb_retrying"  # Session.info: the one retry of a first statement is running


class LostConnectionRetry(Session):
    """Mixed in first, before the package's read and write session classes."""

    def _execute_internal(self, statement: Any, *args: Any, **kw: Any) -> Any:
        # Only when nothing is pending: a rollback would discard the caller's changes.
        retry = is_first_statement(self) and not (self.new or self.dirty or self.deleted)
        try:
            return super()._execute_internal(statement, *args, **kw)
        except DBAPIError as exc:
            if not (retry and _retryable(self, exc)):
                raise
        _log_retry()
        self.rollback()
        self.info[_RETRYING] = True
        try:
            return super()._execute_internal(statement, *args, **kw)
        finally:
            self.info.pop(_RETRYING, None)

    def flush(self, objects: Any = None) -> None:
        pending = _only_pending(self)
        if self.info.get(_COMMITTING) or not pending:
            # Inside commit() a rollback would end the transaction being committed.
            super().flush(objects)
            return
        try:
            super().flush(objects)
            return
        except DBAPIError as exc:
            if not _retryable(self, exc):
                raise
        _log_retry()
        self.rollback()  # forgets the pending objects: they are added again
        self.add_all(pending)
        super().flush(objects)

    def commit(self) -> None:
        if _only_pending(self):
            # Flushed here, where a dead connection can be retried, rather than
            # inside commit(), where it cannot. On any other failure the
            # transaction is rolled back, as a failed commit() does.
            try:
                self.flush()
            except BaseException:
                self.rollback()
                raise
        self.info[_COMMITTING] = True
        try:
            super().commit()
        finally:
            self.info.pop(_COMMITTING, None)


def _only_pending(session: Session) -> list[Any]:
    """The pending objects, when a flush would be the transaction's first statement
    and would only insert them; else nothing."""
    if not (is_first_statement(session) and session.new) or session.dirty or session.deleted:
        return []
    return list(session.new)


def watch(cls: type[Session]) -> None:
    """Note which connections each transaction of a session of ``cls`` uses."""
    event.listen(cls, "after_begin", _after_begin)
    event.listen(cls, "after_transaction_end", _after_transaction_end)


def transaction_connections(session: Session) -> list[Connection]:
    """The connections the session's current transaction holds (none before its
    first statement)."""
    connections: list[Connection] = session.info.get(_CONNECTIONS, [])
    return connections


def is_first_statement(session: Session) -> bool:
    """Whether nothing has run yet in the session's transaction (or there is none)."""
    return not session.info.get(_CONNECTIONS)


def will_retry(session: Session, exc: DBAPIError) -> bool:
    """Whether :class:`LostConnectionRetry` will run the failed first statement again on
    a new connection (it does once: not when this is already its retry)."""
    return not session.info.get(_RETRYING) and _retryable(session, exc)


def is_autobegun(session: Session) -> bool:
    """Only a transaction SQLAlchemy began by itself can be rolled back and begun again
    here; inside ``with session.begin():`` the caller owns it."""
    transaction = session.get_transaction()
    return transaction is None or transaction.origin is SessionTransactionOrigin.AUTOBEGIN


def _retryable(session: Session, exc: DBAPIError) -> bool:
    if not (exc.connection_invalidated and is_autobegun(session)):
        return False
    try:
        bind = session.get_bind()
    except Exception:  # binds per mapper: no one bind to judge by
        return False
    # Bound to a connection chosen for its replayed position: that one or nothing.
    return isinstance(bind, Engine)


def _log_retry() -> None:
    logger.info(
        "fastapi_rwdb: a pooled connection was found dead by the first statement of a "
        "transaction; running it again on a new connection"
    )


def _after_begin(session: Session, transaction: Any, connection: Connection) -> None:
    if transaction.parent is None:  # savepoints share the transaction's connection
        session.info.setdefault(_CONNECTIONS, []).append(connection)


def _after_transaction_end(session: Session, transaction: Any) -> None:
    if transaction.parent is None:
        session.info.pop(_CONNECTIONS, None)
