"""The stale replica: the read side frozen at a moment, on any PostgreSQL.

A transaction on the primary exports its snapshot (``pg_export_snapshot()``)
and stays open; read sessions made inside the block start ``REPEATABLE READ``
transactions with ``SET TRANSACTION SNAPSHOT``, so they see the database as it
was when the block began while writes go on. Their connections report the
primary's WAL position of that moment as their replay position
(:func:`fastapi_rwdb.engine.checkout.report_position`), so read-your-writes
treats them exactly as a replica that far behind: a client with a newer token
reads from the primary, everyone else reads the old data. The snapshot lives on
the primary, so the block reads through the write URL: it works with both URLs
pointing at one plain PostgreSQL and on a full HAProxy/PgBouncer/Patroni stack.

The snapshot's engines stand in for the cluster's read side process-wide
(:mod:`fastapi_rwdb.stand_ins`), so the block holds whatever happens inside it:
an app's lifespan ending (its ``dispose()``), an app set up anew
(``configure()``), ``using()``, engines rebuilt on first use.

With a :class:`StaleReadLog`, every statement read from the snapshot is run a
second time on the primary as it is now, and a different answer is logged with
the request that read it: that read showed its client older data than the
primary had (the ``--rwdb-stale`` report).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy import Engine, event
from sqlalchemy.pool import NullPool

from .. import stand_ins
from ..current import get_database
from ..database import Database
from ..engine.checkout import report_position
from ..engine.factory import make_async_engine, make_engine
from ..routing.lsn import parse_lsn
from ..routing.request import request_state
from ..settings import Driver
from ..stand_ins import StaleReplicaError

_SNAPSHOT_ID = re.compile(r"[0-9A-Fa-f-]{1,64}")
_READS = re.compile(r"\s*(SELECT|WITH|VALUES|TABLE)\b", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class StaleReplica:
    """What the block's read side reports: the snapshot it reads and its position."""

    snapshot: str
    position: int


@dataclass(frozen=True, slots=True)
class StaleRead:
    """A read that answered differently than the primary did at the same moment."""

    route: str  # "GET /users/{user_id}", or "(outside a request)"
    test: str  # the test that was running
    statement: str  # its first line


@dataclass
class StaleReadLog:
    """Stale reads, logged while :func:`stale_replica` runs with ``log=`` this."""

    reads: list[StaleRead] = field(default_factory=list)
    test: str = ""  # set by the plugin as each test starts
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, statement: str) -> None:
        state = request_state.get()
        scope = state.scope if state is not None else None
        if scope:
            path = getattr(scope.get("route"), "path", None) or scope.get("path", "?")
            route = f"{scope.get('method', '')} {path}".strip()
        else:
            route = "(outside a request)"
        first = statement.strip().splitlines()[0][:120] if statement.strip() else ""
        with self._lock:
            self.reads.append(StaleRead(route, self.test, first))

    def by_route(self) -> dict[str, list[StaleRead]]:
        found: dict[str, list[StaleRead]] = {}
        for read in self.reads:
            found.setdefault(read.route, []).append(read)
        return found


@contextmanager
def stale_replica(
    database: Database | None = None,
    *,
    log: StaleReadLog | None = None,
    everywhere: bool = False,
) -> Iterator[StaleReplica]:
    """Read sessions made inside the block see the database as it was when it began.

    Writes go on; a client whose token is newer than the snapshot reads from the
    primary (its reads are routed as if a replica lagged), every other read sees
    the old data. No token is cleared inside the block: the stale side never
    catches up. ``database``: the app's, if it is not the process-wide one; every
    Database of the same cluster (same write URL) reads from the snapshot too.
    ``log``: compare each snapshot read with the primary's answer (see above).
    ``everywhere``: while the block is in force, a Database of any other cluster raises
    :class:`~fastapi_rwdb.stand_ins.StaleReplicaError` instead of reading real data
    (``--rwdb-stale`` promises a stale read side to the whole run).
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
        options: dict[str, Any] = {
            "side": "read",
            "poolclass": NullPool,
            "isolation_level": "REPEATABLE READ",
        }
        engine = make_engine(write_url, settings, **options)
        async_engine = make_async_engine(settings.url("write", "asyncpg"), settings, **options)
        now: list[Engine] = []
        sides: tuple[tuple[Engine, Driver], ...] = (
            (engine, "psycopg"),
            (async_engine.sync_engine, "asyncpg"),
        )
        for sync_side, driver in sides:
            _read_snapshot(sync_side, stale)
            if log is not None:
                # The primary as it is now: a connection per comparison (NullPool), as
                # an asyncpg connection belongs to the event loop that opened it.
                now_options = {**options, "isolation_level": "AUTOCOMMIT"}
                url = settings.url("write", driver)
                sync_primary = (
                    make_engine(url, settings, **now_options)
                    if driver == "psycopg"
                    else make_async_engine(url, settings, **now_options).sync_engine
                )
                now.append(sync_primary)
                _compare_with(sync_side, sync_primary, log)
        stand_in = stand_ins.StandIn(engine, async_engine, everywhere)
        try:
            with stand_ins.standing_in(settings.endpoint("write"), stand_in):
                yield stale
        finally:
            engine.dispose()
            async_engine.sync_engine.dispose(close=False)
            for primary in now:
                primary.dispose(close=False)
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
        except Exception as exc:
            raise StaleReplicaError(
                "the stale replica's snapshot could not be imported: the connection that "
                "holds it open on the primary is gone (server restarted, or closed by an "
                "idle timeout), or the read reached another server. Reads cannot be "
                f"stale any more, so they fail. The server said: {exc}"
            ) from exc
        finally:
            cursor.close()


def _compare_with(snapshot: Engine, primary: Engine, log: StaleReadLog) -> None:
    """Before each read statement on ``snapshot``, its answer there and on ``primary``."""

    @event.listens_for(snapshot, "before_cursor_execute")
    def _compare(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if not _READS.match(statement):
            return
        then = _rows(conn.connection.dbapi_connection, statement, parameters)
        with primary.connect() as current:
            now = _rows(current.connection.dbapi_connection, statement, parameters)
        if then != now:
            log.add(statement)


def _rows(dbapi_connection: Any, statement: str, parameters: Any) -> list[tuple[Any, ...]]:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(statement, parameters)
        return [tuple(row) for row in cursor.fetchall()] if cursor.description else []
    finally:
        cursor.close()
