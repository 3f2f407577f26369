"""What one request has done so far that matters for routing its reads.

The middleware makes a :class:`RequestState` for each HTTP request and shares it
through the ``request_state`` contextvar; sessions mutate it. Sync endpoints run
in a worker thread with a copy of the request's context, and the copy points at
this same object, so what a session records here is what the middleware reads
when the response starts.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from .tokens import Token

logger = logging.getLogger("fastapi_rwdb")

_LATE_WARNING_EVERY = 60.0  # seconds, per route
# Keyed by route template, or by the raw path when no route matched (one key per URL):
# bounded, as a long-running process may see any number of distinct paths.
_LATE_WARNED_KEPT = 256
_late_warned: dict[str, float] = {}


class ServingDatabase(Protocol):
    """The serving app's :class:`fastapi_rwdb.Database`, as far as this layer needs
    to know it (the registry sits above it: :func:`fastapi_rwdb.get_database`
    hands it back with its full type)."""

    def token_for(self, lsn: int) -> str: ...


@dataclass(slots=True)
class RequestState:
    token: Token | None = None  # the newest valid token the client sent, if any
    commit_lsn: int | None = None  # set once this request committed a write
    seen_lsn: int | None = None  # session consistency: newest position a read saw
    replica_behind: bool = False  # a replica lacked what this client needs: stay on the primary
    read_target: str | None = None  # "replica" or "primary", for the routing header
    read_reason: str | None = None
    version: int = 0  # bumped on every change that can alter a routing decision
    database: ServingDatabase | None = None  # the serving app's, for get_database()
    scope: Any = None  # the ASGI scope, to name the route in warnings
    response_started: bool = False
    #: A fresh read's session state before its first read: the position to reach is
    #: the primary's current one, taken then (see orm.reads).
    fresh: bool = False

    def note_commit(self, lsn: int, *, own: bool = False) -> None:
        """A write session committed ``lsn``; ``own``: in a unit of work of its own
        (a job's ``get_write_db_context()``), which needs no token after the response."""
        self.commit_lsn = lsn if self.commit_lsn is None else max(self.commit_lsn, lsn)
        self.version += 1
        if self.response_started and not own:
            _warn_late_commit(self.scope)

    def note_seen(self, lsn: int) -> None:
        if self.seen_lsn is None or lsn > self.seen_lsn:
            self.seen_lsn = lsn

    @property
    def needed_lsn(self) -> int | None:
        """The position a replica must have replayed to serve this client."""
        lsns = [lsn for lsn in (self.token and self.token.lsn, self.seen_lsn) if lsn]
        return max(lsns) if lsns else None


def _warn_late_commit(scope: Any) -> None:
    scope = scope or {}
    path = getattr(scope.get("route"), "path", None) or scope.get("path", "?")
    where = f"{scope.get('method', '')} {path}".strip()
    now = time.monotonic()
    if now - _late_warned.get(where, -_LATE_WARNING_EVERY) < _LATE_WARNING_EVERY:
        return
    if len(_late_warned) >= _LATE_WARNED_KEPT:
        _late_warned.clear()
    _late_warned[where] = now
    logger.warning(
        "fastapi_rwdb: %s committed a write after its response had started (in a streaming "
        "body, a yield dependency's teardown or a background task), so the client got no "
        "read-your-writes token and may not see its own write on its next read. Commit before "
        "returning the response (a dependency: Depends(..., scope='function')); for jobs, pass "
        "fastapi_rwdb.current_token() to them and read with get_read_db_context(after=...).",
        where,
    )


request_state: ContextVar[RequestState | None] = ContextVar("rwdb_request_state", default=None)
