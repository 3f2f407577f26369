"""An app with its own setup() mounted under another one.

Starlette runs only the outer app's lifespan, so the mounted app's lag watcher
and pool disposal need the outer app's help: fastapi_rwdb.lifespan(), or at
least a warning saying so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from fastapi import FastAPI
from sqlalchemy import text

import fastapi_rwdb
from fastapi_rwdb import Database, ReadSession, RWDBSettings

from ..helpers import client

pytestmark = pytest.mark.stack

WATCHER = "fastapi_rwdb replica watch"


def sub_app() -> tuple[FastAPI, Database]:
    app = FastAPI()
    database = fastapi_rwdb.setup(app, Database(RWDBSettings(max_replica_lag=5)))

    @app.get("/one")
    def one(db: ReadSession) -> dict[str, int]:
        return {"one": db.execute(text("SELECT 1")).scalar_one()}

    return app, database


def watching() -> bool:
    return any(task.get_name() == WATCHER for task in asyncio.all_tasks())


async def test_a_mounted_apps_lifespan_runs_from_the_outer_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="fastapi_rwdb")
    inner, database = sub_app()

    @asynccontextmanager
    async def outer_lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with fastapi_rwdb.lifespan(inner):
            yield

    outer = FastAPI(lifespan=outer_lifespan)
    outer.mount("/api", inner)
    async with outer.router.lifespan_context(outer), client(outer) as c:
        assert watching()
        assert (await c.get("/api/one")).json() == {"one": 1}
        assert database.is_built("engines")
    assert not watching()
    assert not database.is_built("engines") and not database.is_built("async_engines")
    assert "lifespan" not in caplog.text


async def test_a_mounted_app_whose_lifespan_never_ran_says_how_to_fix_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="fastapi_rwdb")
    inner, database = sub_app()
    outer = FastAPI()
    outer.mount("/api", inner)
    async with outer.router.lifespan_context(outer), client(outer) as c:
        for _ in range(3):
            assert (await c.get("/api/one")).status_code == 200
        assert not watching()
    warnings = [
        r.getMessage() for r in caplog.records if "fastapi_rwdb.lifespan(" in r.getMessage()
    ]
    assert len(warnings) == 1, caplog.text
    assert "mounted at /api" in warnings[0]
    assert "async with fastapi_rwdb.lifespan(" in warnings[0]
    await database.dispose()


async def test_an_app_served_with_its_lifespan_does_not_warn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="fastapi_rwdb")
    app, _ = sub_app()
    async with app.router.lifespan_context(app), client(app) as c:
        assert (await c.get("/one")).status_code == 200
    assert "lifespan" not in caplog.text


async def test_an_app_served_without_its_lifespan_is_told_so_not_that_it_is_mounted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="fastapi_rwdb")
    app, database = sub_app()
    async with client(app) as c:  # httpx's ASGITransport runs no lifespan
        for _ in range(2):
            assert (await c.get("/one")).status_code == 200
    warnings = [r.getMessage() for r in caplog.records if "never ran" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert "without its lifespan" in warnings[0]
    assert "mounted" not in warnings[0] and "fastapi_rwdb.lifespan(" not in warnings[0]
    await database.dispose()
