"""The session classes: the application's own, made to route reads or to track writes.

The class a dependency yields is the application's choice: SQLModel code calls
``session.exec()``, which a plain SQLAlchemy ``Session`` does not have. With
``RWDB_SESSION_CLASS=auto`` (the default) SQLModel's classes are used when
SQLModel is installed; they subclass SQLAlchemy's, so plain SQLAlchemy code
works with them too. This module derives a read and a write subclass from it,
mixing in, first to last: a close that meets a connection already lost
(:mod:`.closing`), the retry of a first statement that met a dead connection
(:mod:`.reconnect`), for reads the retry of a first read a replica
cancelled (:mod:`.replay`), then the routing (:mod:`.reads`) or the write
tracking (:mod:`.writes`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from ..engine.sqlalchemy_internals import EXECUTE_INTERNAL
from ..errors import ReadOnlySessionError
from ..settings import SessionKind
from . import reconnect, writes
from .closing import ClosesLostConnections
from .reads import RoutedReads, deadline_on_replica
from .replay import ReplayConflictRetry


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
    first read that a replica's WAL replay cancelled or a dead connection failed."""
    key = ("read", base)
    if key not in _classes:
        retry = (reconnect.LostConnectionRetry, ReplayConflictRetry) if EXECUTE_INTERNAL else ()
        mixins = (ClosesLostConnections, *retry, RoutedReads, base)
        cls = type(f"Read{base.__name__}", mixins, {"__module__": __name__})
        event.listen(cls, "before_flush", _refuse_flush)
        event.listen(cls, "after_begin", deadline_on_replica)
        reconnect.watch(cls)
        _classes[key] = cls
    return _classes[key]


def write_class(base: type[Session]) -> type[Session]:
    """``base`` made to record the WAL position of each commit that wrote."""
    key = ("write", base)
    if key not in _classes:
        retry = (reconnect.LostConnectionRetry,) if EXECUTE_INTERNAL else ()
        mixins = (ClosesLostConnections, *retry, writes.TrackedWrites, base)
        cls = type(f"Write{base.__name__}", mixins, {"__module__": __name__})
        writes.watch_session_class(cls)
        reconnect.watch(cls)
        _classes[key] = cls
    return _classes[key]


def _refuse_flush(session: Session, flush_context: Any, instances: Any) -> None:
    raise ReadOnlySessionError(
        f"a read session cannot write ({len(session.new)} new, {len(session.dirty)} changed, "
        f"{len(session.deleted)} deleted objects pending); nothing was sent to the database. "
        "Use get_write_db / get_async_write_db (or WriteSession / AsyncWriteSession) for "
        "code that changes data."
    )
