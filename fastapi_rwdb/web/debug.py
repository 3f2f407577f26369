"""Built-in routes that show how a deployment really splits reads and writes.

:func:`fastapi_rwdb.setup` mounts them when ``RWDB_DEBUG_ROUTES=true``, under
``RWDB_DEBUG_PREFIX`` (default ``/debug``):

``GET {prefix}/read-write-split``
    Asks each side of both engine pairs which PostgreSQL node answered and
    whether it is in recovery, with the primary's WAL position, the replica's
    replay position and lag, and the caller's read-your-writes pin. HTTP 200
    when the write ports reach a primary and the read ports a replica, 503
    (with one plain sentence per problem) when not.

``GET {prefix}/pool-stats``
    The six connection pools (write, read and primary_read, per driver), read
    from memory; nothing is connected.

With ``RWDB_DEBUG_TOKEN`` set, both want ``Authorization: Bearer <token>``.
The routes only read: no data is written and the caller's pin is left as it
was. Bodies name servers as ``host:port/database``, never with a user or
password, and error messages are cut to their first line with every
configured secret masked.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse

from ..database import Database
from .split_report import check_read_write_split

logger = logging.getLogger("fastapi_rwdb")

_NO_STORE = {"Cache-Control": "no-store"}


# -- protection ------------------------------------------------------------------------


def _token_guard(token: bytes | None) -> Callable[[Request], Coroutine[Any, Any, None]]:
    # Both sides are hashed first, so the comparison takes the same time whatever
    # the length of what the client sent.
    expected = None if token is None else hashlib.sha256(token).digest()

    async def require_token(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # latin-1 gives back the bytes the client sent.
        digest = hashlib.sha256(given.strip().encode("latin-1")).digest()
        if not (hmac.compare_digest(digest, expected) and scheme.lower() == "bearer"):
            raise HTTPException(401, "unauthorized", headers={"WWW-Authenticate": "Bearer"})

    return require_token


def debug_router(database: Database) -> APIRouter:
    """The router ``setup()`` includes when ``RWDB_DEBUG_ROUTES`` is on.

    It reports on ``database`` (the one ``setup()`` made the process-wide
    default, so the same engines the dependencies use).
    """
    settings = database.settings
    secret = settings.debug_token.get_secret_value() if settings.debug_token else ""
    if not secret:
        logger.warning(
            "fastapi_rwdb: the debug routes under %s are on without RWDB_DEBUG_TOKEN: "
            "anyone who can reach the app can see its database topology and pool usage",
            settings.debug_prefix,
        )
    router = APIRouter(
        prefix=settings.debug_prefix,
        dependencies=[Depends(_token_guard(secret.encode() if secret else None))],
        include_in_schema=False,
    )

    @router.get("/read-write-split")
    async def read_write_split() -> JSONResponse:
        body = await check_read_write_split(database)
        status = 200 if body["status"] == "ok" else 503
        return JSONResponse(body, status_code=status, headers=_NO_STORE)

    @router.get("/pool-stats")
    async def pool_stats_route() -> JSONResponse:
        return JSONResponse(database.pool_stats(), headers=_NO_STORE)

    return router
