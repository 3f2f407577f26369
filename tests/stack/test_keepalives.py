"""TCP keepalives and TCP_USER_TIMEOUT are really set on the sockets of every engine a
Database opens, both drivers, read back with getsockopt from the connection's own
socket (libpq's file descriptor; asyncpg's transport).

That a vanished peer is then noticed in seconds is shown on a private network
namespace in tests/stack/test_vanished_peer.py.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from fastapi_rwdb import Database, RWDBSettings

pytestmark = pytest.mark.stack

TCP = socket.IPPROTO_TCP


def options(sock: socket.socket) -> dict[str, int]:
    return {
        "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "idle": sock.getsockopt(TCP, socket.TCP_KEEPIDLE),
        "interval": sock.getsockopt(TCP, socket.TCP_KEEPINTVL),
        "count": sock.getsockopt(TCP, socket.TCP_KEEPCNT),
        "user_timeout_ms": sock.getsockopt(TCP, socket.TCP_USER_TIMEOUT),
    }


@contextmanager
def libpq_socket(engine: Engine) -> Iterator[socket.socket]:
    """The TCP socket under a pooled psycopg connection (a duplicate of libpq's fd:
    the same kernel socket)."""
    raw = engine.raw_connection()
    try:
        fd = raw.driver_connection.pgconn.socket  # type: ignore[union-attr]
        sock = socket.socket(fileno=os.dup(fd))
        try:
            assert sock.family == socket.AF_INET
            yield sock
        finally:
            sock.close()
    finally:
        raw.close()


async def asyncpg_options(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        # Read independently of the package's helper: asyncio's public extra info.
        sock: Any = raw.driver_connection._transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.family == socket.AF_INET
        return options(sock)


CUSTOM = {
    "tcp_keepalives_idle": 7,
    "tcp_keepalives_interval": 2,
    "tcp_keepalives_count": 4,
    "tcp_user_timeout": 9.5,
}
CUSTOM_READ = {"keepalive": 1, "idle": 7, "interval": 2, "count": 4, "user_timeout_ms": 9500}
DEFAULT_READ = {"keepalive": 1, "idle": 10, "interval": 3, "count": 3, "user_timeout_ms": 20000}


@pytest.mark.parametrize(
    ("values", "expected"), [({}, DEFAULT_READ), (CUSTOM, CUSTOM_READ)], ids=["default", "set"]
)
def test_sync_engines_sockets(values: dict[str, Any], expected: dict[str, int]) -> None:
    db = Database(RWDBSettings(**values))
    try:
        engines = [db.engines.write, db.engines.read, db.primary_read_engine]
        for engine in engines:
            with libpq_socket(engine) as sock:
                assert options(sock) == expected, engine.url.port
    finally:
        db.dispose_sync()


@pytest.mark.parametrize(
    ("values", "expected"), [({}, DEFAULT_READ), (CUSTOM, CUSTOM_READ)], ids=["default", "set"]
)
async def test_async_engines_sockets(values: dict[str, Any], expected: dict[str, int]) -> None:
    db = Database(RWDBSettings(**values))
    try:
        engines = [
            db.async_engines.write,
            db.async_engines.read,
            db.async_primary_read_engine,
            db.monitor_engine,
        ]
        for engine in engines:
            assert await asyncpg_options(engine) == expected, engine.url.port
    finally:
        await db.dispose()


async def test_off_leaves_the_kernel_defaults() -> None:
    """RWDB_TCP_KEEPALIVES=false and RWDB_TCP_USER_TIMEOUT=0 set nothing (a socket's
    defaults: no keepalive, no user timeout), on both drivers."""
    db = Database(RWDBSettings(tcp_keepalives=False, tcp_user_timeout=0))
    try:
        with libpq_socket(db.engines.read) as sock:
            got = options(sock)
        assert (got["keepalive"], got["user_timeout_ms"]) == (0, 0)
        got = await asyncpg_options(db.async_engines.read)
        assert (got["keepalive"], got["user_timeout_ms"]) == (0, 0)
    finally:
        await db.dispose()
