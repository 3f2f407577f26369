"""Reads on the primary have a pool of their own: no amount of them takes a write's connection.

On the real stack, with the write pool as small as it goes (two connections, no
overflow), more slow primary reads than that run while a write is made.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from fastapi_rwdb import Database, ReadOnlySessionError, RWDBSettings, using

pytestmark = pytest.mark.stack

SLOW_READS = 6
SLEEP = 2.0


def small_write_pool(**overrides: object) -> Database:
    return Database(
        RWDBSettings(pool_size=2, max_overflow=0, pool_timeout=1, **overrides)  # type: ignore[arg-type]
    )


def test_slow_primary_reads_do_not_starve_a_write_sync() -> None:
    db = small_write_pool()
    started = threading.Barrier(SLOW_READS + 1)
    errors: list[BaseException] = []

    def slow_read() -> None:
        try:
            with db.read_session(primary=True) as session:
                session.execute(text("SELECT 1")).scalar_one()
                started.wait(timeout=10)
                session.execute(text("SELECT pg_sleep(:s)"), {"s": SLEEP})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=slow_read) for _ in range(SLOW_READS)]
    try:
        for thread in threads:
            thread.start()
        started.wait(timeout=10)
        stats = db.pool_stats()["sync"]
        assert stats["primary_read"]["checked_out"] == SLOW_READS
        assert stats["write"]["checked_out"] == 0
        labels = {"pair": "sync", "side": "primary_read"}
        with using(db):  # the gauges read the process-wide Database
            assert REGISTRY.get_sample_value("rwdb_pool_checked_out", labels) == SLOW_READS
        began = time.monotonic()
        with db.write_session() as session:
            session.execute(
                text("INSERT INTO rwdb_items (name) VALUES (:n)"), {"n": f"w-{uuid.uuid4()}"}
            )
            session.commit()
        assert time.monotonic() - began < SLEEP, "the write waited for the reads"
    finally:
        for thread in threads:
            thread.join(timeout=30)
        db.dispose_sync()
    assert errors == []


async def test_slow_primary_reads_do_not_starve_a_write_async() -> None:
    db = small_write_pool()
    inside = asyncio.Event()
    count = 0

    async def slow_read() -> None:
        nonlocal count
        async with db.async_read_session(primary=True) as session:
            await session.execute(text("SELECT 1"))
            count += 1
            if count == SLOW_READS:
                inside.set()
            await session.execute(text("SELECT pg_sleep(:s)"), {"s": SLEEP})

    try:
        reads = asyncio.gather(*(slow_read() for _ in range(SLOW_READS)))
        await asyncio.wait_for(inside.wait(), 10)
        stats = db.pool_stats()["async"]
        assert stats["primary_read"]["checked_out"] == SLOW_READS
        began = time.monotonic()
        async with db.async_write_session() as session:
            await session.execute(
                text("INSERT INTO rwdb_items (name) VALUES (:n)"), {"n": f"aw-{uuid.uuid4()}"}
            )
            await session.commit()
        assert time.monotonic() - began < SLEEP, "the write waited for the reads"
        await reads
    finally:
        await db.dispose()


def test_the_primary_read_pool_is_bounded_and_read_only() -> None:
    db = small_write_pool(primary_read_pool_size=1, primary_read_max_overflow=1)
    try:
        with db.read_session(primary=True) as session:
            assert session.execute(text("SELECT pg_is_in_recovery()")).scalar_one() is False
            with pytest.raises(ReadOnlySessionError):
                session.execute(text("INSERT INTO rwdb_items (name) VALUES ('never')"))
        stats = db.pool_stats()["sync"]["primary_read"]
        assert (stats["size"], stats["max_overflow"]) == (1, 1)
        assert db.engines.write.pool.checkedin() == 0  # type: ignore[attr-defined]
    finally:
        db.dispose_sync()
