"""A session whose connection is lost after its last statement closes quietly.

FastAPI closes a request's session after the response has been sent. When HAProxy
(a node leaving the read port), a failover or a restart has closed that connection
in between, the close's ROLLBACK fails; the error cannot be a 503 any more, it
escapes the app, and uvicorn drops the client's keep-alive connection, failing its
next request with no answer (seen under the grey suite's stalled replica). Here the
server backend of the request's connection is ended by the superuser after the
endpoint's last statement: ``raise_app_exceptions`` makes any error that escapes the
app fail the test.
"""

import asyncio
import logging
import time

import psycopg
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from fastapi_rwdb import (
    AsyncReadSession,
    AsyncWriteSession,
    ReadSession,
    WriteSession,
)

from ..helpers import node_dsn, rwdb_app, served_client

pytestmark = pytest.mark.usefixtures("stack")

WHERE = text("SELECT pg_backend_pid(), inet_server_port()")


def end_backend(pid: int, port: int) -> None:
    """End server backend ``pid`` of the node at ``port``, as the superuser, and wait
    until it is gone."""
    superuser = node_dsn(port, user="postgres", password="postgres_pw")
    with psycopg.connect(superuser, connect_timeout=2, autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        until = time.monotonic() + 5
        while conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            assert time.monotonic() < until, f"backend {pid} still there"
            time.sleep(0.02)
    time.sleep(0.1)  # PgBouncer sees its server connection close


def app_losing_connections() -> FastAPI:
    app = rwdb_app(pin_mode="off")

    @app.get("/sync/read")
    def sync_read(db: ReadSession) -> dict[str, int]:
        pid, port = db.execute(WHERE).one()
        end_backend(pid, port)
        return {"port": port}

    @app.get("/sync/write")
    def sync_write(db: WriteSession) -> dict[str, int]:
        pid, port = db.execute(WHERE).one()  # a read on the write side, left uncommitted
        end_backend(pid, port)
        return {"port": port}

    @app.get("/async/read")
    async def async_read(db: AsyncReadSession) -> dict[str, int]:
        pid, port = (await db.execute(WHERE)).one()
        await asyncio.to_thread(end_backend, pid, port)
        return {"port": port}

    @app.get("/async/write")
    async def async_write(db: AsyncWriteSession) -> dict[str, int]:
        pid, port = (await db.execute(WHERE)).one()
        await asyncio.to_thread(end_backend, pid, port)
        return {"port": port}

    return app


@pytest.mark.parametrize("path", ["/sync/read", "/sync/write", "/async/read", "/async/write"])
async def test_a_connection_lost_before_the_session_closes_raises_nothing(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_rwdb")
    app = app_losing_connections()
    async with served_client(app) as client:
        for _ in range(2):  # the second request gets another connection, and answers
            response = await client.get(path)
            assert response.status_code == 200, response.text
    assert "was lost before it was closed" in caplog.text
