"""The dependencies inside a FastAPI app, driven over ASGI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlmodel import Session as SQLModelSession
from sqlmodel import select

import fastapi_rwdb
from fastapi_rwdb import (
    AsyncDBSession,
    AsyncReadSession,
    AsyncWriteSession,
    DBSession,
    ReadSession,
    WriteSession,
)

from ..helpers import served_client
from ..models import Item

pytestmark = pytest.mark.stack

WHERE = text("SELECT pg_is_in_recovery()")


def build_app() -> FastAPI:
    app = FastAPI()
    fastapi_rwdb.setup(app)

    @app.get("/sync/{side}")
    def sync_side(side: str, r: ReadSession, w: WriteSession, d: DBSession) -> dict[str, bool]:
        session = {"read": r, "write": w, "db": d}[side]
        return {"replica": session.execute(WHERE).scalar_one()}

    @app.get("/async/{side}")
    async def async_side(
        side: str, r: AsyncReadSession, w: AsyncWriteSession, d: AsyncDBSession
    ) -> dict[str, bool]:
        session = {"read": r, "write": w, "db": d}[side]
        return {"replica": (await session.execute(WHERE)).scalar_one()}

    @app.post("/items")
    def create(name: str, db: WriteSession) -> dict[str, object]:
        item = Item(name=name)
        db.add(item)
        db.commit()
        return {"id": item.id, "sqlmodel": isinstance(db, SQLModelSession)}

    @app.post("/items/wrong")
    def create_with_read_session(name: str, db: ReadSession) -> dict[str, str]:
        db.add(Item(name=name))
        db.commit()
        return {"never": "reached"}

    @app.get("/items/{name}")
    def find(name: str, db: ReadSession) -> list[str]:
        # SQLModel's exec() on the session the dependency yields.
        return [i.name for i in db.exec(select(Item).where(Item.name == name))]

    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = build_app()
    async with served_client(app, "http://test") as c:
        yield c


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(("side", "replica"), [("read", True), ("write", False), ("db", False)])
async def test_dependency_reaches_the_expected_side(
    client: httpx.AsyncClient, mode: str, side: str, replica: bool
) -> None:
    response = await client.get(f"/{mode}/{side}")
    assert response.status_code == 200
    assert response.json() == {"replica": replica}


async def test_sqlmodel_sessions_by_default(client: httpx.AsyncClient) -> None:
    name = f"app-{uuid.uuid4()}"
    created = await client.post("/items", params={"name": name})
    assert created.status_code == 200 and created.json()["sqlmodel"] is True
    assert isinstance(created.json()["id"], int)


async def test_write_through_read_dependency_fails_and_writes_nothing(
    client: httpx.AsyncClient,
) -> None:
    name = f"wrong-{uuid.uuid4()}"
    with pytest.raises(fastapi_rwdb.ReadOnlySessionError, match="get_write_db"):
        await client.post("/items/wrong", params={"name": name})
    with fastapi_rwdb.get_read_db_context(primary=True) as s:
        assert s.exec(select(Item).where(Item.name == name)).first() is None


async def test_shutdown_disposes_every_pool() -> None:
    app = build_app()
    db = fastapi_rwdb.get_database()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/sync/read")).status_code == 200
            assert (await c.get("/async/read")).status_code == 200
        read_pool = db.engines.read.pool
        assert read_pool.checkedin() >= 1  # type: ignore[attr-defined]
    assert not db.is_built("engines") and not db.is_built("async_engines")
    assert read_pool.checkedin() == 0  # type: ignore[attr-defined]


def test_environment_alone_is_enough_without_setup() -> None:
    """A worker that never calls setup(): engines are built on first use, no deadlock."""
    script = textwrap.dedent(
        """
        import asyncio
        from sqlalchemy import text
        from fastapi_rwdb import get_read_db_context, get_async_write_db_context, get_read_db

        with get_read_db_context() as s:
            a = s.execute(text("SELECT pg_is_in_recovery()")).scalar()
        gen = get_read_db()
        b = next(gen).execute(text("SELECT pg_is_in_recovery()")).scalar()
        gen.close()

        async def main():
            async with get_async_write_db_context() as s:
                return (await s.execute(text("SELECT pg_is_in_recovery()"))).scalar()

        print(a, b, asyncio.run(main()))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWDB_")}
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "False"]


async def test_two_apps_in_one_process_keep_their_own_settings() -> None:
    """Each request uses the Database of the app serving it, not the last setup()."""
    from fastapi_rwdb import Database, RWDBSettings, get_database

    key = "test-secret-key-0123456789abcdef"

    def make(mode: str) -> FastAPI:
        app = FastAPI()
        database = fastapi_rwdb.setup(app, Database(RWDBSettings(secret_key=key, pin_mode=mode)))

        @app.post("/write")
        async def write(db: AsyncWriteSession) -> dict[str, bool]:
            await db.execute(text("INSERT INTO rwdb_items (name) VALUES ('two apps')"))
            await db.commit()
            return {"own": get_database() is database}

        return app

    apps = {mode: make(mode) for mode in ("lsn", "off")}
    # setup() of the "off" app ran last: it holds the process-wide Database now.
    responses = {}
    async with (
        apps["lsn"].router.lifespan_context(apps["lsn"]),
        apps["off"].router.lifespan_context(apps["off"]),
    ):
        for mode, app in apps.items():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                responses[mode] = await c.post("/write")
    assert all(r.json() == {"own": True} for r in responses.values())
    token = responses["lsn"].headers["x-rwdb-pin"]
    assert int(token.split(".")[1], 16) > 0  # a real WAL position, read in lsn mode
    assert "x-rwdb-pin" not in responses["off"].headers


class _Boom(Exception):
    """Raised by an endpoint after it used its session."""


@pytest.mark.parametrize("alias", ["db", "write", "async-db", "async-write"])
async def test_an_endpoint_error_closes_its_session_before_the_error_is_handled(
    alias: str,
) -> None:
    """The endpoint's exception is thrown into the dependency, whose ``with`` block
    closes the session (rolling back) before any exception handler runs; a wrapper
    that swallowed it would leave the connection checked out until garbage collection.
    """
    app = FastAPI()
    settings = fastapi_rwdb.RWDBSettings(secret_key="test-secret-key-0123456789abcdef")
    db = fastapi_rwdb.setup(app, fastapi_rwdb.Database(settings))
    is_async = alias.startswith("async")
    checked_out: list[int] = []

    def in_use() -> int:
        engine = db.async_engines.write.sync_engine if is_async else db.engines.write
        return engine.pool.checkedout()  # type: ignore[attr-defined,no-any-return]

    @app.exception_handler(_Boom)
    async def handler(request: object, exc: _Boom) -> JSONResponse:
        checked_out.append(in_use())
        return JSONResponse({"failed": True}, status_code=409)

    @app.post("/sync/db")
    def sync_db(s: DBSession) -> None:
        s.execute(text("SELECT 1"))
        raise _Boom

    @app.post("/sync/write")
    def sync_write(s: WriteSession) -> None:
        s.execute(text("SELECT 1"))
        raise _Boom

    @app.post("/async/db")
    async def async_db(s: AsyncDBSession) -> None:
        await s.execute(text("SELECT 1"))
        raise _Boom

    @app.post("/async/write")
    async def async_write(s: AsyncWriteSession) -> None:
        await s.execute(text("SELECT 1"))
        raise _Boom

    path = "/async/" if is_async else "/sync/"
    path += alias.removeprefix("async-")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            response = await c.post(path)
        assert response.status_code == 409
        assert checked_out == [0], "the session was still open when the error was handled"
        assert in_use() == 0


async def test_a_later_setup_leaves_the_pools_of_a_mounted_app_alone() -> None:
    """configure() (and so setup()) replaces the process-wide Database. One that an
    app still serves requests with must keep its pools: that app's lifespan disposes
    of them at shutdown. One that no app uses is disposed of when replaced."""
    from fastapi_rwdb import Database, RWDBSettings

    key = "test-secret-key-0123456789abcdef"
    first = FastAPI()
    db = fastapi_rwdb.setup(first, Database(RWDBSettings(secret_key=key)))

    @first.get("/sync")
    def sync_read(s: WriteSession) -> bool:
        return bool(s.execute(text("SELECT true")).scalar_one())

    @first.get("/async")
    async def async_read(s: AsyncWriteSession) -> bool:
        return bool((await s.execute(text("SELECT true"))).scalar_one())

    async with served_client(first, "http://t") as c:
        for path in ("/sync", "/async"):
            assert (await c.get(path)).json() is True
        pools = [db.engines.write.pool, db.async_engines.write.sync_engine.pool]
        assert [p.checkedin() for p in pools] == [1, 1]  # type: ignore[attr-defined]

        fastapi_rwdb.setup(FastAPI(), Database(RWDBSettings(secret_key=key)))

        assert fastapi_rwdb.get_database() is not db
        assert [db.engines.write.pool, db.async_engines.write.sync_engine.pool] == pools
        assert [p.checkedin() for p in pools] == [1, 1]  # type: ignore[attr-defined]
        for path in ("/sync", "/async"):
            assert (await c.get(path)).json() is True
    assert not db.is_built("engines") and not db.is_built("async_engines")

    unused = fastapi_rwdb.configure(Database(RWDBSettings(secret_key=key)))
    assert unused.engines.write.pool.checkedin() == 0  # type: ignore[attr-defined]
    fastapi_rwdb.configure(Database(RWDBSettings(secret_key=key)))
    assert not unused.is_built("engines")
