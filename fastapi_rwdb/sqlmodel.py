"""The ``Annotated`` aliases again, typed with SQLModel's session classes.

With SQLModel installed the dependencies already yield SQLModel sessions (see
``RWDB_SESSION_CLASS``); these aliases only tell the type checker so, so that
``db.exec(select(...))`` type-checks::

    from fastapi_rwdb.sqlmodel import ReadSession, WriteSession
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from sqlmodel import Session
from sqlmodel.ext.asyncio.session import AsyncSession

from .web.dependencies import (
    get_async_db,
    get_async_fresh_read_db,
    get_async_primary_read_db,
    get_async_read_db,
    get_async_write_db,
    get_db,
    get_fresh_read_db,
    get_primary_read_db,
    get_read_db,
    get_write_db,
)

__all__ = [
    "AsyncDBSession",
    "AsyncFreshReadSession",
    "AsyncPrimaryReadSession",
    "AsyncReadSession",
    "AsyncWriteSession",
    "DBSession",
    "FreshReadSession",
    "PrimaryReadSession",
    "ReadSession",
    "WriteSession",
]

WriteSession = Annotated[Session, Depends(get_write_db)]
ReadSession = Annotated[Session, Depends(get_read_db)]
DBSession = Annotated[Session, Depends(get_db)]
AsyncWriteSession = Annotated[AsyncSession, Depends(get_async_write_db)]
AsyncReadSession = Annotated[AsyncSession, Depends(get_async_read_db)]
AsyncDBSession = Annotated[AsyncSession, Depends(get_async_db)]
FreshReadSession = Annotated[Session, Depends(get_fresh_read_db)]
PrimaryReadSession = Annotated[Session, Depends(get_primary_read_db)]
AsyncFreshReadSession = Annotated[AsyncSession, Depends(get_async_fresh_read_db)]
AsyncPrimaryReadSession = Annotated[AsyncSession, Depends(get_async_primary_read_db)]
