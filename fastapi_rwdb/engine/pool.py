"""The connection pool: SQLAlchemy's queue pool, minus the churn under load; and its report.

SQLAlchemy's ``QueuePool`` keeps ``pool_size`` connections and closes every
connection beyond them the moment it is returned. Under a steady load of more
requests in flight than ``pool_size`` that is a connection closed and another
opened for nearly every request: TCP, then SCRAM through HAProxy and PgBouncer,
several round trips and far more server CPU than the query itself.

This pool keeps the connections it opened under load for as long as the load
may come back, as HikariCP does with its ``idleTimeout``: a connection above
``pool_size`` is closed on its return only once the pool has not needed that
many connections at a time for ``idle_timeout`` seconds. The limit stays
``pool_size + max_overflow``, so the budget against PgBouncer's
``max_client_conn`` is unchanged (docs/configuration.md, "Sizing the pools").

Connections are handed out in turn (FIFO, as SQLAlchemy's pool does), not most
recently used first: through HAProxy each pooled read connection stays on one
replica, and taking them in turn keeps spreading a light load over the
replicas.

How many connections the pool "needs" is the peak number checked out at once,
remembered over two windows of ``idle_timeout`` seconds (the current one and the
last), so a peak is remembered for at least ``idle_timeout`` seconds and at most
twice that. Everything is decided on checkout and return: nothing runs in the
background, no timer thread, nothing private of the queue is touched.

A read pool also passes over connections whose replica is benched
(:mod:`fastapi_rwdb.routing.bench`): taken from the queue, such a connection is
closed and the next one taken, with no round trip; so is a record left without a
connection while a replica is benched (:func:`fastapi_rwdb.engine.servers.passed_over`).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Literal

from sqlalchemy import Engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry, QueuePool

from ..settings import RWDBSettings
from . import servers
from .wire import abandon


class _IdleClosing(QueuePool):
    """Mixed in before SQLAlchemy's queue pool (sync or asyncio)."""

    def __init__(
        self,
        creator: Any,
        pool_size: int = 5,
        max_overflow: int = 10,
        idle_timeout: float = 60.0,
        **kw: Any,
    ) -> None:
        self._core = pool_size
        self._extra = max_overflow
        self._idle_timeout = idle_timeout
        # The queue may hold every connection the pool may open, so that a
        # returned overflow connection is kept rather than closed.
        super().__init__(creator, pool_size=pool_size + max_overflow, max_overflow=0, **kw)
        self._peak_lock = threading.Lock()
        self._window_start = time.monotonic()
        self._peak_now = 0  # most connections checked out at once in this window
        self._peak_before = 0  # and in the window before it

    # -- how many connections the load needed lately

    def _roll(self, now: float) -> None:
        elapsed = now - self._window_start
        if elapsed >= self._idle_timeout:
            # A whole window without a peak forgets the older one too.
            self._peak_before = self._peak_now if elapsed < 2 * self._idle_timeout else 0
            self._peak_now = 0
            self._window_start = now

    def _needed(self) -> int:
        with self._peak_lock:
            self._roll(time.monotonic())
            return max(self._core, self._peak_now, self._peak_before)

    def _do_get(self) -> ConnectionPoolEntry:
        record = super()._do_get()
        # A connection whose replica is benched (or an empty record while one is) is
        # dropped and the next idle one taken (a dictionary lookup each); with none
        # idle, the checkout replaces it by a new connection, which the connect passes
        # over benched replicas for (engine.events).
        while servers.passed_over(record) and self.checkedin():
            abandon(record.dbapi_connection)  # a frozen server never answers a goodbye
            record.invalidate()
            record.close()
            self._dec_overflow()
            record = super()._do_get()
        out = self.checkedout()
        if out > self._peak_now:  # (else nothing to note: no lock taken)
            with self._peak_lock:
                self._roll(time.monotonic())
                self._peak_now = max(self._peak_now, out)
        return record

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        # checkedout() still counts this connection; the connections open
        # are those checked out and those idle in the queue.
        open_now = self.checkedout() + self.checkedin()
        if open_now > self._needed():
            try:
                record.close()
            finally:
                self._dec_overflow()
            return
        super()._do_return_conn(record)

    # -- what the pool reports: the configured pool_size and overflow above it

    def size(self) -> int:
        return self._core

    def overflow(self) -> int:
        return self._overflow + self._extra

    def recreate(self) -> QueuePool:
        self.logger.info("Pool recreating")
        return type(self)(
            self._creator,
            pool_size=self._core,
            max_overflow=self._extra,
            idle_timeout=self._idle_timeout,
            pre_ping=self._pre_ping,
            timeout=self._timeout,
            recycle=self._recycle,
            echo=self.echo,
            logging_name=self._orig_logging_name,
            reset_on_return=self._reset_on_return,
            _dispatch=self.dispatch,
            dialect=self._dialect,
        )


class IdleClosingQueuePool(_IdleClosing, QueuePool):
    """For psycopg engines."""


class AsyncIdleClosingQueuePool(_IdleClosing, AsyncAdaptedQueuePool):
    """For asyncpg engines."""


_SIDES: tuple[Literal["write", "read", "primary_read"], ...] = ("write", "read", "primary_read")
#: One driver's engines (write, read, primary-read); None where not built yet.
Engines = tuple[Engine | None, Engine | None, Engine | None]


def pools_report(settings: RWDBSettings, *, sync: Engines, aio: Engines) -> dict[str, Any]:
    """Every pool of one :class:`~fastapi_rwdb.Database`, by driver (``sync``,
    ``async``) and side: ``write``, ``read`` (the replicas) and ``primary_read``
    (reads that must see the primary). An engine never used is reported with
    ``"built": false``, its configured size and no connections."""
    report: dict[str, Any] = {}
    for pair, engines in (("sync", sync), ("async", aio)):
        sides: dict[str, Any] = {}
        for side, engine in zip(_SIDES, engines, strict=True):
            endpoint = settings.endpoint("read" if side == "read" else "write")
            size, overflow = settings.pool_limits(side)
            sides[side] = pool_report(engine, size, overflow, endpoint)
        report[pair] = sides
    return report


def pool_report(
    engine: Engine | None, size: int, max_overflow: int, endpoint: str
) -> dict[str, Any]:
    """One pool's size and use, read from memory: for ``/debug/pool-stats`` and the
    Prometheus gauges. ``engine`` None: not built yet, reported with its configured
    size and no connections. Nothing here connects."""
    entry: dict[str, Any] = {
        "built": engine is not None,
        "endpoint": endpoint,
        "size": size,
        "max_overflow": max_overflow,
        "checked_in": 0,
        "checked_out": 0,
        "overflow": 0,
        "open": 0,
        "usage": 0.0,
    }
    pool = engine.pool if engine is not None else None
    if isinstance(pool, QueuePool):
        size, out = pool.size(), pool.checkedout()
        entry.update(
            size=size,
            checked_in=pool.checkedin(),
            checked_out=out,
            # Negative while the pool has fewer connections than its size.
            overflow=max(0, pool.overflow()),
            open=size + pool.overflow(),
            usage=round(out / (size + max_overflow), 3),
        )
    return entry
