"""Sessions for code that runs outside a request: workers, scripts, tests.

A ``with`` block is one unit of work. The write scope commits when the block
ends normally and rolls back when it raises; the read scope never commits.
Reads that must see the very latest data (right after a write in another
process, or in a test that just inserted rows) ask for ``primary=True``: they
stay read-only but run on the primary.

A job that acts on a request's write (a ``BackgroundTasks`` function, a Celery,
arq or RQ task) gets :func:`current_token` from that request as a plain string
argument and opens its reads with ``after=token``: a replica serves them once it
has replayed that write, so the job never acts on data older than the request
that started it, and the primary is used only when no replica has it in time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from .current import get_database
from .database import Database
from .orm.session_info import mark_own_unit
from .routing.request import request_state


@contextmanager
def get_write_db_context() -> Iterator[Session]:
    """Primary session; commits on success, rolls back on error, always closes."""
    with write_unit(get_database()) as session:
        yield session


@contextmanager
def write_unit(database: Database) -> Iterator[Session]:
    """:func:`get_write_db_context` on a given :class:`Database`: one unit of work
    of its own, whose commit is never taken for a late one of a request's."""
    with database.write_session() as session:
        mark_own_unit(session.info)
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        session.commit()


@contextmanager
def get_read_db_context(
    *,
    primary: bool = False,
    after: str | None = None,
    wait: float = 1.0,
    timeout: float | None = None,
) -> Iterator[Session]:
    """Read-only session on a replica (``primary=True``: on the primary); always closes.

    ``after``: a token from :func:`current_token`; the session reads only where
    its write has been replayed, waiting up to ``wait`` seconds for a replica.
    ``timeout``: each replica statement's deadline in seconds, instead of
    ``RWDB_READ_TIMEOUT`` (a job's long report: more; 0: none).
    """
    database = get_database()
    with database.read_session(primary=primary, after=after, wait=wait, timeout=timeout) as s:
        yield s


@contextmanager
def get_fresh_read_db_context(
    *, wait: float | None = None, timeout: float | None = None
) -> Iterator[Session]:
    """Read-only session that sees every write committed anywhere before its first read.

    It takes the primary's current WAL position (one short round trip on the
    primary-read pool) and reads from a replica that has replayed it, waiting up
    to ``wait`` seconds (``RWDB_PIN_WAIT_MS`` by default) for one, else from the
    primary. For reports after a batch job, admin screens, tests.
    """
    with get_database().read_session(fresh=True, wait=wait, timeout=timeout) as session:
        yield session


@asynccontextmanager
async def get_async_fresh_read_db_context(
    *, wait: float | None = None, timeout: float | None = None
) -> AsyncIterator[AsyncSession]:
    database = get_database()
    async with database.async_read_session(fresh=True, wait=wait, timeout=timeout) as session:
        yield session


@asynccontextmanager
async def get_async_write_db_context() -> AsyncIterator[AsyncSession]:
    async with async_write_unit(get_database()) as session:
        yield session


@asynccontextmanager
async def async_write_unit(database: Database) -> AsyncIterator[AsyncSession]:
    """The asyncpg twin of :func:`write_unit`."""
    async with database.async_write_session() as session:
        mark_own_unit(session.info)
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        await session.commit()


@asynccontextmanager
async def get_async_read_db_context(
    *,
    primary: bool = False,
    after: str | None = None,
    wait: float = 1.0,
    timeout: float | None = None,
) -> AsyncIterator[AsyncSession]:
    database = get_database()
    async with database.async_read_session(
        primary=primary, after=after, wait=wait, timeout=timeout
    ) as session:
        yield session


def current_token() -> str | None:
    """The read-your-writes token of the current request, as a string for a job.

    The position this request committed, or else the client's own token (in
    session consistency, also what its reads have seen). ``None`` outside a
    request, when there is nothing to protect, or when pinning is not by WAL
    position (``RWDB_PIN_MODE`` window or off). Call it after the commit.
    """
    state = request_state.get()
    if state is None or state.database is None:
        return None
    database = get_database()  # the serving app's
    settings = database.settings
    if settings.pin_mode != "lsn":
        return None
    lsns = [state.commit_lsn, state.token.lsn if state.token else None, state.seen_lsn]
    known = [lsn for lsn in lsns if lsn is not None]
    if not known:
        return None
    return database.token_for(max(known))
