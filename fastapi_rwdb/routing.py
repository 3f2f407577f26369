"""Where a read goes: the whole decision, in one function.

:func:`choose_read_route` is pure: it looks at the request's state and the
pinning mode and returns a :class:`Route`. The rules are checked in order and
the first that matches wins. The only thing it cannot know by itself is how
far a replica has replayed; for that it returns a replica route with
``min_lsn`` set, and the session checks that position on the very connection
that will serve the reads (see :mod:`fastapi_rwdb.sessions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .health import ReadSideHealth
from .state import RequestState

PinMode = Literal["lsn", "window", "off"]


@dataclass(frozen=True, slots=True)
class Route:
    target: Literal["replica", "primary"]
    reason: str
    min_lsn: int | None = None  # replica only once it has replayed this far


REPLICA = Route("replica", "default")


def choose_read_route(
    state: RequestState | None, mode: PinMode, health: ReadSideHealth | None = None
) -> Route:
    # 1. The read side refused several connections in a row: the primary serves
    #    until the breaker lets a read try the replicas again.
    if health is not None and health.read_side_down:
        return Route("primary", "replica-down")
    # 2. The background check found the replicas too far behind (RWDB_MAX_REPLICA_LAG).
    if health is not None and health.lag_exceeded:
        return Route("primary", "replica-lag")
    # 3. Outside a request (workers, scripts) nothing was written by "this client".
    if state is None:
        return REPLICA
    # 4. This request committed a write: its own reads must see it, and only the
    #    primary is certain to have it.
    if state.commit_lsn is not None:
        return Route("primary", "wrote-in-request")
    # 5. No (valid) token: the client has written nothing recently.
    if state.token is None or mode == "off":
        return REPLICA
    # 6. Time-window mode: pinned until the token expires.
    if mode == "window":
        return Route("primary", "pinned")
    # 7. A replica was already found to be behind in this request: stay consistent.
    if state.replica_behind:
        return Route("primary", "replica-behind")
    # 8. Otherwise a replica may serve, if it has replayed the client's last write.
    #    (Checked per session: another session may get a connection to another
    #    replica, which can be further behind.)
    return Route("replica", "lsn-check", min_lsn=state.token.lsn)
