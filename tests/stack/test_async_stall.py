"""Issue 20, item 7: the async read route that nearly stopped during a freeze.

What it was: HAProxy hands new connections to the replicas in turn, so an app whose
pool opened its connections at the same moments as another app's could hold all
of them on one replica. When that replica's PgBouncer froze, each client's next
read took a connection on the frozen path and waited for the whole freeze (no
deadline then): with every pooled connection there, the route stopped (30
requests started in 18 s), while the other app, all on the healthy replica, went
on. The sync route meets the same fate whenever its connections sit there: the
hand-written pattern's sync row in docs/reliability.md's grey table (4 requests in
18 s).

Here that case is made certain rather than left to HAProxy's turn: every read
connection on the frozen node's own PgBouncer, six clients on an async route (and
on a sync one, the same case). The
deadline abandons the reads on the frozen path, the bench passes the replica over,
and the route keeps answering from the primary.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi import FastAPI
from sqlalchemy import text

import fastapi_rwdb
from benchmarks.common import call
from fastapi_rwdb import Database, RWDBSettings

from ..helpers import replica_nodes
from .faults import bouncer_url, frozen_bouncer

pytestmark = pytest.mark.stack

CLIENTS = 6
FREEZE = 8.0
# psycopg bounds a connect in whole seconds, 2 at least (engine/deadline.py
# ConnectBudget): a sync read that opens a connection on the frozen path after the
# bench takes that long, so the deadline here is no shorter.
DEADLINE = 2.0


def stall_app(node: str) -> FastAPI:
    settings = RWDBSettings(
        read_url=bouncer_url(node),
        read_timeout=DEADLINE,
    )
    app = FastAPI()
    fastapi_rwdb.setup(app, Database(settings))

    @app.get("/async")
    async def async_where(session: fastapi_rwdb.AsyncReadSession) -> dict[str, bool]:
        result = await session.execute(text("SELECT pg_is_in_recovery()"))
        return {"replica": bool(result.scalar_one())}

    @app.get("/sync")
    def sync_where(session: fastapi_rwdb.ReadSession) -> dict[str, bool]:
        return {"replica": bool(session.execute(text("SELECT pg_is_in_recovery()")).scalar_one())}

    return app


@pytest.mark.parametrize("route", ["/async", "/sync"])
async def test_a_route_whose_every_connection_is_on_a_frozen_replica_keeps_answering(
    route: str,
) -> None:
    node = replica_nodes()[0]
    app = stall_app(node)
    async with app.router.lifespan_context(app):
        answers: list[tuple[float, float, int, bytes]] = []  # started, took, status, body

        async def client(until: float) -> None:
            while time.monotonic() < until:
                started = time.monotonic()
                response = await call(app, "GET", route)
                took = time.monotonic() - started
                answers.append((started, took, response.status, response.body))

        # Warm: the clients together, so the pool holds a connection for each, all on
        # the node (nothing else is reachable through its PgBouncer).
        await asyncio.gather(*(client(time.monotonic() + 1.0) for _ in range(CLIENTS)))
        assert answers and all(body == b'{"replica":true}' for *_, body in answers)
        answers.clear()
        with frozen_bouncer(node, at_most=FREEZE + 10):
            frozen_at = time.monotonic()
            await asyncio.gather(*(client(frozen_at + FREEZE) for _ in range(CLIENTS)))
    failed = [(round(took, 2), status, body) for _, took, status, body in answers if status != 200]
    assert not failed, f"failed while frozen: {failed[:5]}"
    longest = max(took for _, took, *_ in answers)
    late = [a for a in answers if a[0] > frozen_at + DEADLINE + 1.0]
    # Without the deadline (RWDB_READ_TIMEOUT=0): every client on a frozen connection
    # for the whole freeze: 0 requests started after the deadline plus 1 s.
    assert len(late) >= CLIENTS * 10, f"{len(late)} requests started after the deadline plus 1 s"
    assert all(body == b'{"replica":false}' for *_, body in late), "a late read met the replica"
    slow = [
        (round(at - frozen_at, 2), round(took, 2)) for at, took, *_ in answers if took > DEADLINE
    ]
    assert longest < DEADLINE + 1.0, f"a read took {longest:.2f} s; (started, took): {slow}"
