"""One replica watch per Database at a time, whatever lifespans overlap."""

from __future__ import annotations

import asyncio
import threading

from fastapi_rwdb import Database, RWDBSettings
from fastapi_rwdb.wiring import _start_lag_watch


def database() -> Database:
    settings = RWDBSettings(secret_key="k" * 32, password="x")  # type: ignore[call-arg]
    return Database(settings)


async def test_a_second_lifespan_starts_no_second_watch_until_the_first_ends() -> None:
    db = database()
    first = _start_lag_watch(db)
    assert first is not None
    assert _start_lag_watch(db) is None  # the first still runs
    assert _start_lag_watch(database()) is not None  # another Database has its own
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    again = _start_lag_watch(db)
    assert again is not None
    again.cancel()
    await asyncio.gather(again, return_exceptions=True)


def test_a_lifespan_on_another_event_loop_starts_no_second_watch() -> None:
    db = database()
    started: list[asyncio.Task[None] | None] = []
    stop = threading.Event()

    async def lifespan_in_a_thread() -> None:
        started.append(_start_lag_watch(db))
        await asyncio.to_thread(stop.wait, 10)
        task = started[0]
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    other = threading.Thread(target=asyncio.run, args=(lifespan_in_a_thread(),))
    other.start()
    try:
        while not started:
            threading.Event().wait(0.01)
        assert started[0] is not None

        async def second() -> asyncio.Task[None] | None:
            return _start_lag_watch(db)

        assert asyncio.run(second()) is None
    finally:
        stop.set()
        other.join(10)
