"""Session classes and the guard that keeps read sessions from writing.

The class a dependency yields is the application's choice: SQLModel code calls
``session.exec()``, which a plain SQLAlchemy ``Session`` does not have. With
``RWDB_SESSION_CLASS=auto`` (the default) SQLModel's classes are used when
SQLModel is installed; they subclass SQLAlchemy's, so plain SQLAlchemy code
works with them too.
"""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from .errors import ReadOnlySessionError

SessionKind = Literal["auto", "sqlalchemy", "sqlmodel"]


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


_read_only_classes: dict[type[Session], type[Session]] = {}


def read_only_class(base: type[Session]) -> type[Session]:
    """A subclass of ``base`` whose flushes are refused before any SQL is sent."""
    if base in _read_only_classes:
        return _read_only_classes[base]
    cls = type(f"ReadOnly{base.__name__}", (base,), {"__module__": __name__})
    event.listen(cls, "before_flush", _refuse_flush)
    return _read_only_classes.setdefault(base, cls)


def _refuse_flush(session: Session, flush_context: Any, instances: Any) -> None:
    raise ReadOnlySessionError(
        f"a read session cannot write ({len(session.new)} new, {len(session.dirty)} changed, "
        f"{len(session.deleted)} deleted objects pending); nothing was sent to the database. "
        "Use get_write_db / get_async_write_db (or WriteSession / AsyncWriteSession) for "
        "code that changes data."
    )
