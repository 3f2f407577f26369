"""The pool keeps connections opened under load (no churn) and closes them once idle.

Against the real stack: a connection opened is TCP and SCRAM through HAProxy and
PgBouncer, which is what the pool must not repeat for every request.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.ext.asyncio import AsyncEngine

from fastapi_rwdb import RWDBSettings
from fastapi_rwdb.engine.factory import make_async_engine, make_engine

pytestmark = pytest.mark.stack

CORE, EXTRA = 2, 3


def settings(idle: float = 60.0) -> RWDBSettings:
    return RWDBSettings(pool_size=CORE, max_overflow=EXTRA, pool_idle_seconds=idle)


def count_connects(engine: Engine) -> list[int]:
    opened = [0]

    @event.listens_for(engine.pool, "connect")
    def _opened(dbapi_connection: Any, record: Any) -> None:
        opened[0] += 1

    return opened


def burst(engine: Engine, n: int) -> None:
    """``n`` connections checked out at once (as ``n`` requests in flight), then returned."""
    conns = [engine.connect() for _ in range(n)]
    for conn in conns:
        conn.exec_driver_sql("SELECT 1").scalar()
    for conn in conns:
        conn.close()


def test_overflow_connections_are_kept_between_bursts() -> None:
    engine = make_engine(settings().url("write", "psycopg"), settings())
    try:
        opened = count_connects(engine)
        burst(engine, CORE + EXTRA)
        assert opened[0] == CORE + EXTRA
        for _ in range(5):
            burst(engine, CORE + EXTRA)
        # SQLAlchemy's QueuePool closes the 3 overflow connections on every return
        # and opens them again: 15 more connections here.
        assert opened[0] == CORE + EXTRA
        assert engine.pool.checkedin() == CORE + EXTRA
        assert engine.pool.size() == CORE
        assert engine.pool.overflow() == EXTRA  # type: ignore[attr-defined]
    finally:
        engine.dispose()


def test_idle_overflow_connections_are_closed() -> None:
    engine = make_engine(settings(idle=0.2).url("write", "psycopg"), settings(idle=0.2))
    try:
        burst(engine, CORE + EXTRA)
        assert engine.pool.checkedin() == CORE + EXTRA
        time.sleep(0.5)  # two idle windows: the peak is forgotten
        for _ in range(CORE + EXTRA):  # light use returns the excess, one per return
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1").scalar()
        assert engine.pool.checkedin() == CORE
        assert engine.pool.overflow() <= 0  # type: ignore[attr-defined]
    finally:
        engine.dispose()


def test_dispose_keeps_the_pool_class_and_its_limits() -> None:
    engine = make_engine(settings().url("write", "psycopg"), settings())
    before = type(engine.pool)
    engine.dispose()
    assert type(engine.pool) is before
    assert engine.pool.size() == CORE
    opened = count_connects(engine)
    burst(engine, CORE + EXTRA)
    burst(engine, CORE + EXTRA)
    assert opened[0] == CORE + EXTRA
    engine.dispose()


async def test_async_overflow_connections_are_kept_between_bursts() -> None:
    engine: AsyncEngine = make_async_engine(settings().url("write", "asyncpg"), settings())
    try:
        opened = count_connects(engine.sync_engine)

        async def one(hold: asyncio.Event) -> None:
            async with engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
                await hold.wait()

        for _ in range(4):
            hold = asyncio.Event()
            tasks = [asyncio.create_task(one(hold)) for _ in range(CORE + EXTRA)]
            while engine.sync_engine.pool.checkedout() < CORE + EXTRA:
                await asyncio.sleep(0.01)
            hold.set()
            await asyncio.gather(*tasks)
        assert opened[0] == CORE + EXTRA
    finally:
        await engine.dispose()
