"""Session classes: read sessions that route and refuse writes, write sessions that
remember what they committed.

The class a dependency yields is the application's choice: SQLModel code calls
``session.exec()``, which a plain SQLAlchemy ``Session`` does not have. With
``RWDB_SESSION_CLASS=auto`` (the default) SQLModel's classes are used when
SQLModel is installed; they subclass SQLAlchemy's, so plain SQLAlchemy code
works with them too. This module derives a read and a write subclass from it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from . import conflicts, metrics, reconnect, tracking
from .binds import BINDS, STATE, WAIT_MS, ReadBinds
from .channel import (
    POSITION_INFO,
    REMEMBERED_INFO,
    REPORTED_POSITION,
    begin_with_position,
    position_needed,
    want_position,
)
from .driver import POSITION_SQL, end_unused_transaction, fetch_outside_transaction
from .errors import DatabaseUnavailableError, ReadOnlySessionError
from .internals import EXECUTE_INTERNAL, await_
from .lsn import MAX_LSN, parse_lsn
from .routing import Route, choose_read_route
from .settings import SessionKind
from .state import RequestState, request_state
from .tokens import Token

#: Session.info keys.
_CHOICE = "rwdb_read_choice"
_OWNED = "rwdb_owned_connections"

_UNKNOWN = object()


def session_classes(kind: SessionKind) -> tuple[type[Session], type[AsyncSession]]:
    """The (sync, async) session classes for ``RWDB_SESSION_CLASS``."""
    if kind == "sqlalchemy":
        return Session, AsyncSession
    try:
        from sqlmodel import Session as SQLModelSession
        from sqlmodel.ext.asyncio.session import AsyncSession as SQLModelAsyncSession
    except ImportError:
        if kind == "sqlmodel":
            raise ImportError(
                "RWDB_SESSION_CLASS=sqlmodel but SQLModel is not installed "
                "(pip install 'fastapi-rwdb[sqlmodel]')"
            ) from None
        return Session, AsyncSession
    return SQLModelSession, SQLModelAsyncSession


_classes: dict[tuple[str, type[Session]], type[Session]] = {}


def read_class(base: type[Session]) -> type[Session]:
    """``base`` made to route each transaction, to refuse flushes and to retry a
    first read that a replica's WAL replay cancelled (:mod:`fastapi_rwdb.conflicts`)."""
    key = ("read", base)
    if key not in _classes:
        retry = (
            (reconnect.LostConnectionRetry, conflicts.ReplayConflictRetry)
            if EXECUTE_INTERNAL
            else ()
        )
        mixins = (*retry, _RoutedReads, base)
        cls = type(f"Read{base.__name__}", mixins, {"__module__": __name__})
        event.listen(cls, "before_flush", _refuse_flush)
        reconnect.watch(cls)
        _classes[key] = cls
    return _classes[key]


def write_class(base: type[Session]) -> type[Session]:
    """``base`` made to record the WAL position of each commit that wrote."""
    key = ("write", base)
    if key not in _classes:
        retry = (reconnect.LostConnectionRetry,) if EXECUTE_INTERNAL else ()
        mixins = (*retry, tracking.TrackedWrites, base)
        cls = type(f"Write{base.__name__}", mixins, {"__module__": __name__})
        tracking.watch_session_class(cls)
        reconnect.watch(cls)
        _classes[key] = cls
    return _classes[key]


class _RoutedReads(Session):
    """Mixed in before the application's session class."""

    def get_bind(self, mapper: Any = None, **kw: Any) -> Engine | Connection:
        binds: ReadBinds | None = self.info.get(BINDS)
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


def _release(session: Session) -> None:
    for conn in session.info.pop(_OWNED, ()):
        conn.close()
    session.info.pop(_CHOICE, None)


def _route(session: Session, binds: ReadBinds) -> Engine | Connection:
    # A job's session carries its own state (get_read_db_context(after=...)), and so
    # does a fresh read (its position is taken from the primary on its first read).
    state: RequestState | None = session.info.get(STATE)
    if state is None:
        state = request_state.get()
    elif state.fresh:
        state = _fresh_state(session, binds, state)
    version = -1 if state is None else state.version
    cached: tuple[int, Engine | Connection] | None = session.info.get(_CHOICE)
    if cached is not None and cached[0] == version:
        return cached[1]

    route = choose_read_route(state, binds.mode, binds.health)
    # Session consistency: note how far the server behind each read has got, so that
    # the client's later reads go nowhere older.
    track = state is not None and binds.consistency == "session" and binds.mode == "lsn"
    bind: Engine | Connection
    position: int | None = None
    reason = route.reason
    if route.target == "primary":
        bind = binds.primary
        if track:
            bind, position, _ = _checkout(session, binds.primary, use=True)
    elif route.min_lsn is None and not track:
        bind = binds.replica
    else:
        bind, reason, position = _replica_at_least(session, binds, route)
    if track and position is not None:
        assert state is not None
        state.note_seen(position)
    target = "primary" if route.target == "primary" or reason in _PRIMARY_REASONS else "replica"
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
    conn, position, _ = _checkout(None, binds.primary, use=False)
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
    session.info[STATE] = state
    return state


_PRIMARY_REASONS = frozenset({"replica-behind", "replica-lag"})
_PASSED = {"lsn-check": "caught-up", "lag-check": "within-lag"}
#: Connections a read may try, one after another, before going to the primary. Each
#: is one more pooled connection (perhaps to another replica) and one round trip;
#: only idle ones are taken, so the check never waits for the pool.
_TRIES = 3


def _replica_at_least(
    session: Session, binds: ReadBinds, route: Route
) -> tuple[Engine | Connection, str, int | None]:
    """A replica connection whose server has replayed ``route.min_lsn``, else the primary.

    The position is read on the connection that will serve the reads: through
    HAProxy a pooled connection stays on one node, while another connection can
    reach another replica. So the session is bound to this very connection. A
    connection found behind is held while the next is taken, so the pool cannot
    hand the same one back. One found behind a moment ago costs no round trip
    and no try: it is passed over on what the last ping said (see channel.py),
    so a paused replica's connections do not use up a read's tries.
    """
    state = session.info.get(STATE) or request_state.get()
    held: list[tuple[Connection, int | None]] = []
    chosen: Connection | None = None
    chosen_position: int | None = None
    try:
        tries = 0
        while tries < _TRIES:
            if held and _idle(binds.replica) == 0:
                break
            try:
                # Only the first try opens the transaction with the ping: a connection
                # found behind must roll that back (a round trip) before it is returned,
                # and when the replicas lag, the first is seldom the last try.
                conn, position, remembered = _checkout(
                    None, binds.replica, use=tries == 0, needed=route.min_lsn
                )
            except DatabaseUnavailableError:
                tries += 1
                continue  # that connection is gone (and discarded): try another
            tries += not remembered
            held.append((conn, position))
            if _far_enough(position, route.min_lsn):
                chosen, chosen_position = conn, position
                break
        wait_ms = session.info.get(WAIT_MS, binds.wait_ms)
        if chosen is None and wait_ms and held:
            # Give the most advanced of them a little time to catch up.
            conn, position = max(held, key=lambda item: item[1] or -1)
            deadline = time.monotonic() + wait_ms / 1000
            while not _far_enough(position, route.min_lsn) and time.monotonic() < deadline:
                if binds.is_async:
                    await_(asyncio.sleep(0.01))
                else:
                    time.sleep(0.01)
                try:
                    position = _position_of(conn)
                except Exception:
                    conn.invalidate()
                    break
            if _far_enough(position, route.min_lsn):
                chosen, chosen_position = conn, position
    finally:
        for conn, _ in held:
            if conn is not chosen:
                conn.close()
    if chosen is None:
        if state is not None:
            state.replica_behind = True
        if binds.consistency == "session" and binds.mode == "lsn" and state is not None:
            conn, position, _ = _checkout(session, binds.primary, use=True)
            return conn, route.if_behind, position
        return binds.primary, route.if_behind, None
    session.info.setdefault(_OWNED, []).append(chosen)
    return chosen, _PASSED.get(route.reason, route.reason), chosen_position


def _far_enough(position: int | None, min_lsn: int | None) -> bool:
    return min_lsn is None or (position is not None and position >= min_lsn)


def _checkout(
    owner: Session | None, engine: Engine, *, use: bool, needed: int | None = None
) -> tuple[Connection, int | None, bool]:
    """A connection and its server's WAL position, read by the checkout ping.

    A value passed through a pool hook, not returned by any call (see
    channel.py): setting ``want_position`` around ``engine.connect()`` asks the
    checkout ping (``_ping`` in ``hooks.instrument``) to read the position
    instead of running its no-op, and the ping leaves it in the connection
    record's info under ``POSITION_INFO``, taken here. A connection opened just
    now is not pinged, so then the position is asked for here. ``use``: the
    session's statements will run on this connection, so on psycopg the ping
    may open their transaction in the same round trip (``begin_with_position``);
    a connection only asked for its position is handed back untouched.
    ``needed``: the position this read needs; a connection found short of it a
    moment ago is not pinged again, and comes back with that remembered
    position and ``True`` (see channel.py).
    """
    reset = want_position.set(True)
    reset_begin = begin_with_position.set(use)
    reset_needed = position_needed.set(needed)
    try:
        conn = engine.connect()
    finally:
        position_needed.reset(reset_needed)
        begin_with_position.reset(reset_begin)
        want_position.reset(reset)
    try:
        info = conn.connection.info
        remembered = info.pop(REMEMBERED_INFO, False)
        position = info.pop(POSITION_INFO, _UNKNOWN)
        if position is _UNKNOWN or REPORTED_POSITION in info:
            position = _position_of(conn)
    except Exception as exc:
        # Asked on the driver's connection, so SQLAlchemy did not see the failure: a
        # connection that cannot answer this serves nobody. Discard it.
        conn.invalidate()
        conn.close()
        raise DatabaseUnavailableError(
            "a database connection was lost while checking its WAL position"
        ) from exc
    except BaseException:
        conn.close()
        raise
    if owner is not None:
        owner.info.setdefault(_OWNED, []).append(conn)
    return conn, position, remembered


def _position_of(conn: Connection) -> int | None:
    # A connection may report a position other than its server's: see REPORTED_POSITION.
    info = conn.connection.info
    if REPORTED_POSITION in info:
        reported: int | None = info[REPORTED_POSITION]
        return reported
    # Asked again while waiting for a replica to catch up: outside any transaction,
    # so that the session's first statement takes a snapshot newer than the answer.
    end_unused_transaction(info, conn.connection.dbapi_connection)
    return parse_lsn(fetch_outside_transaction(conn.connection.driver_connection, POSITION_SQL))


def _idle(engine: Engine) -> int:
    checkedin = getattr(engine.pool, "checkedin", None)
    return int(checkedin()) if callable(checkedin) else 0


def _refuse_flush(session: Session, flush_context: Any, instances: Any) -> None:
    raise ReadOnlySessionError(
        f"a read session cannot write ({len(session.new)} new, {len(session.dirty)} changed, "
        f"{len(session.deleted)} deleted objects pending); nothing was sent to the database. "
        "Use get_write_db / get_async_write_db (or WriteSession / AsyncWriteSession) for "
        "code that changes data."
    )
