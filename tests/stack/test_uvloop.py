"""The asyncpg paths on uvloop, the event loop ``uvicorn[standard]`` serves with.

The package reaches past asyncpg's public API in a few places, each fenced in
``engine/asyncpg_connection.py`` and ``engine/watchdog.py`` and checked elsewhere on
asyncio's own loop: a read's ``BEGIN`` written on the transport with its first
statement, a tracked write's position read by a ``COPY`` in its ``COMMIT``'s message
(whose reading the package leaves unpaused where the transport takes it: uvloop's
does not, so asyncpg pauses as usual there), and one deadline timer per event loop,
kept in a dict with weak keys and set with ``call_at(..., context=...)``. Here the
same on uvloop: a client's own write read back through replicas a second behind,
and a read on a frozen replica abandoned at its deadline.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest
import uvloop
from sqlalchemy import text

from benchmarks.common import call
from fastapi_rwdb import Database, RWDBSettings
from fastapi_rwdb.engine import asyncpg_connection

from ..helpers import add_named_item_routes, replica_nodes, replicas_lagging, rwdb_app
from .faults import frozen_bouncer
from .test_grey_failures import DEADLINE, replica_database
from .test_keepalives import DEFAULT_READ, asyncpg_options

pytestmark = pytest.mark.stack

T = TypeVar("T")


def on_uvloop(main: Callable[[], Awaitable[T]]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert type(runner.get_loop()).__module__.startswith("uvloop")
        return runner.run(main())  # type: ignore[arg-type]


@pytest.fixture
def lagging() -> Iterator[None]:
    with replicas_lagging():
        yield


def test_a_clients_own_write_is_read_back_on_uvloop(
    lagging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The probes run once a process: asked again here, on uvloop.
    monkeypatch.setattr(asyncpg_connection, "_commit_with_copy", None)
    monkeypatch.setattr(asyncpg_connection, "_begin_ahead", None)

    async def main() -> list[bytes]:
        app = rwdb_app()
        add_named_item_routes(app)
        bodies = []
        async with app.router.lifespan_context(app):
            for path in ("/async/core", "/async/orm"):
                name = f"uvloop-{uuid.uuid4().hex[:8]}"
                written = await call(app, "POST", f"{path}/{name}")
                assert written.status == 200, written.body
                token = written.header(b"x-rwdb-pin")
                assert token, "no token: the COMMIT's position was not read"
                mine = await call(app, "GET", f"/async/read/{name}", [(b"x-rwdb-pin", token)])
                assert mine.status == 200, mine.body
                anyone = await call(app, "GET", f"/async/read/{name}")
                bodies += [mine.body, anyone.body]
        return bodies

    bodies = on_uvloop(main)
    assert asyncpg_connection._commit_with_copy is True  # the position rides with COMMIT
    assert asyncpg_connection._begin_ahead is True  # a read's BEGIN with its statement
    # With its token the client sees each of its writes; without, the replicas (a
    # second behind) do not have them yet: the reads did go to the replicas.
    assert bodies[0::2] == [b'{"count":1}'] * 2
    assert bodies[1::2] == [b'{"count":0}'] * 2


def test_a_read_on_a_frozen_replica_is_abandoned_at_its_deadline_on_uvloop() -> None:
    node = replica_nodes()[0]

    async def on_primary(database: Database, timeout: float | None = None) -> bool:
        async with database.async_read_session(timeout=timeout) as session:
            result = await session.execute(text("SELECT pg_is_in_recovery()"))
            return result.scalar_one() is False

    async def main() -> tuple[bool, bool, float, bool]:
        database = replica_database(node)
        try:
            warm = await on_primary(database)  # a pooled connection on the replica
            with frozen_bouncer(node, at_most=15):
                started = time.monotonic()
                moved = await on_primary(database, DEADLINE)
                took = time.monotonic() - started
            after = await on_primary(database)
        finally:
            await database.dispose()
        return warm, moved, took, after

    warm, moved, took, after = on_uvloop(main)
    assert not warm
    assert moved, "the abandoned read did not go to the primary"
    assert DEADLINE * 0.9 < took < DEADLINE + 1.0, f"the read took {took:.2f} s"
    assert not after  # the path is back: on the replica again


def test_asyncpg_sockets_get_their_keepalives_on_uvloop() -> None:
    # uvloop's transport hands out a socket of its own kind (engine/sockets.py sets the
    # options on what get_extra_info("socket") returns).
    async def main() -> dict[str, int]:
        database = Database(RWDBSettings())
        try:
            return await asyncpg_options(database.async_engines.read)
        finally:
            await database.dispose()

    assert on_uvloop(main) == DEFAULT_READ
