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
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, Engine, event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.util import await_

from . import metrics, tracking
from .context import request_state
from .engines import REPLAY_LSN_INFO, REPLAY_LSN_SQL, parse_lsn, want_replay_lsn
from .errors import ReadOnlySessionError
from .health import ReadSideHealth
from .routing import PinMode, choose_read_route

SessionKind = Literal["auto", "sqlalchemy", "sqlmodel"]

#: Session.info keys.
BINDS = "rwdb_read_binds"
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


@dataclass(frozen=True, slots=True)
class ReadBinds:
    """Where a read session may go; for async sessions, the async engines' sync sides."""

    replica: Engine
    primary: Engine  # the primary-read engine: its own pool, READ ONLY transactions
    mode: PinMode
    wait_ms: int
    is_async: bool
    health: ReadSideHealth | None = None


_classes: dict[tuple[str, type[Session]], type[Session]] = {}


def read_class(base: type[Session]) -> type[Session]:
    """``base`` made to route each transaction and to refuse flushes."""
    key = ("read", base)
    if key not in _classes:
        cls = type(f"Read{base.__name__}", (_RoutedReads, base), {"__module__": __name__})
        event.listen(cls, "before_flush", _refuse_flush)
        _classes[key] = cls
    return _classes[key]


def write_class(base: type[Session]) -> type[Session]:
    """``base`` made to record the WAL position of each commit that wrote."""
    key = ("write", base)
    if key not in _classes:
        cls = type(
            f"Write{base.__name__}", (tracking.TrackedWrites, base), {"__module__": __name__}
        )
        tracking.watch_session_class(cls)
        _classes[key] = cls
    return _classes[key]


class _RoutedReads(Session):
    """Mixed in before the application's session class."""

    def get_bind(self, mapper: Any = None, **kw: Any) -> Engine | Connection:
        binds: ReadBinds | None = self.info.get(BINDS)
        if binds is None or kw.get("bind") is not None:
            return super().get_bind(mapper, **kw)
        return _route(self, binds)

    def close(self) -> None:
        super().close()
        for conn in self.info.pop(_OWNED, ()):
            conn.close()
        self.info.pop(_CHOICE, None)


def _route(self: Session, binds: ReadBinds) -> Engine | Connection:
    state = request_state.get()
    version = -1 if state is None else state.version
    cached = self.info.get(_CHOICE)
    if cached is not None and cached[0] == version:
        return cached[1]  # type: ignore[no-any-return]

    route = choose_read_route(state, binds.mode, binds.health)
    bind: Engine | Connection = binds.primary if route.target == "primary" else binds.replica
    reason = route.reason
    if route.min_lsn is not None:
        bind, reason = _replica_if_caught_up(self, binds, route.min_lsn)
    target = "primary" if bind is binds.primary else "replica"
    metrics.record_route(target, reason)
    if state is not None:
        state.read_target = target
        state.read_reason = reason
    self.info[_CHOICE] = (version, bind)
    return bind


def _replica_if_caught_up(
    session: Session, binds: ReadBinds, min_lsn: int
) -> tuple[Engine | Connection, str]:
    """Check the replay position on the connection that will serve the reads.

    Through HAProxy a pooled connection stays on one node, so the session is
    bound to this very connection; another one could reach another replica.
    """
    state = request_state.get()
    assert state is not None
    reset = want_replay_lsn.set(True)
    try:
        conn = binds.replica.connect()
    finally:
        want_replay_lsn.reset(reset)
    try:
        deadline = time.monotonic() + binds.wait_ms / 1000
        # The checkout ping has just read the position on this connection (unless
        # the connection is new or RWDB_POOL_PRE_PING is off); later polls ask again.
        replayed: Any = conn.connection.info.pop(REPLAY_LSN_INFO, _UNKNOWN)
        while True:
            if replayed is _UNKNOWN:
                replayed = parse_lsn(conn.exec_driver_sql(REPLAY_LSN_SQL).scalar())
            # NULL: the read port reached a primary (HAProxy's backup), which has it all.
            if replayed is None or replayed >= min_lsn:
                state.replica_caught_up = True
                session.info.setdefault(_OWNED, []).append(conn)
                return conn, "caught-up"
            if time.monotonic() >= deadline:
                break
            if binds.is_async:
                await_(asyncio.sleep(0.01))
            else:
                time.sleep(0.01)
            replayed = _UNKNOWN
    except BaseException:
        conn.close()
        raise
    conn.close()
    state.replica_behind = True
    return binds.primary, "replica-behind"


def _refuse_flush(session: Session, flush_context: Any, instances: Any) -> None:
    raise ReadOnlySessionError(
        f"a read session cannot write ({len(session.new)} new, {len(session.dirty)} changed, "
        f"{len(session.deleted)} deleted objects pending); nothing was sent to the database. "
        "Use get_write_db / get_async_write_db (or WriteSession / AsyncWriteSession) for "
        "code that changes data."
    )
