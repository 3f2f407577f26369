"""Sessions for code that runs outside a request: workers, scripts, tests.

A ``with`` block is one unit of work. The write scope commits when the block
ends normally and rolls back when it raises; the read scope never commits.
Reads that must see the very latest data (right after a write in another
process, or in a test that just inserted rows) ask for ``primary=True``: they
stay read-only but run on the primary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from .database import get_database


@contextmanager
def get_write_db_context() -> Iterator[Session]:
    """Primary session; commits on success, rolls back on error, always closes."""
    with get_database().write_session() as session:
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        session.commit()


@contextmanager
def get_read_db_context(*, primary: bool = False) -> Iterator[Session]:
    """Read-only session on a replica (``primary=True``: on the primary); always closes."""
    with get_database().read_session(primary=primary) as session:
        yield session


@asynccontextmanager
async def get_async_write_db_context() -> AsyncIterator[AsyncSession]:
    async with get_database().async_write_session() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        await session.commit()


@asynccontextmanager
async def get_async_read_db_context(*, primary: bool = False) -> AsyncIterator[AsyncSession]:
    async with get_database().async_read_session(primary=primary) as session:
        yield session
