"""How a database outage reaches the client: a short 503, not a stack trace.

During a switchover the write port is unusable for a few seconds, after a
crash for about Patroni's ttl. Requests caught in that window fail; they must
fail clearly and retryably, and a write is never reported as done unless its
COMMIT returned.

The client is told what happened and when to retry, never where: hosts, ports
and driver messages are the topology the debug routes keep behind a token.
They go to the log (secrets masked) instead.
"""

from __future__ import annotations

import logging

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..current import get_database
from ..engine.connect_errors import classify_connect_error
from ..engine.sqlstates import (
    READ_ONLY_SQLSTATE,
    STATEMENT_TIMEOUT,
    describe_error,
    is_connection_failure,
    sqlstate_of,
)
from ..errors import DatabaseUnavailableError, ReplicaConflictError

logger = logging.getLogger("fastapi_rwdb")

HANDLED = (DatabaseUnavailableError, ReplicaConflictError, PoolTimeoutError, DBAPIError)
RETRY_AFTER = 1  # seconds: a switchover's window is a few of them


def unavailable_reason(exc: BaseException) -> str | None:
    """Why the database is unavailable, if ``exc`` says it is; else ``None``."""
    if isinstance(exc, DatabaseUnavailableError):
        return str(exc)
    if isinstance(exc, ReplicaConflictError):
        return "a replica cancelled the read to replay the primary's changes (replay conflict)"
    if isinstance(exc, PoolTimeoutError):
        return "every database connection of this worker is busy (pool timeout)"
    if isinstance(exc, DBAPIError):
        code = sqlstate_of(exc)
        if code == READ_ONLY_SQLSTATE:
            # Only the write side gets here: read sessions raise ReadOnlySessionError.
            return "the primary became read-only (failover in progress)"
        if exc.connection_invalidated:
            return "the database connection was lost (failover or restart)"
        if is_connection_failure(code):
            return f"the database server is unavailable (SQLSTATE {code})"
        if code == STATEMENT_TIMEOUT:
            # A busy replica ended a read at its deadline's statement_timeout
            # (engine/deadline.py), or the application's own statement_timeout fired.
            return "the query ran longer than its deadline (statement timeout)"
        # The connect table (engine/connect_errors.py): a driver's timeout or refusal
        # without a SQLSTATE, a refused login, from an engine without the package's retry.
        verdict = classify_connect_error(exc)
        if verdict == "misconfigured":
            return "the database refused the login"
        if verdict is not None:
            return "the database server is unavailable"
    return None


async def unavailable_handler(request: Request, exc: Exception) -> Response:
    reason = unavailable_reason(exc)
    if reason is None:
        raise exc  # not an outage: the server's usual 500 and traceback
    logger.warning(
        "fastapi_rwdb: %s %s -> 503: %s (%s)",
        request.method,
        request.url.path,
        reason,
        describe_error(exc, get_database().settings),
    )
    return JSONResponse(
        {
            "detail": f"database temporarily unavailable: {reason}; "
            f"retry in {RETRY_AFTER} second{'s' if RETRY_AFTER != 1 else ''}"
        },
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER)},
    )
