"""Seeding fixture rows the way a write through the API would: with the token for them."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import ModuleType
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from ..current import get_database
from ..database import Database
from ..jobs import async_write_unit, write_unit
from ..routing.request import RequestState, request_state
from .stale import stale_replica


def give_token(client: Any, token: str, database: Database) -> None:
    """Hand ``client`` the read-your-writes token as the app would: its cookie (and, when
    the cookie is ``Secure`` but the client speaks plain HTTP, the header).

    ``client``: an ``httpx`` or ``httpx2`` client, sync or async (Starlette's
    ``TestClient`` is built on whichever of the two it found).
    """
    http = _http_library(client)
    settings = database.settings
    base = client.base_url
    attrs = f"Max-Age={int(settings.pin_seconds)}; Path=/; HttpOnly; SameSite=Lax"
    if settings.cookie_secure:
        attrs += "; Secure"
    # Through the client's own cookie jar, so the cookie gets the domain the app's own
    # Set-Cookie would get, and the app's later cookies replace it.
    response = http.Response(
        200,
        headers=[("set-cookie", f"{settings.cookie_name}={token}; {attrs}")],
        request=http.Request("GET", base.join("/")),
    )
    client.cookies.extract_cookies(response)
    if settings.cookie_secure and base.scheme != "https":
        client.headers[settings.token_header] = token


def _http_library(client: Any) -> ModuleType:
    """The module (``httpx`` or ``httpx2``) whose client class ``client`` is built on."""
    for cls in type(client).__mro__:
        name = cls.__module__.split(".")[0]
        if name in ("httpx", "httpx2"):
            return importlib.import_module(name)
    raise TypeError(
        f"give_token needs an httpx or httpx2 client (Starlette's TestClient is one); "
        f"got {type(client).__qualname__}"
    )


class RWDBKit:
    """The ``rwdb`` fixture: a stale replica, and seeding that keeps read-your-writes."""

    def __init__(self, database: Database | None = None) -> None:
        self._database = database
        #: The token of the last :meth:`seed` that wrote, as a string.
        self.token: str | None = None

    def database(self) -> Database:
        return self._database or get_database()

    def stale_replica(self, database: Database | None = None) -> Any:
        """:func:`stale_replica` (a context manager) on this kit's or the given database."""
        return stale_replica(database or self.database())

    @contextmanager
    def seed(
        self,
        client: Any = None,
        *,
        database: Database | None = None,
    ) -> Iterator[Session]:
        """A write session for fixture rows; commits at the end of the block, and
        gives ``client`` the token for that commit, so its reads see the rows even
        from a replica that lags (they go to one that has them, else the primary)."""
        db = database or self.database()
        state = RequestState(database=db)
        reset = request_state.set(state)
        try:
            with write_unit(db) as session:
                yield session
        finally:
            request_state.reset(reset)
        self._hand_over(state, db, client)

    @asynccontextmanager
    async def aseed(
        self,
        client: Any = None,
        *,
        database: Database | None = None,
    ) -> AsyncIterator[AsyncSession]:
        """The asyncpg twin of :meth:`seed`."""
        db = database or self.database()
        state = RequestState(database=db)
        reset = request_state.set(state)
        try:
            async with async_write_unit(db) as session:
                yield session
        finally:
            request_state.reset(reset)
        self._hand_over(state, db, client)

    def _hand_over(self, state: RequestState, db: Database, client: Any) -> None:
        if state.commit_lsn is None or db.settings.pin_mode == "off":
            return  # nothing written: nothing to protect
        self.token = db.token_for(state.commit_lsn)
        if client is not None:
            give_token(client, self.token, db)
