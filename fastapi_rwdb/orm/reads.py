"""Read sessions: each transaction routed where :mod:`fastapi_rwdb.routing` says.

SQLAlchemy asks a session for its bind when a transaction begins
(``get_bind``); the read session answers with the route's engine, or, when the
route needs a replica that has replayed a position, with the very connection
whose position was checked: through HAProxy a pooled connection stays on one
node, while another connection can reach another replica. The steps (try
another connection, take one, wait, fall back to the primary) come from
:func:`~fastapi_rwdb.routing.rules.next_replica_step`; this module carries them
out and records what they found in the request's state.

A first statement that needs a position does not wait for those steps: the
session takes the read port's engine, and the position is checked in the round
trip of the statement itself (:class:`~fastapi_rwdb.engine.checkout.PositionCheck`),
one round trip less (on psycopg while the read pool is quiet; busier, in the
message of the transaction's ``BEGIN``, which costs less CPU). If
the replica was short of it, the statement's answer is thrown away (asyncpg: the
statement is not run), the transaction rolled back, and the statement routed again
through the steps above.
Only statements that pass through the session's ``execute`` are sent that way
(they can be run again): a transaction begun by ``session.connection()``, or in
``session.begin()``, is routed the careful way.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session

from ..engine.checkout import (
    ConnectionLostError,
    ReplicaBehindError,
    check_with_first,
    connect_at_position,
    position_of,
)
from ..engine.deadline import begin_within, checks_with_first, set_local
from ..engine.sqlalchemy_internals import EXECUTE_INTERNAL, await_
from ..errors import DatabaseUnavailableError, ReplicaBenchedError
from ..observe import metrics
from ..routing.lsn import MAX_LSN
from ..routing.request import RequestState, request_state
from ..routing.rules import (
    Poll,
    Primary,
    Route,
    Seen,
    Take,
    choose_read_route,
    next_replica_step,
    passed_reason,
)
from ..routing.tokens import Token
from .reconnect import is_autobegun, is_first_statement
from .session_info import ReadBinds, binds_of, give_state, own_state, timeout_of, wait_ms_of

#: Session.info keys of this module.
_CHOICE = "rwdb_read_choice"  # (state version, bind) of the last routing
_OWNED = "rwdb_owned_connections"  # connections the routing took for the session
_CHECK = "rwdb_read_check"  # the position each transaction checks with its first statement
_UNRECORDED = "rwdb_read_unrecorded"  # a routing counted once its check has passed
_EXECUTING = "rwdb_read_executing"  # a statement of execute() is on its way: may be sent again
_CAREFUL = "rwdb_read_careful"  # routing a statement again after a failed check

#: Read engines whose server's transactions are not READ COMMITTED (the snapshot would
#: come before the check), or whose connections cannot carry a check (asyncpg's
#: statement cache): never checked with the first statement.
_UNFIT: weakref.WeakSet[Engine] = weakref.WeakSet()

_PAUSE = 0.01  # seconds between two looks at a replica that is catching up


class RoutedReads(Session):
    """Mixed in before the application's session class."""

    if EXECUTE_INTERNAL:

        def _execute_internal(self, statement: Any, *args: Any, **kw: Any) -> Any:
            # Private SQLAlchemy method overridden on purpose (sqlalchemy_internals 1.):
            # the one place a statement can be sent again once its check failed.
            binds = binds_of(self)
            if binds is None or _EXECUTING in self.info or not checks_with_first(binds.is_async):
                return super()._execute_internal(statement, *args, **kw)
            self.info[_EXECUTING] = True
            try:
                return super()._execute_internal(statement, *args, **kw)
            except ReplicaBehindError as behind:
                _route_again(self, behind)
            finally:
                self.info.pop(_EXECUTING, None)
                _record_checked(self)
            self.info[_CAREFUL] = True
            try:
                return super()._execute_internal(statement, *args, **kw)
            finally:
                self.info.pop(_CAREFUL, None)

    def get_bind(self, mapper: Any = None, **kw: Any) -> Engine | Connection:
        binds = binds_of(self)
        if binds is None or kw.get("bind") is not None:
            return super().get_bind(mapper, **kw)
        return _route(self, binds)

    # The connections a routing check took belong to the session: every way a
    # session lets go of its transaction gives them back to the pool.
    def close(self) -> None:
        super().close()
        _release(self)

    def reset(self) -> None:
        super().reset()
        _release(self)

    def invalidate(self) -> None:
        for conn in self.info.get(_OWNED, ()):
            conn.invalidate()
        super().invalidate()
        _release(self)


def deadline_on_replica(session: Session, transaction: Any, connection: Connection) -> None:
    """``after_begin``: a transaction on the read port gets the read deadline (see
    :mod:`fastapi_rwdb.engine.deadline`); the primary's reads are not the read side's."""
    binds = binds_of(session)
    if binds is None or transaction.parent is not None:
        return
    if connection.engine.pool is not binds.replica.pool:
        return
    # A routing that checks with the first statement was made for this transaction's
    # first statement, sent by execute() (_route): its connection carries the check.
    needed: int | None = session.info.get(_CHECK)
    check = None if needed is None else check_with_first(connection, needed)
    begin_within(connection, timeout_of(session, binds), check)


def routed_to_replica(session: Session, binds: ReadBinds) -> bool:
    """Whether the session's current routing chose the read port (its engine, or one
    of its connections), as the last :meth:`RoutedReads.get_bind` answered: asked
    after a failure, so it never routes again."""
    cached: tuple[int, Engine | Connection] | None = session.info.get(_CHOICE)
    if cached is None:
        return False
    bind = cached[1]
    return bind is binds.replica or (
        isinstance(bind, Connection) and bind.engine.pool is binds.replica.pool
    )


def _release(session: Session) -> None:
    for conn in session.info.pop(_OWNED, ()):
        conn.close()
    _forget_routing(session)


def _forget_routing(session: Session) -> None:
    for key in (_CHOICE, _CHECK, _UNRECORDED):
        session.info.pop(key, None)


def _route_again(session: Session, behind: ReplicaBehindError) -> None:
    """A first statement's check failed: roll its transaction back (nothing was read)
    and forget the routing, so that the statement is routed the careful way."""
    if behind.unfit:
        binds = binds_of(session)
        if binds is not None:
            _UNFIT.add(binds.replica)
    session.rollback()
    _forget_routing(session)


def _record_checked(session: Session) -> None:
    """Count a routing whose check went with its first statement, once that is past."""
    unrecorded = session.info.pop(_UNRECORDED, None)
    if unrecorded is not None:
        metrics.record_route(*unrecorded)


def _check_with_first(session: Session, binds: ReadBinds, route: Route) -> bool:
    """Whether this routing may check the replica's position with the first statement:
    a driver that can send it there, a deadline to carry it, a statement of execute()
    that can be sent again in an autobegun transaction, and a READ COMMITTED server.
    (How the check goes depends on how busy the pool is: engine.deadline.begin_within.)"""
    return (
        route.min_lsn is not None
        and bool(session.info.get(_EXECUTING))  # (only set where the driver can: checks_with_first)
        and not session.info.get(_CAREFUL)
        and timeout_of(session, binds) > 0
        and is_autobegun(session)
        and binds.replica not in _UNFIT
    )


def _own(session: Session, conn: Connection) -> Connection:
    session.info.setdefault(_OWNED, []).append(conn)
    return conn


def _route(session: Session, binds: ReadBinds) -> Engine | Connection:
    # A job's session carries its own state (get_read_db_context(after=...)), and so
    # does a fresh read (its position is taken from the primary on its first read).
    state = own_state(session)
    if state is None:
        state = request_state.get()
    elif state.fresh:
        state = _fresh_state(session, binds, state)
    version = -1 if state is None else state.version
    cached: tuple[int, Engine | Connection] | None = session.info.get(_CHOICE)
    # A routing that checks with the first statement holds for that transaction: the
    # next one is routed again (perhaps not by execute(), or with the pool busy).
    fresh = _CHECK in session.info and is_first_statement(session)
    if cached is not None and cached[0] == version and not fresh:
        return cached[1]

    route = choose_read_route(state, binds.mode, binds.health)
    # Session consistency: note how far the server behind each read has got, so that
    # the client's later reads go nowhere older.
    follow = state is not None and binds.follows_reads
    bind: Engine | Connection
    position: int | None = None
    target, reason = route.target, route.reason
    session.info.pop(_CHECK, None)
    if route.target == "replica" and not follow and _check_with_first(session, binds, route):
        bind, reason = binds.replica, passed_reason(route)
        session.info[_CHECK] = route.min_lsn
        session.info[_UNRECORDED] = (target, reason, route.min_lsn)
    elif route.target == "primary":
        bind = binds.primary
        if follow:
            conn, position, _ = connect_at_position(binds.primary, begin=True)
            bind = _own(session, conn)
    elif route.min_lsn is None and not follow:
        bind = binds.replica
    else:
        found = _replica_at(session, binds, route)
        if isinstance(found, Primary):
            target, reason = "primary", found.reason
            if state is not None and found.reason == route.if_behind:
                state.replica_behind = True
            bind = binds.primary
            if follow:
                conn, position, _ = connect_at_position(binds.primary, begin=True)
                bind = _own(session, conn)
        else:
            bind, reason, position = found
    if follow and position is not None:
        assert state is not None
        state.note_seen(position)
    if _UNRECORDED not in session.info:
        metrics.record_route(target, reason, route.min_lsn)
    if state is not None:
        state.read_target = target
        state.read_reason = reason
    session.info[_CHOICE] = (version, bind)
    return bind


def _fresh_state(session: Session, binds: ReadBinds, marker: RequestState) -> RequestState:
    """A fresh read's routing state: the primary's current WAL position, as a token.

    Taken on the first read, not when the session is made, so that a session never
    used costs nothing; either way it is after the request began, so every write
    committed anywhere before that is included. One round trip on the primary-read
    pool, outside any transaction (the checkout ping reads the position). The
    request's own state is folded in, so the request's commits and the client's
    token still count.
    """
    conn, position, _ = connect_at_position(binds.primary)
    conn.close()
    request = request_state.get()
    # A primary that reports no position: only the primary is sure to be current.
    lsn = MAX_LSN if position is None else position
    if request is not None and request.needed_lsn is not None:
        lsn = max(lsn, request.needed_lsn)
    state = RequestState(
        token=Token(lsn=lsn, expires=0),
        commit_lsn=request.commit_lsn if request is not None else None,
        replica_behind=position is None,
        database=marker.database,
    )
    give_state(session.info, state)
    return state


def _replica_at(
    session: Session, binds: ReadBinds, route: Route
) -> tuple[Connection, str, int | None] | Primary:
    """Carries out :func:`~fastapi_rwdb.routing.rules.next_replica_step` until it takes a
    replica connection (returned, owned by the session, with the reason and position)
    or says the primary (that step returned, with its reason)."""
    seen: list[Seen] = []
    held: list[Connection | None] = []  # by index of seen; None once lost
    wait = wait_ms_of(session, binds) / 1000
    timeout = timeout_of(session, binds)
    then = set_local(timeout).encode() if timeout > 0 else b""
    waited: float | None = None
    started = 0.0
    chosen: Connection | None = None
    try:
        while True:
            idle = _idle(binds.replica) if seen else 0  # only asked once one is held
            step = next_replica_step(route, seen, idle=idle, wait=wait, waited=waited)
            if isinstance(step, Take):
                chosen = held[step.index]
                assert chosen is not None
                return _own(session, chosen), step.reason, seen[step.index].position
            if isinstance(step, Primary):
                return step
            if isinstance(step, Poll):
                if waited is None:
                    started = time.monotonic()
                _pause(binds.is_async)
                conn = held[step.index]
                assert conn is not None
                try:
                    seen[step.index] = Seen(position_of(conn, timeout or None))
                except Exception:
                    conn.invalidate()
                    held[step.index] = None
                    seen[step.index] = Seen(lost=True)
                waited = time.monotonic() - started
                continue
            try:
                conn, position, remembered = connect_at_position(
                    binds.replica,
                    begin=step.begin,
                    needed=route.min_lsn,
                    then=then,
                    timeout=timeout or None,
                )
            except ConnectionLostError:
                seen.append(Seen(lost=True))  # that connection is gone (and discarded)
                held.append(None)
                continue
            except ReplicaBenchedError:
                seen.append(Seen(lost=True, unreachable=True, benched=True))
                held.append(None)
                continue
            except DatabaseUnavailableError:
                seen.append(Seen(lost=True, unreachable=True))  # none could be opened
                held.append(None)
                continue
            seen.append(Seen(position, remembered=remembered))
            held.append(conn)
    finally:
        for conn in held:
            if conn is not None and conn is not chosen:
                conn.close()


def _pause(is_async: bool) -> None:
    if is_async:
        await_(asyncio.sleep(_PAUSE))
    else:
        time.sleep(_PAUSE)


def _idle(engine: Engine) -> int:
    checkedin = getattr(engine.pool, "checkedin", None)
    return int(checkedin()) if callable(checkedin) else 0
