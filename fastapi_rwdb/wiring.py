"""``setup(app)``: the one call that connects fastapi_rwdb to an application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.applications import Starlette

from .current import configure, get_database
from .database import Database
from .observe import metrics
from .routing.replicas import watch_replicas
from .settings import RWDBSettings
from .web.debug import debug_router
from .web.middleware import ReadYourWritesMiddleware
from .web.unavailable import HANDLED, unavailable_handler

logger = logging.getLogger("fastapi_rwdb")


def setup(app: FastAPI, settings: RWDBSettings | Database | None = None) -> Database:
    """Load and check the settings, add the read-your-writes middleware and the 503
    handlers for outages, watch replica lag if asked to, and dispose of every pool
    at shutdown.

    Call it once, right after creating the app. Settings come from the
    environment unless given; a bad value raises :class:`SettingsError` here,
    at start-up, not on the first request.
    """
    database = configure(settings)  # loads and checks the settings
    metrics.install(get_database)
    database._serves(app)
    database.signing_keys  # noqa: B018 - RWDB_SECRET_KEY now; the stored key at start-up
    app.add_middleware(ReadYourWritesMiddleware, database=database)
    if database.settings.debug_routes:
        app.include_router(debug_router(database))
    for exc_class in HANDLED:
        app.add_exception_handler(exc_class, unavailable_handler)

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def rwdb_lifespan(app_: Any) -> AsyncIterator[Any]:
        database.lifespan_ok = True
        if database.settings.pin_mode != "off":
            database.signing_keys.load_in_background()  # see engine/keystore.py
        watcher = _start_lag_watch(database)
        try:
            async with inner(app_) as state:
                yield state
        finally:
            database.signing_keys.stop()
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await database.dispose()

    app.router.lifespan_context = rwdb_lifespan
    # Until it runs, the middleware warns (once) that it has not: a mounted app's
    # lifespan is never run by Starlette, and nothing else would say so.
    database.lifespan_ok = False
    return database


@asynccontextmanager
async def lifespan(*apps: Starlette) -> AsyncIterator[None]:
    """Run the lifespans of ``apps``, mounted under the app whose lifespan this is in.

    Starlette runs only the outermost app's lifespan, so an app that called
    :func:`setup` and is mounted under another would never start its lag watcher
    nor dispose of its pools. In the outer app's lifespan::

        async with fastapi_rwdb.lifespan(api_app):
            yield

    Each app's whole lifespan runs (its own start-up and shutdown code too), the
    first one first; they end in reverse order.
    """
    async with contextlib.AsyncExitStack() as stack:
        for app in apps:
            await stack.enter_async_context(app.router.lifespan_context(app))
        yield


#: The running watch of each Database: one at a time. Two lifespans of one app can
#: overlap on two event loops (a test's TestClient runs its own in a thread), and a
#: Database's async engine must not be used from two loops at once: asyncpg's
#: connections belong to the loop that opened them (seen as a segfault).
_watches: weakref.WeakKeyDictionary[Database, asyncio.Task[None]] = weakref.WeakKeyDictionary()


def _start_lag_watch(database: Database) -> asyncio.Task[None] | None:
    """The primary's view of its replicas, for the lag limit and for dropping tokens
    early; neither needs it in the other pinning modes. None while another lifespan's
    watch of the same Database still runs: that one keeps the view for the process."""
    settings = database.settings
    if settings.max_replica_lag is None and settings.pin_mode != "lsn":
        return None
    running = _watches.get(database)
    if running is not None and not running.done() and not running.get_loop().is_closed():
        return None
    _watches[database] = task = asyncio.create_task(
        watch_replicas(
            database.health,
            lambda: database.monitor_engine,
            lambda: database.is_built("engines") or database.is_built("async_engines"),
        ),
        name="fastapi_rwdb replica watch",
    )
    return task
