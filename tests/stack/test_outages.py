"""Outages the app must survive with a clear answer: refused ports, busy pools,
a read side that is down or lagging, a write side that turned read-only."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import AbstractAsyncContextManager

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError

import fastapi_rwdb
from fastapi_rwdb import (
    AsyncFreshReadSession,
    AsyncReadSession,
    AsyncWriteSession,
    Database,
    DatabaseUnavailableError,
    FreshReadSession,
    ReadSession,
    RWDBSettings,
    WriteSession,
)
from fastapi_rwdb.web.unavailable import unavailable_reason

from ..helpers import served_client, stack

pytestmark = pytest.mark.stack

PASSWORD = os.environ["POSTGRES_PASSWORD"]
CLOSED_PORT = 1  # nothing listens there: connections are refused at once
FAST_RETRY = {"connect_retries": 1, "connect_retry_backoff": 0.01}


def make_app(**overrides: object) -> FastAPI:
    settings = RWDBSettings(routing_header=True, **{**FAST_RETRY, **overrides})  # type: ignore[arg-type]
    app = FastAPI()
    fastapi_rwdb.setup(app, Database(settings))

    @app.get("/read")
    def read(db: ReadSession) -> dict[str, bool]:
        return {"replica": db.execute(text("SELECT pg_is_in_recovery()")).scalar_one()}

    @app.get("/async/read")
    async def read_async(db: AsyncReadSession) -> dict[str, bool]:
        return {"replica": (await db.execute(text("SELECT pg_is_in_recovery()"))).scalar_one()}

    @app.get("/fresh")
    def fresh(db: FreshReadSession) -> dict[str, bool]:
        return {"replica": db.execute(text("SELECT pg_is_in_recovery()")).scalar_one()}

    @app.get("/async/fresh")
    async def fresh_async(db: AsyncFreshReadSession) -> dict[str, bool]:
        return {"replica": (await db.execute(text("SELECT pg_is_in_recovery()"))).scalar_one()}

    @app.post("/write")
    def write(db: WriteSession) -> dict[str, bool]:
        db.execute(text("INSERT INTO rwdb_items (name) VALUES ('outage test')"))
        db.commit()
        return {"ok": True}

    @app.post("/async/write")
    async def write_async(db: AsyncWriteSession) -> dict[str, bool]:
        await db.execute(text("INSERT INTO rwdb_items (name) VALUES ('outage test')"))
        await db.commit()
        return {"ok": True}

    @app.get("/hold")
    async def hold(db: AsyncWriteSession) -> dict[str, bool]:
        await db.execute(text("SELECT pg_sleep(1)"))
        return {"ok": True}

    return app


def serve(app: FastAPI) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    return served_client(app, "http://t", raise_app_exceptions=False)


@pytest.mark.parametrize("path", ["/read", "/async/read", "/fresh", "/async/fresh"])
async def test_a_refused_read_port_is_answered_by_the_primary_then_the_breaker_skips_it(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 20, item 11: a read whose replica connection cannot be opened is a
    read-only first statement: the primary answers it in the same request (before,
    the first RWDB_READ_FALLBACK_AFTER reads were 503s). ``/fresh`` takes the path
    that checks a position on each replica connection (routing.rules.next_replica_step)."""
    app = make_app(read_port=CLOSED_PORT, read_fallback_after=2, read_retry_seconds=1)
    health = fastapi_rwdb.get_database().health
    async with serve(app) as client:
        # (A fresh read routes by a state of its own: no X-RWDB-Read header.)
        header = "/fresh" not in path

        async def read(reason: str) -> None:
            response = await client.get(path)
            assert response.status_code == 200, response.text
            assert response.json() == {"replica": False}
            if header:
                assert response.headers["x-rwdb-read"] == f"primary; reason={reason}"

        for _ in range(2):
            await read("replica-unreachable")
        assert health.read_side_down
        await read("replica-down")  # the breaker is open: no attempt at all
        time.sleep(1.1)
        # Half-open: one read tries the read side again, fails, is answered by the
        # primary all the same, and re-opens the breaker.
        assert not health.read_side_down
        await read("replica-unreachable")
        assert health.read_side_down
        await read("replica-down")
    assert PASSWORD not in caplog.text


def test_a_replica_lost_after_the_first_statement_is_an_outage_not_a_move() -> None:
    """After a text statement the transaction stays where it is: what it may have set
    up there (a SET LOCAL, a cursor) would not be on the primary. The replica's server
    connection is ended under the second statement: the error is an outage (503)."""
    db = Database(RWDBSettings(**FAST_RETRY))  # type: ignore[arg-type]
    try:
        with db.read_session() as s:
            assert s.execute(text("SELECT pg_is_in_recovery()")).scalar_one() is True
            with pytest.raises(DBAPIError) as info:
                s.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        assert unavailable_reason(info.value) is not None, info.value
    finally:
        db.dispose_sync()


@pytest.mark.parametrize("path", ["/write", "/async/write"])
async def test_refused_write_port_is_a_clear_503(path: str) -> None:
    app = make_app(write_port=CLOSED_PORT)
    async with serve(app) as client:
        response = await client.post(path)
    assert response.status_code == 503
    assert "cannot connect to the write side" in response.json()["detail"]
    assert PASSWORD not in response.text


TOPOLOGY = ("127.0.0.1", "5999", "port", "OperationalError", "OSError", "connection to server")


@pytest.mark.parametrize("path", ["/read", "/async/read", "/write"])
async def test_a_503_tells_the_client_what_and_when_never_where(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An anonymous client learns no host, port or driver message; the log has them."""
    caplog.set_level(logging.WARNING, logger="fastapi_rwdb")
    app = make_app(read_port=5999, write_port=5999, read_fallback_after=10)
    async with serve(app) as client:
        response = await (client.post(path) if path == "/write" else client.get(path))
    assert response.status_code == 503
    detail = response.json()["detail"]
    assert "cannot connect to the" in detail and "retry in 1 second" in detail
    assert response.headers["retry-after"] == "1"
    assert [word for word in TOPOLOGY if word in response.text] == []
    assert "127.0.0.1:5999" in caplog.text  # where it went wrong: for the operator
    assert PASSWORD not in caplog.text


def test_unreachable_host_raises_after_bounded_retries(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fastapi_rwdb")
    db = Database(RWDBSettings(server="127.0.0.1", write_port=CLOSED_PORT, connect_retries=2))
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError) as info, db.write_session() as s:
        s.execute(text("SELECT 1"))
    assert "after 3 attempts" in str(info.value)
    assert str(CLOSED_PORT) not in str(info.value) and "127.0.0.1" not in str(info.value)
    assert f"127.0.0.1:{CLOSED_PORT} after 3 attempts" in caplog.text
    assert time.monotonic() - started < 5
    assert caplog.text.count("retry") == 2
    assert PASSWORD not in str(info.value) + caplog.text
    db.dispose_sync()


def test_wrong_password_fails_at_once_without_retries(caplog: pytest.LogCaptureFixture) -> None:
    wrong = "definitely-wrong-pw"
    db = Database(RWDBSettings(password=wrong, connect_retries=3))
    with pytest.raises(DatabaseUnavailableError) as info, db.read_session() as s:
        s.execute(text("SELECT 1"))
    # An outage all the same (a 503, never a 500), without the retries: the log says
    # which settings to check.
    assert "refused the login" in str(info.value)
    assert "retry" not in caplog.text
    assert "check POSTGRES_USER, POSTGRES_PASSWORD" in caplog.text
    assert wrong not in str(info.value) + caplog.text
    db.dispose_sync()


async def test_pool_pressure_waits_at_most_the_timeout_then_503_and_leaks_nothing() -> None:
    app = make_app(pool_size=1, max_overflow=0, pool_timeout=0.3)
    db = fastapi_rwdb.get_database()
    async with serve(app) as client:
        responses = await asyncio.gather(*(client.get("/hold") for _ in range(3)))
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 503, 503]
        busy = next(r for r in responses if r.status_code == 503)
        assert "pool timeout" in busy.json()["detail"]
        for pool in (db.engines.write.pool, db.engines.read.pool):
            assert pool.checkedout() == 0  # type: ignore[attr-defined]
        for engine in (db.async_engines.write, db.async_engines.read):
            assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", ["/write", "/async/write"])
async def test_write_side_on_a_standby_discards_the_pool_and_says_503(path: str) -> None:
    """What a demoted primary looks like: SQLSTATE 25006 on the write side.

    The write side is pointed straight at a replica's PgBouncer: a real standby,
    refusing the INSERT as a demoted primary would.
    """
    replica_port = _replica_bouncer_port()
    app = make_app(write_port=replica_port)
    db = fastapi_rwdb.get_database()
    async with serve(app) as client:
        engine = db.engines.write if path == "/write" else db.async_engines.write.sync_engine
        opened: list[int] = []
        event.listen(engine.pool, "connect", lambda *a: opened.append(1))
        first = await client.post(path)
        assert first.status_code == 503
        assert "read-only (failover in progress)" in first.json()["detail"]
        second = await client.post(path)
        assert second.status_code == 503
        # Each request's INSERT is refused on a new connection (the pool was
        # invalidated) and, as a refused first statement, once more on another
        # (reconnect.py): two connections per request.
        assert len(opened) == 4


async def test_lag_above_the_limit_sends_reads_to_the_primary() -> None:
    app = make_app(max_replica_lag=0.3, lag_check_interval=0.1)
    db = fastapi_rwdb.get_database()
    stack("lag", "1s")
    try:
        async with serve(app) as client:
            deadline = time.monotonic() + 10
            while not db.health.lag_exceeded and time.monotonic() < deadline:
                await client.post("/async/write")  # keeps the replicas behind
                await asyncio.sleep(0.05)
            assert db.health.lag_exceeded, f"lag never exceeded: {db.health.lag}"
            pinned = await client.get("/read")
            assert pinned.headers["x-rwdb-read"] == "primary; reason=replica-lag"
            assert pinned.json() == {"replica": False}
            stack("lag", "0")
            deadline = time.monotonic() + 10
            while db.health.lag_exceeded and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            back = await client.get("/read")
            assert back.headers["x-rwdb-read"] == "replica" and back.json() == {"replica": True}
    finally:
        stack("lag", "0")


def _replica_bouncer_port() -> int:
    """The PgBouncer port of a node that is a replica right now."""
    with fastapi_rwdb.get_read_db_context() as s:
        pg_port = s.execute(text("SELECT inet_server_port()")).scalar_one()
    return int(pg_port) + 1000  # stack.sh: PostgreSQL 1543x, its PgBouncer 1643x
