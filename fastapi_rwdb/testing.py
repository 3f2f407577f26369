"""A pytest plugin for the application's own tests: see routing, simulate lag, seed safely.

Registered through the ``pytest11`` entry point, so installing the package makes
it available; it does nothing until a test asks for one of its fixtures or
marks:

``rwdb_routes``
    A :class:`RoutingRecorder`: every read session's routing decision (target,
    reason) and every token issued, rejected or cleared, grouped by the request
    that made it, so a test can say "this GET read a replica", "this POST issued
    a token", "this read was pinned".
``rwdb``
    A :class:`RWDBKit`: :meth:`~RWDBKit.stale_replica` makes the read side lag
    behind on any PostgreSQL, even one plain server in CI; :meth:`~RWDBKit.seed`
    writes fixture rows and hands the test client the token for them, as a real
    write through the API would.
``@pytest.mark.rwdb_stale``
    Runs the test inside :meth:`RWDBKit.stale_replica` of the process-wide
    :class:`~fastapi_rwdb.Database` (the one ``setup()`` installed at import).

A stale replica for real: a transaction on the primary exports its snapshot
(``pg_export_snapshot()``) and stays open; the read sessions made inside the
block start ``REPEATABLE READ`` transactions with ``SET TRANSACTION SNAPSHOT``,
so they see the database as it was when the block began while writes go on.
Their connections report the primary's WAL position of that moment as their
replay position (:func:`fastapi_rwdb.engine.checkout.report_position`), so
read-your-writes treats them exactly as a replica that far behind: a client
with a newer token reads from the primary, everyone else reads the old data.
The snapshot lives on the primary, so the block reads through the write URL: it
works with both URLs pointing at one plain PostgreSQL and on a full
HAProxy/PgBouncer/Patroni stack alike.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from sqlalchemy import Engine, event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from .current import get_database
from .database import Database
from .engine.checkout import report_position
from .engine.factory import make_async_engine, make_engine
from .jobs import async_write_unit, write_unit
from .observe import listeners
from .routing.lsn import parse_lsn
from .routing.request import RequestState, request_state

if TYPE_CHECKING:
    import httpx

__all__ = [
    "RWDBKit",
    "ReadDecision",
    "RecordedRequest",
    "RoutingRecorder",
    "StaleReplica",
    "give_token",
]

_SNAPSHOT_ID = re.compile(r"[0-9A-Fa-f-]{1,64}")
#: Reasons that mean the client's token (or a fresh read's position) decided the read.
_PINNED_REASONS = frozenset({"lsn-check", "caught-up", "replica-behind", "pinned"})


# -- the routing recorder -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadDecision:
    """Where one read session went, and why (the reasons of ``X-RWDB-Read``)."""

    target: str  # "replica" or "primary"
    reason: str
    checked_lsn: int | None  # the position the replica had to have replayed, if checked

    @property
    def pinned(self) -> bool:
        """Decided by the client's token (or a fresh read's position), not by default."""
        return self.reason in _PINNED_REASONS


@dataclass(slots=True)
class RecordedRequest:
    """One request's read decisions and token events, in order."""

    method: str
    path: str
    reads: list[ReadDecision] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)

    @property
    def read_targets(self) -> list[str]:
        return [read.target for read in self.reads]

    @property
    def issued_token(self) -> bool:
        return "issued" in self.tokens

    @property
    def cleared_token(self) -> bool:
        return "cleared" in self.tokens

    @property
    def pinned(self) -> bool:
        return any(read.pinned for read in self.reads)


class RoutingRecorder:
    """Collects routing decisions and token events while installed (the fixture's life).

    Events from code outside a request (scripts, jobs, ``get_read_db_context()``)
    are kept apart, in :attr:`outside`.
    """

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.outside = RecordedRequest("", "")
        self._by_state: dict[int, tuple[RequestState, RecordedRequest]] = {}
        self._lock = threading.Lock()

    def _current(self) -> RecordedRequest:
        state = request_state.get()
        scope = state.scope if state is not None else None
        if state is None or not scope:
            return self.outside
        with self._lock:
            found = self._by_state.get(id(state))
            if found is None or found[0] is not state:
                record = RecordedRequest(str(scope.get("method", "")), str(scope.get("path", "")))
                # The state is kept with it, so its id cannot be reused meanwhile.
                self._by_state[id(state)] = (state, record)
                self.requests.append(record)
                return record
            return found[1]

    def on_route(self, target: str, reason: str, checked_lsn: int | None) -> None:
        self._current().reads.append(ReadDecision(target, reason, checked_lsn))

    def on_token(self, event: str) -> None:
        self._current().tokens.append(event)

    def find(self, method: str, path: str) -> list[RecordedRequest]:
        """Every recorded request with this method and path (the path as sent)."""
        return [r for r in self.requests if r.method == method.upper() and r.path == path]

    def last(self, method: str, path: str) -> RecordedRequest:
        """The latest request with this method and path; AssertionError if none was seen."""
        found = self.find(method, path)
        if not found:
            seen = ", ".join(f"{r.method} {r.path}" for r in self.requests) or "none"
            raise AssertionError(
                f"no routing decision or token event recorded for {method.upper()} {path} "
                f"(recorded: {seen}); a request that opens no read session and writes "
                "nothing leaves no record"
            )
        return found[-1]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self._by_state.clear()
            self.outside = RecordedRequest("", "")

    @contextmanager
    def installed(self) -> Iterator[RoutingRecorder]:
        remove = listeners.listen(self.on_route, self.on_token)
        try:
            yield self
        finally:
            remove()


# -- the stale replica ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StaleReplica:
    """What the block's read side reports: the snapshot it reads and its position."""

    snapshot: str
    position: int


@contextmanager
def stale_replica(database: Database | None = None) -> Iterator[StaleReplica]:
    """Read sessions made inside the block see the database as it was when it began.

    Writes go on; a client whose token is newer than the snapshot reads from the
    primary (its reads are routed as if a replica lagged), every other read sees
    the old data. No token is cleared inside the block: the stale side never
    catches up. ``database``: the app's, if it is not the process-wide one.
    """
    db = database or get_database()
    settings = db.settings
    write_url = settings.url("write", "psycopg")
    conninfo = write_url.set(drivername="postgresql").render_as_string(hide_password=False)
    exporter = psycopg.connect(
        conninfo,
        prepare_threshold=None,
        autocommit=True,
        connect_timeout=max(1, round(settings.connect_timeout)),
        application_name=f"{settings.application_name} stale-replica",
    )
    try:
        # The position first, then the snapshot: a commit in between is in the
        # snapshot with a position past the one reported, so it is only ever taken
        # as missing (its writer reads from the primary), never as present when it
        # is not. One less still, for a commit whose WAL record was written before
        # the position was read but which became visible only after the snapshot.
        row = exporter.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        lsn = parse_lsn(row[0] if row else None)
        if lsn is None:
            raise RuntimeError("the write URL reached a server in recovery, not a primary")
        exporter.autocommit = False
        exporter.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        snapshot_row = exporter.execute("SELECT pg_export_snapshot()").fetchone()
        snapshot = str(snapshot_row[0]) if snapshot_row else ""
        if not _SNAPSHOT_ID.fullmatch(snapshot):
            raise RuntimeError(f"unexpected snapshot id {snapshot!r}")
        stale = StaleReplica(snapshot, max(0, lsn - 1))
        # NullPool: every read session opens its own connection, so the block leaves
        # none behind, and none is ever pinged (the position is the reported one).
        engine = make_engine(
            write_url, settings, side="read", poolclass=NullPool, isolation_level="REPEATABLE READ"
        )
        async_engine = make_async_engine(
            settings.url("write", "asyncpg"),
            settings,
            side="read",
            poolclass=NullPool,
            isolation_level="REPEATABLE READ",
        )
        _read_snapshot(engine, stale)
        _read_snapshot(async_engine.sync_engine, stale)
        health = db.health
        expected = health.expected_replicas
        health.expected_replicas = sys.maxsize  # no token is cleared: this side stays behind
        try:
            with db.reading_from(engine, async_engine):
                yield stale
        finally:
            health.expected_replicas = expected
            engine.dispose()
    finally:
        exporter.close()


def _read_snapshot(engine: Engine, stale: StaleReplica) -> None:
    report_position(engine, stale.position)

    @event.listens_for(engine, "begin")
    def _import(conn: Any) -> None:
        # Before SQLAlchemy's own first statement; the driver opens the REPEATABLE READ,
        # READ ONLY transaction and this is its first command, as PostgreSQL requires.
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.execute(f"SET TRANSACTION SNAPSHOT '{stale.snapshot}'")
        finally:
            cursor.close()


# -- seeding -----------------------------------------------------------------------------


def give_token(client: httpx.Client | httpx.AsyncClient, token: str, database: Database) -> None:
    """Hand ``client`` the read-your-writes token as the app would: its cookie (and, when
    the cookie is ``Secure`` but the client speaks plain HTTP, the header)."""
    import httpx

    settings = database.settings
    base = client.base_url
    attrs = f"Max-Age={int(settings.pin_seconds)}; Path=/; HttpOnly; SameSite=Lax"
    if settings.cookie_secure:
        attrs += "; Secure"
    # Through the client's own cookie jar, so the cookie gets the domain the app's own
    # Set-Cookie would get, and the app's later cookies replace it.
    response = httpx.Response(
        200,
        headers=[("set-cookie", f"{settings.cookie_name}={token}; {attrs}")],
        request=httpx.Request("GET", base.join("/")),
    )
    client.cookies.extract_cookies(response)
    if settings.cookie_secure and base.scheme != "https":
        client.headers[settings.token_header] = token


class RWDBKit:
    """The ``rwdb`` fixture: a stale replica, and seeding that keeps read-your-writes."""

    def __init__(self, database: Database | None = None) -> None:
        self._database = database
        #: The token of the last :meth:`seed` that wrote, as a string.
        self.token: str | None = None

    def database(self) -> Database:
        return self._database or get_database()

    def stale_replica(self, database: Database | None = None) -> Any:
        """:func:`stale_replica` (a context manager) on this kit's or the given database."""
        return stale_replica(database or self.database())

    @contextmanager
    def seed(
        self,
        client: httpx.Client | httpx.AsyncClient | None = None,
        *,
        database: Database | None = None,
    ) -> Iterator[Session]:
        """A write session for fixture rows; commits at the end of the block, and
        gives ``client`` the token for that commit, so its reads see the rows even
        from a replica that lags (they go to one that has them, else the primary)."""
        db = database or self.database()
        state = RequestState(database=db)
        reset = request_state.set(state)
        try:
            with write_unit(db) as session:
                yield session
        finally:
            request_state.reset(reset)
        self._hand_over(state, db, client)

    @asynccontextmanager
    async def aseed(
        self,
        client: httpx.Client | httpx.AsyncClient | None = None,
        *,
        database: Database | None = None,
    ) -> AsyncIterator[AsyncSession]:
        """The asyncpg twin of :meth:`seed`."""
        db = database or self.database()
        state = RequestState(database=db)
        reset = request_state.set(state)
        try:
            async with async_write_unit(db) as session:
                yield session
        finally:
            request_state.reset(reset)
        self._hand_over(state, db, client)

    def _hand_over(
        self, state: RequestState, db: Database, client: httpx.Client | httpx.AsyncClient | None
    ) -> None:
        if state.commit_lsn is None or db.settings.pin_mode == "off":
            return  # nothing written: nothing to protect
        self.token = db.token_for(state.commit_lsn)
        if client is not None:
            give_token(client, self.token, db)


# -- the plugin ---------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "rwdb_stale: run the test with fastapi_rwdb's read side frozen at the test's start "
        "(a stale replica, on any PostgreSQL); see fastapi_rwdb.testing",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("rwdb_stale") is not None:
            item.fixturenames.append("rwdb_stale_replica")  # type: ignore[attr-defined]


@pytest.fixture
def rwdb_routes() -> Iterator[RoutingRecorder]:
    """Records every read session's routing decision and every token event, per request."""
    with RoutingRecorder().installed() as recorder:
        yield recorder


@pytest.fixture
def rwdb() -> RWDBKit:
    """Seeding with tokens (``rwdb.seed(client)``), a stale replica (``rwdb.stale_replica()``)."""
    return RWDBKit()


@pytest.fixture
def rwdb_stale_replica() -> Iterator[StaleReplica]:
    """The test runs with the process-wide Database's read side frozen at its start."""
    with stale_replica() as stale:
        yield stale
