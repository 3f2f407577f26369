"""The read deadline: a read-side statement answered in time, or abandoned.

A replica path can freeze without closing anything (a stopped PgBouncer, a host
stalled on I/O): the kernel still takes the bytes, nothing answers, and a read
would wait for as long as the freeze lasts. Each statement of a read-side
transaction given a deadline (:func:`begin_within`) is watched: with no answer
in time, its socket is shut down under the driver (psycopg) or the connection
terminated (asyncpg), so the driver's wait ends at once with a lost connection,
which SQLAlchemy discards (that connection only: the pool's others may reach
another replica). No cancel request is sent: a frozen PgBouncer would never
process it. The statement's error becomes
:class:`~fastapi_rwdb.errors.ReplicaTimeoutError`; the read session
(:mod:`fastapi_rwdb.orm.replay`) runs a first statement again on the primary.
The ``ROLLBACK`` that ends the transaction is watched too, and one given up is
left as the lost connection it is, which a session's close takes quietly
(:mod:`fastapi_rwdb.orm.closing`).

Frozen or only busy? The same transaction carries a server-side
``statement_timeout`` a little shorter than the deadline (:func:`server_timeout_ms`),
sent in the message that opens it (no round trip of its own): a server that is
working answers SQLSTATE 57014 before the client gives up, and that read fails
where it is, never moved to the primary; only a server that does not answer at
all reaches the client's deadline.

What ends a wait at its deadline is :mod:`.watchdog`'s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError

from ..errors import DatabaseUnavailableError, ReplicaTimeoutError, WriteOutcomeUnknownError
from . import servers
from .asyncpg_connection import PackageConnection, begin_ahead, is_ours
from .checkout import PositionCheck, ReplicaBehindError
from .sqlalchemy_internals import around_driver_calls
from .watchdog import WATCHDOG, AsyncWatch
from .wire import PIPELINED_BEGIN, NoAnswerError, begin_with, begin_with_first, first_row

# Connection info keys, private to this module (cleared when the connection goes back).
_DEADLINE = "rwdb_deadline"  # seconds each statement of this transaction may take
_ARMED = "rwdb_deadline_armed"  # the watch over the statement running now
_WITH_FIRST = "rwdb_deadline_with_first"  # psycopg: (SET LOCAL, check) sent with the first
_BEGINS = "rwdb_deadline_begins"  # the statement running now carries its transaction's BEGIN


def server_timeout_ms(deadline: float) -> int:
    """The server's ``statement_timeout`` for a client deadline of ``deadline`` seconds:
    short enough that a busy server's 57014 reaches the client before the deadline
    (a fifth of it, at most a second, is left for the answer's way back)."""
    return max(1, round((deadline - min(1.0, deadline * 0.2)) * 1000))


def set_local(deadline: float) -> str:
    """The statement that gives one transaction its server-side timeout."""
    return f"SET LOCAL statement_timeout = {server_timeout_ms(deadline)}"


#: A read's ``BEGIN`` rides with its first statement only while at most this many
#: connections of its pool are in use. psycopg's pipeline saves a round trip and
#: costs CPU (its machinery, more reads of the socket): in a quiet process the round
#: trip is the request's latency, in a busy one CPU is its throughput (measured in
#: benchmarks/notes.md, "The pipelined BEGIN under load").
PIPELINE_WHILE_IN_USE = 2


#: A read's position check rides in that pipeline only while this many of its pool's
#: connections are in use, its own included: the check's pipeline costs more CPU than
#: a plain read's (benchmarks/notes.md, "The position checked with the first
#: statement"). Busier, the check goes in the message of the ``BEGIN`` instead, one
#: round trip before the statement, as a read without a token's ``BEGIN`` then does.
CHECK_IN_PIPELINE_WHILE_IN_USE = 1


def quiet(engine: Engine, at_most: int = PIPELINE_WHILE_IN_USE) -> bool:
    """Whether ``engine``'s pool is quiet enough for a ``BEGIN`` to ride with the first
    statement: at most ``at_most`` of its connections in use."""
    checked_out = getattr(engine.pool, "checkedout", None)
    return checked_out is None or checked_out() <= at_most


def begin_within(
    connection: Connection, deadline: float, check: PositionCheck | None = None
) -> None:
    """Every statement of ``connection``'s transaction, which has just begun and run
    nothing yet, gets ``deadline`` seconds, and the server a statement timeout a little
    shorter. On psycopg the ``BEGIN`` and the timeout go with the first statement, in
    one round trip (:func:`~fastapi_rwdb.engine.wire.begin_with_first`, when the
    statement is handed to the driver) while the pool is quiet (:data:`PIPELINE_WHILE_IN_USE`),
    or, busy or without pipeline mode, are sent here
    (psycopg then sends no ``BEGIN``); on asyncpg they go in the message of its
    ``BEGIN``. If the checkout ping already opened the transaction it sent the
    timeout too
    (:func:`fastapi_rwdb.engine.checkout.connect_at_position`).

    ``check``: a read's position, checked before the first statement runs (see
    :class:`~fastapi_rwdb.engine.checkout.PositionCheck`): on asyncpg kept with the
    ``BEGIN``, on psycopg in the first statement's pipeline while the pool is quiet
    (:data:`CHECK_IN_PIPELINE_WHILE_IN_USE`), else asked here in the ``BEGIN``'s
    message, where a replica short of it raises
    :class:`~fastapi_rwdb.engine.checkout.ReplicaBehindError` at once."""
    raw = connection.connection.driver_connection
    if check is not None and (deadline <= 0 or not _carries_check(raw)):
        # Nothing would carry the check: not checked, not served. An engine whose
        # connections never can (asyncpg's statement cache on) is not asked again.
        raise ReplicaBehindError(unfit=is_ours(raw) and raw.caches_statements())
    if deadline <= 0:
        return
    connection.info[_DEADLINE] = deadline
    if check is not None:
        if is_ours(raw):
            raw.begin_with_check(f"{set_local(deadline)}; {check.failing_query()}")
            connection.info[_WITH_FIRST] = (b"", check)
        elif quiet(connection.engine, CHECK_IN_PIPELINE_WHILE_IN_USE):
            connection.info[_WITH_FIRST] = (check.query(server_timeout_ms(deadline)), check)
        else:
            assert isinstance(raw, psycopg.Connection)  # (checks_with_first: one or the other)
            asked = _begin(connection, raw, check.query(server_timeout_ms(deadline)), deadline)
            check.confirm(first_row(asked, 2))
        return
    if is_ours(raw):
        if not raw.is_in_transaction():  # else the ping's BEGIN carried it
            raw.rwdb_pending = set_local(deadline)
    elif isinstance(raw, psycopg.Connection):
        if raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            return
        if PIPELINED_BEGIN and not raw.autocommit and quiet(connection.engine):
            connection.info[_WITH_FIRST] = (set_local(deadline).encode(), None)
            return
        _begin(connection, raw, set_local(deadline).encode(), deadline)


def _begin(
    connection: Connection, raw: psycopg.Connection[Any], then: bytes, deadline: float
) -> Any:
    """Open ``connection``'s transaction with ``then`` in the message of its ``BEGIN``
    (:func:`~fastapi_rwdb.engine.wire.begin_with`); ``then``'s result."""
    try:
        return begin_with(raw, then, deadline)
    except NoAnswerError as exc:
        servers.timed_out(connection.info)
        connection.invalidate(exc)
        raise _timed_out(deadline) from exc
    except psycopg.Error as exc:
        # Sent below SQLAlchemy, so it did not see the failure: say it as it would
        # have (a lost connection, discarded), for the first statement's retry.
        connection.invalidate(exc)
        raise DBAPIError.instance(
            "BEGIN", None, exc, psycopg.Error, connection_invalidated=True
        ) from exc


def checks_with_first(is_async: bool) -> bool:
    """Whether a read's position can be checked with its first statement on this
    driver: psycopg's pipeline, or asyncpg's ``BEGIN`` kept for the statement."""
    return begin_ahead() if is_async else PIPELINED_BEGIN


def _carries_check(raw: Any) -> bool:
    if isinstance(raw, psycopg.Connection):
        return True
    return (
        is_ours(raw)
        and not raw.is_closed()  # (a terminated one has no protocol to ask: see below)
        and not raw.is_in_transaction()
        and raw.can_keep_begin()
    )


class ConnectBudget:
    """Every attempt of one connect shares its side's deadline: a connect is part of the
    read or write it serves. An attempt gets what is left but the time of one more short
    attempt: a frozen path (HAProxy's round robin sends the next attempt elsewhere)
    leaves room for a retry, and a connect that is only slow (many opened at once: a
    hundred take seconds through PgBouncer's SCRAM) still has most of the deadline.
    None is shorter than the driver can bound (psycopg counts whole seconds and waits at
    least 2). An asyncpg connection is opened as the package's own class
    (:mod:`.asyncpg_connection`)."""

    def __init__(self, cparams: dict[str, Any], deadline: float, *, is_async: bool, side: str):
        if is_async:
            cparams.setdefault("connection_class", PackageConnection)
        self._key = "timeout" if is_async else "connect_timeout"
        self._configured = cparams.get(self._key)
        self._shortest = 1.0 if is_async else 2.0
        self._ends = time.monotonic() + deadline if deadline > 0 else None
        self._first = True

    def next_attempt(self, cparams: dict[str, Any], *, after: float = 0.0) -> bool:
        """Bound the next attempt, to start ``after`` seconds from now, in ``cparams``;
        False when it would not fit before the deadline."""
        if self._ends is None:
            return True
        left = self._ends - time.monotonic() - after
        if left < self._shortest and not self._first:
            return False
        retry = self._shortest * 1.25  # one more short attempt, after its pause
        share = max(self._shortest, left - retry if left >= self._shortest + retry else left)
        if self._configured is not None:
            share = min(float(self._configured), share)
        if self._key == "timeout":
            cparams[self._key] = share
        else:
            cparams[self._key] = max(2, math.floor(share + 0.05))  # not 2 for 2.9999
        self._first = False
        return True


def watch(engine: Engine, *, is_async: bool, side: str, every: float = 0.0) -> None:
    """Watch the statements of ``engine``'s transactions given a deadline; ``every``: the
    deadline of every statement and COMMIT (the write side's ``RWDB_WRITE_TIMEOUT``).

    Armed and disarmed around the driver's call by the engine's own dialect
    (:func:`~fastapi_rwdb.engine.sqlalchemy_internals.around_driver_calls`), not by
    engine events, which would put every statement of the engine on SQLAlchemy's
    event-dispatch path, deadline or not. A COMMIT abandoned at its deadline is the
    write whose outcome nobody knows."""
    timed_out = _timed_out if side == "read" else _write_timed_out

    def watched(pooled: Any, *, ending: bool) -> tuple[dict[str, Any], Any] | None:
        """Watch ``pooled``'s next driver call if its transaction has a deadline (or the
        side has one): its info and driver connection; ``None`` when nothing is armed."""
        info = _info_of(pooled)
        if info is None:
            return None
        left = info.pop(_ARMED, None)  # a failed call's watch nobody collected
        if left is not None:
            left.disarm()
        deadline = info.get(_DEADLINE) or every
        if not deadline:
            return None
        raw: Any = pooled.driver_connection
        if is_async:
            try:
                info[_ARMED] = AsyncWatch(raw, deadline, ending=ending)
            except RuntimeError:  # no event loop: a connection collected, not closed
                return None
        elif isinstance(raw, psycopg.Connection) and not raw.closed:
            info[_ARMED] = WATCHDOG.arm(raw.pgconn.socket, deadline, ending=ending)
        else:
            return None  # closed: the driver says so itself
        return info, raw

    def arm(pooled: Any) -> bool | Callable[[Callable[[], None]], None]:
        armed = watched(pooled, ending=False)
        if armed is None:
            return False
        info, raw = armed
        with_first = info.pop(_WITH_FIRST, None)
        if with_first is None:
            return True
        info[_BEGINS] = True
        then, check = with_first
        if is_async:
            assert check is not None  # (asyncpg: the check rides in the kept BEGIN)
            return lambda first: _judged(check, first, lambda: disarm(pooled))
        if check is None:
            return lambda first: begin_with_first(raw, then, first)  # watched as the statement

        def checked(first: Callable[[], None]) -> None:
            try:
                check.run(raw, lambda asked: begin_with_first(raw, then, first, asked))
            except ReplicaBehindError:
                disarm(pooled)  # answered: the statement is run again elsewhere
                raise

        return checked

    def arm_rollback(pooled: Any) -> bool:
        # A transaction's end gets its deadline too: a ROLLBACK on a path that froze
        # after the last statement would otherwise hold the connection (and, for a sync
        # route, a worker thread) for as long as the freeze lasts. None when the driver
        # will send nothing (no transaction open: a write's, after its COMMIT).
        if _nothing_to_end(pooled.driver_connection):
            return False
        return watched(pooled, ending=True) is not None

    def disarm(pooled: Any) -> bool:
        pooled.info.pop(_BEGINS, None)
        armed = pooled.info.pop(_ARMED, None)  # (armed: pooled has info)
        # True: it fired as the answer came: the socket is shut; nothing may use it again.
        return armed is not None and armed.disarm()

    around_driver_calls(engine, arm, disarm, commits=bool(every), arm_rollback=arm_rollback)

    # A DialectEvents listener: it leaves the engine's statements on the fast path.
    @event.listens_for(engine, "handle_error")
    def _abandoned(ctx: ExceptionContext) -> BaseException | None:
        info = None if ctx.connection is None else _info_of(ctx.connection.connection)
        if info is None:
            return None
        begins = info.pop(_BEGINS, False)
        armed = info.pop(_ARMED, None)
        if armed is None or not armed.disarm():
            if begins and ctx.is_disconnect:
                # Lost as its BEGIN went: this connection only, as a BEGIN sent on its
                # own (begin_within) is; the first statement runs again elsewhere.
                ctx.invalidate_pool_on_disconnect = False
            return None
        servers.timed_out(info)  # its replica is passed over for a while
        ctx.is_disconnect = True  # discard this connection...
        ctx.invalidate_pool_on_disconnect = False  # ... and only this one
        if armed.ending:
            # A ROLLBACK: the transaction ends with the connection; nothing was lost,
            # and the session's close says so (orm.closing) rather than fail.
            return None
        error = timed_out(info.get(_DEADLINE) or every)
        error.__cause__ = ctx.original_exception
        return error

    @event.listens_for(engine, "checkin")
    def _forget(dbapi_connection: Any, record: Any) -> None:
        record.info.pop(_DEADLINE, None)
        if record.info.pop(_WITH_FIRST, None) is not None:  # a transaction that ran nothing
            raw = getattr(dbapi_connection, "driver_connection", None)
            if is_ours(raw):
                raw.forget_begin()
        armed = record.info.pop(_ARMED, None)
        if armed is not None:
            armed.disarm()


def _info_of(pooled: Any) -> dict[str, Any] | None:
    """The pooled connection's info; ``None`` for the one the dialect looks at when the
    engine's first connection opens (SQLAlchemy's ad hoc proxy has no info: nothing is
    watched there, and an error there must still reach the caller as the driver's)."""
    try:
        info: dict[str, Any] = pooled.info
    except NotImplementedError:
        return None
    return info


def _nothing_to_end(raw: Any) -> bool:
    """Whether a rollback of ``raw`` sends nothing: psycopg's when no transaction is open,
    asyncpg's (the package's connection) when none reached the server."""
    if isinstance(raw, psycopg.Connection):
        return bool(raw.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE)
    # Not closed: a terminated connection (the deadline's, or SQLAlchemy's after a lost
    # one) has no protocol left, and asking would raise AttributeError instead of
    # letting the rollback raise the driver's own error.
    return is_ours(raw) and not raw.is_closed() and not raw.is_in_transaction()


def _judged(check: PositionCheck, first: Callable[[], None], disarm: Callable[[], bool]) -> None:
    """asyncpg: run the first statement, its position check kept with its ``BEGIN``, and
    take the check's failure for what it is (:meth:`PositionCheck.judge`)."""
    try:
        first()
    except Exception as exc:
        try:
            check.judge(exc)
        except ReplicaBehindError:
            disarm()  # answered: the statement is run again elsewhere
            raise
        raise
    check.judge(None)


def _write_timed_out(deadline: float) -> DatabaseUnavailableError:
    return WriteOutcomeUnknownError(
        f"the primary did not answer within RWDB_WRITE_TIMEOUT ({deadline:g} s): the "
        "write may or may not have happened; it was not run again"
    )


def _timed_out(deadline: float) -> DatabaseUnavailableError:
    return ReplicaTimeoutError(
        f"a replica did not answer a read within its deadline ({deadline:g} s; "
        "RWDB_READ_TIMEOUT or the route's timeout=): its path looks frozen"
    )
