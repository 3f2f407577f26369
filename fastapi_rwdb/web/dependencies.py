"""FastAPI dependencies: one session per request, on the side the route asks for.

Each dependency closes its session when the request is done; closing rolls back
whatever was not committed, so an exception in the endpoint never leaves a
half-written transaction behind. Committing is the endpoint's job, as in plain
SQLAlchemy: ``session.commit()``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any, Literal

from fastapi import Depends
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from ..current import get_database
from .thread_slots import Slot, held


def get_write_db(_slot: Slot = None) -> Iterator[Session]:
    """A session on the primary, for routes that change data or must read their own writes."""
    with held(_slot), get_database().write_session() as session:
        yield session


def get_read_db(_slot: Slot = None) -> Iterator[Session]:
    """A read-only session on a replica. Flushes and DML are refused with a clear error."""
    with held(_slot), get_database().read_session() as session:
        yield session


def get_fresh_read_db(_slot: Slot = None) -> Iterator[Session]:
    """A read-only session that sees every write committed anywhere before the request's
    reads: on a replica that has replayed the primary's current position, else the primary.
    Costs one short round trip on the primary at its first read."""
    with held(_slot), get_database().read_session(fresh=True) as session:
        yield session


def get_primary_read_db(_slot: Slot = None) -> Iterator[Session]:
    """A read-only session on the primary: current whatever anyone wrote, and never
    on a write connection (the reads that must see the primary have a pool of their own)."""
    with held(_slot), get_database().read_session(primary=True) as session:
        yield session


def get_db(_slot: Slot = None) -> Iterator[Session]:
    """Same as :func:`get_write_db`, for code written before the split."""
    # ``yield from`` hands the endpoint's exception (and close()) on to the inner
    # generator, so its ``with`` block sees it. (A separate function, not an alias:
    # FastAPI caches a dependency per callable, and a route asking for both must
    # get two sessions, as before.)
    with held(_slot):
        yield from get_write_db()


async def get_async_write_db() -> AsyncIterator[AsyncSession]:
    async with get_database().async_write_session() as session:
        yield session


async def get_async_read_db() -> AsyncIterator[AsyncSession]:
    async with get_database().async_read_session() as session:
        yield session


async def get_async_fresh_read_db() -> AsyncIterator[AsyncSession]:
    async with get_database().async_read_session(fresh=True) as session:
        yield session


async def get_async_primary_read_db() -> AsyncIterator[AsyncSession]:
    async with get_database().async_read_session(primary=True) as session:
        yield session


async def get_async_db() -> AsyncIterator[AsyncSession]:
    """Same as :func:`get_async_write_db`, for code written before the split."""
    # Not ``async for session in get_async_write_db()``: an exception thrown in at
    # the yield would leave that loop without reaching the inner generator, whose
    # session would stay open, its connection checked out, until the event loop
    # finalised the abandoned generator. Async generators have no ``yield from``.
    async with get_database().async_write_session() as session:
        yield session


def read_db(*, timeout: float) -> Callable[..., Iterator[Session]]:
    """:func:`get_read_db` whose replica statements each get ``timeout`` seconds instead
    of ``RWDB_READ_TIMEOUT`` (0: no deadline): ``Depends(read_db(timeout=60))`` on a
    route that runs reports. The same function for the same ``timeout``."""
    if timeout not in _SYNC_BY_TIMEOUT:

        def get_read_db_within(_slot: Slot = None) -> Iterator[Session]:
            with held(_slot), get_database().read_session(timeout=timeout) as session:
                yield session

        _SYNC_BY_TIMEOUT[timeout] = get_read_db_within
        SESSION_DEPENDENCIES[get_read_db_within] = ("read", None)
    return _SYNC_BY_TIMEOUT[timeout]


def async_read_db(*, timeout: float) -> Callable[[], AsyncIterator[AsyncSession]]:
    """The asyncpg twin of :func:`read_db`."""
    if timeout not in _ASYNC_BY_TIMEOUT:

        async def get_async_read_db_within() -> AsyncIterator[AsyncSession]:
            async with get_database().async_read_session(timeout=timeout) as session:
                yield session

        _ASYNC_BY_TIMEOUT[timeout] = get_async_read_db_within
        SESSION_DEPENDENCIES[get_async_read_db_within] = ("read", None)
    return _ASYNC_BY_TIMEOUT[timeout]


#: read_db()'s and async_read_db()'s dependencies, by timeout: FastAPI caches a
#: dependency per callable, so one timeout must give one function.
_SYNC_BY_TIMEOUT: dict[float, Callable[..., Iterator[Session]]] = {}
_ASYNC_BY_TIMEOUT: dict[float, Callable[[], AsyncIterator[AsyncSession]]] = {}


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


#: Every session dependency, by the side it opens and, for reads that are not plain
#: replica reads, their kind: the one list the route audit and the docs go by.
SESSION_DEPENDENCIES: dict[Callable[..., Any], tuple[Literal["read", "write"], str | None]] = {
    get_write_db: ("write", None),
    get_db: ("write", None),
    get_async_write_db: ("write", None),
    get_async_db: ("write", None),
    get_read_db: ("read", None),
    get_async_read_db: ("read", None),
    get_fresh_read_db: ("read", "fresh"),
    get_async_fresh_read_db: ("read", "fresh"),
    get_primary_read_db: ("read", "primary"),
    get_async_primary_read_db: ("read", "primary"),
}
