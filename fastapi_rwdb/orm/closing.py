"""Closing a session whose connection is already gone: nothing is left to lose.

Closing a session rolls back the transaction it still holds. When a proxy or the
server has already closed that connection (HAProxy shutting the sessions of a node
whose check failed, a failover, a restart), the ROLLBACK fails, though the server
ended the transaction when the connection went. FastAPI closes a request's session
after its response has been sent, so such an error cannot become a 503 any more: it
escapes the app, and the ASGI server drops the client's keep-alive connection,
failing the client's *next* request on it with no answer at all.

What the client was told is already decided (a COMMIT either returned before the
response or it did not), so a close that meets a lost connection logs it, lets
SQLAlchemy finish discarding that connection, and returns. Any other error still
raises.
"""

from __future__ import annotations

import logging

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ..engine.sqlstates import is_connection_failure, sqlstate_of

logger = logging.getLogger("fastapi_rwdb")


class ClosesLostConnections(Session):
    """Mixed in first, before every other class of the package's read and write sessions."""

    def close(self) -> None:
        try:
            super().close()
        except DBAPIError as exc:
            if not (exc.connection_invalidated or is_connection_failure(sqlstate_of(exc))):
                raise
            logger.info(
                "fastapi_rwdb: a session's connection was lost before it was closed (%s); "
                "its transaction ended with it",
                type(exc.orig).__name__,
            )
            # The failed ROLLBACK left the session holding its transaction; closing
            # with invalidation discards the connection without another round trip.
            self.invalidate()
