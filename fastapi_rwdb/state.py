"""What one request has done so far that matters for routing its reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .tokens import Token

if TYPE_CHECKING:
    from .database import Database


@dataclass(slots=True)
class RequestState:
    """Made by the middleware for each HTTP request, mutated by the sessions.

    Sync endpoints run in a worker thread with a copy of the request's context;
    the copy points at this same object, so what a session records here is
    what the middleware reads when the response starts.
    """

    token: Token | None = None  # the valid token the client sent, if any
    commit_lsn: int | None = None  # set once this request committed a write
    replica_caught_up: bool = False  # a replica had replayed the token's LSN
    replica_behind: bool = False  # ... or had not, so reads went to the primary
    read_target: str | None = None  # "replica" or "primary", for the routing header
    read_reason: str | None = None
    version: int = 0  # bumped on every change that can alter a routing decision
    database: Database | None = None  # the serving app's, for get_database()

    def note_commit(self, lsn: int) -> None:
        self.commit_lsn = lsn if self.commit_lsn is None else max(self.commit_lsn, lsn)
        self.version += 1
