"""What several test modules share: the test database's name, the stack's address and
nodes (from benchmarks/common.py, which the benchmarks use too), a client and a served
app in the process, a signing key, and routes that write and read rows by name.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import text

import fastapi_rwdb
from benchmarks.common import NODE_PORTS, dsn, node_dsn, replica_nodes, stack
from fastapi_rwdb import (
    AsyncReadSession,
    AsyncWriteSession,
    Database,
    ReadSession,
    RWDBSettings,
    WriteSession,
)

__all__ = [
    "KEY",
    "NODE_PORTS",
    "TEST_DB",
    "add_writes",
    "client",
    "dsn",
    "node_dsn",
    "primary_url",
    "replica_nodes",
    "replicas_lagging",
    "rwdb_app",
    "serve",
    "served_client",
    "stack",
    "warm",
]

# Not the app's database (POSTGRES_DB): conftest.py points POSTGRES_DB here.
TEST_DB = os.environ.get("RWDB_TEST_DB", "rwdb_test")
KEY = "test-secret-key-0123456789abcdef"


def primary_url() -> str:
    """The app role's URL of the write port (for psycopg, outside any app)."""
    e = os.environ
    return (
        f"postgresql://{e['POSTGRES_USER']}:{e['POSTGRES_PASSWORD']}"
        f"@{e['POSTGRES_SERVER']}:{e['POSTGRES_PORT']}/{e['POSTGRES_DB']}"
    )


def rwdb_app(database: Database | None = None, **settings: Any) -> FastAPI:
    """A FastAPI app set up with ``database``, or with one of ``settings`` (the
    environment's stack, KEY as the signing key unless given)."""
    app = FastAPI()
    if database is None:
        settings.setdefault("secret_key", KEY)
        database = Database(RWDBSettings(**settings))
    fastapi_rwdb.setup(app, database)
    return app


def add_writes(app: FastAPI, path: str = "/notes", table: str = "rwdb_items") -> None:
    """``POST path`` and ``POST /async{path}``: insert a row with a new name into
    ``table`` and answer ``{"name": ...}``."""
    insert = text(f"INSERT INTO {table} (name) VALUES (:n)")

    @app.post(path)
    def create(db: WriteSession) -> dict[str, str]:
        name = f"{path.strip('/')}-{uuid.uuid4()}"
        db.execute(insert, {"n": name})
        db.commit()
        return {"name": name}

    @app.post(f"/async{path}")
    async def create_async(db: AsyncWriteSession) -> dict[str, str]:
        name = f"async-{path.strip('/')}-{uuid.uuid4()}"
        await db.execute(insert, {"n": name})
        await db.commit()
        return {"name": name}


def add_named_item_routes(app: FastAPI) -> None:
    """Writes of a row named in the path, Core and ORM, sync and async (``POST /core/N``,
    ``/orm/N``, ``/async/core/N``, ``/async/orm/N``), and the count of rows of that name
    read back (``GET /read/N``, ``/async/read/N``)."""
    from .models import Item

    insert = text("INSERT INTO rwdb_items (name) VALUES (:n)")
    select = text("SELECT count(*) FROM rwdb_items WHERE name = :n")

    @app.post("/core/{name}")
    def core_write(name: str, db: WriteSession) -> dict[str, bool]:
        db.execute(insert, {"n": name})
        db.commit()
        return {"ok": True}

    @app.post("/orm/{name}")
    def orm_write(name: str, db: WriteSession) -> dict[str, bool]:
        db.add(Item(name=name))
        db.commit()
        return {"ok": True}

    @app.post("/async/core/{name}")
    async def async_core_write(name: str, db: AsyncWriteSession) -> dict[str, bool]:
        await db.execute(insert, {"n": name})
        await db.commit()
        return {"ok": True}

    @app.post("/async/orm/{name}")
    async def async_orm_write(name: str, db: AsyncWriteSession) -> dict[str, bool]:
        db.add(Item(name=name))
        await db.commit()
        return {"ok": True}

    @app.get("/read/{name}")
    def read(name: str, db: ReadSession) -> dict[str, int]:
        return {"count": db.execute(select, {"n": name}).scalar_one()}

    @app.get("/async/read/{name}")
    async def async_read(name: str, db: AsyncReadSession) -> dict[str, int]:
        return {"count": (await db.execute(select, {"n": name})).scalar_one()}


def client(
    app: FastAPI,
    base_url: str = "http://testserver",
    *,
    raise_app_exceptions: bool = True,
    timeout: float = 5.0,
) -> httpx.AsyncClient:
    """A client calling ``app`` in the process (no server, no sockets); with
    ``raise_app_exceptions=False`` an exception the app lets out is a 500, as a server
    would answer, instead of raising in the test."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url=base_url, timeout=timeout)


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[None]:
    """``app`` started (its lifespan: the Database's pools) for the block."""
    async with app.router.lifespan_context(app):
        yield


@asynccontextmanager
async def served_client(
    app: FastAPI, base_url: str = "http://testserver", **options: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` started, and a client calling it (``options``: :func:`client`'s), for the block."""
    async with serve(app), client(app, base_url, **options) as c:
        yield c


async def warm(app: FastAPI, path: str, ports: tuple[int, int]) -> None:
    """Fill the read pool with connections to both replicas (HAProxy: round robin):
    ``GET path`` answers with the ``port`` of the node that served it."""
    async with client(app) as c:
        for _ in range(20):
            answers = await asyncio.gather(*(c.get(path) for _ in range(6)))
            if set(ports) <= {a.json()["port"] for a in answers}:
                return
    raise AssertionError(f"the read pool never reached both replicas {ports}")


def token_after(db: Database, *statements: str) -> str:
    """Run ``statements`` on the primary and commit: a token for the position after."""
    with db.write_session() as session:
        for sql in statements:
            session.execute(text(sql))
        session.commit()
        lsn = session.execute(text("SELECT pg_current_wal_lsn()::text")).scalar_one()
    hi, lo = lsn.split("/")
    return db.token_for((int(hi, 16) << 32) + int(lo, 16))


@contextmanager
def replicas_lagging(delay: str = "1s") -> Iterator[None]:
    """Replicas apply each commit ``delay`` late (``stack.sh lag``), so a fresh write is
    surely missing there; on time again afterwards, whatever the test did."""
    stack("lag", delay)
    try:
        yield
    finally:
        stack("lag", "0")
