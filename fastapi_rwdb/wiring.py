"""``setup(app)``: the one call that connects fastapi_rwdb to an application."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from .database import Database, configure
from .middleware import ReadYourWritesMiddleware
from .settings import RWDBSettings

logger = logging.getLogger("fastapi_rwdb")


def setup(app: FastAPI, settings: RWDBSettings | Database | None = None) -> Database:
    """Load and check the settings, add the read-your-writes middleware, and dispose
    of every pool at shutdown.

    Call it once, right after creating the app. Settings come from the
    environment unless given; a bad value raises :class:`SettingsError` here,
    at start-up, not on the first request.
    """
    database = configure(settings)
    for warning in database.settings.warnings():
        logger.warning("fastapi_rwdb: %s", warning)
    database.signer  # noqa: B018 - warns now if RWDB_SECRET_KEY is missing
    app.add_middleware(ReadYourWritesMiddleware, database=database)

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        try:
            async with inner(app_) as state:
                yield state
        finally:
            await database.dispose()

    app.router.lifespan_context = lifespan
    return database
