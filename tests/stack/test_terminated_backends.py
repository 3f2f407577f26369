"""Server backends ended under the app's feet (``pg_terminate_backend``, as a switchover's
shutdown, an administrator or a pooler does): every request still gets a 2xx or a 503.

A backend ended between two statements of a transaction sends its FATAL error unasked;
PgBouncer passes it on and then closes the client's socket. asyncpg, idle at that
moment, takes the message for one it did not expect and waits for a sync that never
comes: its next command, the COMMIT included, fails before anything is sent, with an
``InternalClientError`` that SQLAlchemy cannot tell from a client bug (the socket is
not closed yet). psycopg, sending a command on its own (SQLAlchemy's first look at a
new connection), gets both errors as answers and says so, without a SQLSTATE. The
package discards such a connection as a lost one (``engine.sqlstates.is_out_of_step``).
Seen first as two 500s in a switchover of tests/stack/test_reliability.py, 1 run in
20; here ending backends over and over brings it within seconds.
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
import traceback
import uuid
from collections import Counter
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import event

from fastapi_rwdb import AsyncWriteSession, Database, RWDBSettings
from fastapi_rwdb.engine.sqlstates import is_connection_failure, is_out_of_step, sqlstate_of

from ..helpers import (
    KEY,
    NODE_PORTS,
    add_named_item_routes,
    client,
    node_dsn,
    primary_url,
    rwdb_app,
    serve,
)
from ..models import Item
from .test_closing import end_backend

pytestmark = pytest.mark.stack

SECONDS = 20  # of backends ended every PERIOD: ~0.5 a second failed before the fix
PERIOD = 0.05


def _fatal_message(code: str, message: str) -> bytes:
    """A server's ErrorResponse, as a backend ended by an administrator sends it."""
    fields = b"".join(
        tag + value.encode() + b"\0"
        for tag, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", code), (b"M", message))
    )
    body = fields + b"\0"
    return b"E" + struct.pack("!i", 4 + len(body)) + body


FATAL = _fatal_message("57P01", "terminating connection due to administrator command")


def _rows_named(name: str) -> int:
    """How many rows of rwdb_items are named ``name``, asked of the primary."""
    with psycopg.connect(primary_url()) as conn:
        row = conn.execute("SELECT count(*) FROM rwdb_items WHERE name = %s", (name,)).fetchone()
    return row[0] if row else 0


async def test_a_fatal_error_between_statements_makes_the_commit_an_outage() -> None:
    """The moment itself, made certain: the FATAL has arrived, the socket is not closed
    yet, the route commits. A 503 at once (not a 500, nor a wait for the socket to
    close), the write did not happen, and the next request works."""
    app = rwdb_app()

    @app.post("/cut/{name}")
    async def cut(name: str, db: AsyncWriteSession) -> dict[str, bool]:
        db.add(Item(name=name))
        await db.flush()  # written: the COMMIT will read the WAL position in its message
        raw = (await (await db.connection()).get_raw_connection()).driver_connection
        raw._protocol.data_received(FATAL)  # as if read from the socket
        # ... and the socket closed a moment later, as PgBouncer closes it
        asyncio.get_running_loop().call_later(2, raw.terminate)
        await db.commit()
        return {"ok": True}

    add_named_item_routes(app)
    name = f"out-of-step-{uuid.uuid4()}"
    async with serve(app), client(app, raise_app_exceptions=False, timeout=5) as c:
        began = time.monotonic()
        answer = await c.post(f"/cut/{name}")
        assert time.monotonic() - began < 1, "the COMMIT waited for the socket to close"
        assert answer.status_code == 503, answer.text
        assert "connection was lost" in answer.text and "retry-after" in answer.headers
        assert (await c.post(f"/async/core/{name}-next")).status_code == 200
    assert _rows_named(name) == 0


async def test_a_connection_lost_in_the_engines_first_look_is_an_outage() -> None:
    """The first connection an engine opens is first looked at by SQLAlchemy (the
    dialect's initialize) through a stand-in without the pooled connection's info; a
    connection lost there is one lost like any other (it was a 500: NotImplementedError):
    the request's first statement goes to a new connection, and runs once."""
    database = Database(RWDBSettings(secret_key=KEY))  # type: ignore[call-arg]
    app = rwdb_app(database)
    add_named_item_routes(app)
    cut: list[object] = []

    @event.listens_for(database.async_engines.write.sync_engine.pool, "connect", insert=True)
    def _cut_the_first(dbapi_connection: Any, record: Any) -> None:
        if not cut:  # before the dialect's first look at it
            cut.append(record)
            dbapi_connection.driver_connection._protocol.data_received(FATAL)

    name = f"first-look-{uuid.uuid4()}"
    try:
        async with client(app, raise_app_exceptions=False) as c:
            answer = await c.post(f"/async/core/{name}")
            assert cut, "the engine's first connection was opened elsewhere"
            assert answer.status_code == 200, answer.text
    finally:
        await database.dispose()
    assert _rows_named(name) == 1


def test_psycopg_says_it_was_answered_twice_when_a_backend_is_ended_behind_pgbouncer() -> None:
    """The wording ``is_out_of_step`` knows psycopg by: a ROLLBACK sent on its own after
    the backend was ended (its FATAL and PgBouncer's error both arrive as answers). An
    older psycopg (3.2.1) raises one of the answers instead, as a lost connection."""
    with psycopg.connect(primary_url()) as conn:
        pid, port = conn.execute("SELECT pg_backend_pid(), inet_server_port()").fetchone() or (0, 0)
        end_backend(pid, port)  # (and PgBouncer's error is in the socket too)
        with pytest.raises(psycopg.Error) as failed:
            conn.rollback()
    if str(failed.value).startswith("received "):
        assert is_out_of_step(failed.value)
    else:  # psycopg 3.2.1: one of the answers raised, a lost connection's
        lost = isinstance(failed.value, psycopg.OperationalError)
        assert lost or is_connection_failure(sqlstate_of(failed.value)), failed.value


def _end_backends(stop: threading.Event, ended: list[int]) -> None:
    """Every PERIOD, end half of the app role's backends on every node, at random."""
    conns: dict[int, psycopg.Connection] = {}
    user = os.environ["POSTGRES_USER"]
    while not stop.is_set():
        for port in NODE_PORTS.values():
            try:
                if port not in conns:
                    superuser = node_dsn(port, user="postgres", password="postgres_pw")
                    conns[port] = psycopg.connect(superuser, autocommit=True)
                row = (
                    conns[port]
                    .execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE usename = %s AND random() < 0.5",
                        (user,),
                    )
                    .fetchone()
                )
                ended.append(row[0] if row else 0)
            except psycopg.Error:
                conns.pop(port, None)
        time.sleep(PERIOD)
    for conn in conns.values():
        conn.close()


async def test_backends_ended_over_and_over_never_make_a_500() -> None:
    """Sync and async clients write a row and read it back while half the app's backends
    on every node are ended every 50 ms: only 200s and 503s (with Retry-After), and every
    acknowledged write is there afterwards."""
    app = rwdb_app()
    add_named_item_routes(app)
    raised: list[str] = []  # what a 500 was: the traceback, for the failure's message

    @app.middleware("http")
    async def _keep_what_raised(request: Any, call_next: Any) -> Any:
        try:
            return await call_next(request)
        except Exception as exc:
            raised.append("".join(traceback.format_exception(exc)[-12:]))
            raise

    answers: Counter[tuple[str, str, int]] = Counter()
    no_retry_after: list[str] = []
    acknowledged: list[str] = []

    async def one_client(c: httpx.AsyncClient, side: str, end: float) -> None:
        prefix = "/async" if side == "async" else ""
        while time.monotonic() < end:
            name = f"ended-{uuid.uuid4()}"
            written = await c.post(f"{prefix}/core/{name}")
            read = await c.get(f"{prefix}/read/{name}") if written.status_code == 200 else None
            for method, answer in (("POST", written), ("GET", read)):
                if answer is None:
                    continue
                answers[(method, side, answer.status_code)] += 1
                if answer.status_code == 503 and "retry-after" not in answer.headers:
                    no_retry_after.append(f"{method} {answer.request.url.path}")
            if written.status_code == 200:
                acknowledged.append(name)

    stop, ended = threading.Event(), []
    ender = threading.Thread(target=_end_backends, args=(stop, ended), daemon=True)
    async with serve(app), client(app, raise_app_exceptions=False, timeout=30) as c:
        ender.start()
        try:
            end = time.monotonic() + SECONDS
            sides = ("sync", "async")
            await asyncio.gather(*(one_client(c, sides[i % 2], end) for i in range(8)))
        finally:
            stop.set()
            ender.join(10)
    print("backends ended:", sum(ended), "answers:", dict(answers))
    failed = {k: n for k, n in answers.items() if k[2] not in (200, 503)}
    assert failed == {}, f"answers other than 200 or 503: {failed}\n" + "\n".join(raised[:2])
    assert no_retry_after == []
    for side in ("sync", "async"):  # both served, and both were hit
        assert answers[("POST", side, 200)] > 0, answers
        assert answers[("POST", side, 503)] + answers[("GET", side, 503)] > 0, answers
    with psycopg.connect(primary_url()) as conn:
        rows = conn.execute("SELECT name FROM rwdb_items WHERE name = ANY(%s)", (acknowledged,))
        found = {name for (name,) in rows}
    assert set(acknowledged) == found, "an acknowledged write is missing"
