"""Where a read goes: the whole decision, in one function.

:func:`choose_read_route` looks at the request's state, the pinning mode and
the read side's health, and returns a :class:`Route`. The rules are checked in
order and the first that matches wins. The one thing it cannot know is how far
the replica behind a given connection has replayed: for that it returns a
replica route with ``min_lsn`` set, and the session checks that position on the
very connection that will serve the reads (see :mod:`fastapi_rwdb.sessions`),
trying another pooled connection (another replica, perhaps) before the primary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .health import ReadSideHealth
from .settings import PinMode
from .state import RequestState

__all__ = ["REPLICA", "PinMode", "Route", "choose_read_route"]


@dataclass(frozen=True, slots=True)
class Route:
    target: Literal["replica", "primary"]
    reason: str
    min_lsn: int | None = None  # replica only once it has replayed this far ...
    if_behind: str = "replica-behind"  # ... else the primary, for this reason


REPLICA = Route("replica", "default")


def choose_read_route(
    state: RequestState | None, mode: PinMode, health: ReadSideHealth | None = None
) -> Route:
    # 1. The read side refused several connections in a row: the primary serves
    #    until the breaker lets a read try the replicas again.
    if health is not None and health.read_side_down:
        return Route("primary", "replica-down")
    # 2. Every replica is further behind than RWDB_MAX_REPLICA_LAG: none need be tried.
    if health is not None and health.lag_exceeded:
        return Route("primary", "replica-lag")
    # Otherwise a replica may serve only if it has replayed the primary's position of
    # RWDB_MAX_REPLICA_LAG seconds ago (None: no limit, or no recent view to tell).
    lag_floor = health.lag_floor() if health is not None else None
    # 3. Outside a request (workers, scripts) nothing was written by "this client".
    if state is None:
        return _replica_at_least(lag_floor, None)
    # 4. This request committed a write: its own reads must see it, and only the
    #    primary is certain to have it.
    if state.commit_lsn is not None:
        return Route("primary", "wrote-in-request")
    # 5. No (valid) token and nothing seen yet: the client has written nothing recently.
    if mode == "off" or (state.token is None and state.seen_lsn is None):
        return _replica_at_least(lag_floor, None)
    # 6. Time-window mode: pinned until the token expires.
    if mode == "window":
        return Route("primary", "pinned")
    # 7. A replica was already found to lack what this client needs, in this request:
    #    the request's reads stay where they can see it.
    if state.replica_behind:
        return Route("primary", "replica-behind")
    # 8. Otherwise a replica serves if it has replayed the client's last write (and,
    #    in session consistency, everything the client has read). Checked on each
    #    session's own connection: another connection may reach another replica,
    #    which can be further behind.
    return _replica_at_least(lag_floor, state.needed_lsn)


def _replica_at_least(lag_floor: int | None, client_lsn: int | None) -> Route:
    if client_lsn is None:
        if lag_floor is None:
            return REPLICA
        return Route("replica", "lag-check", min_lsn=lag_floor, if_behind="replica-lag")
    if lag_floor is not None and lag_floor > client_lsn:
        return Route("replica", "lsn-check", min_lsn=lag_floor, if_behind="replica-lag")
    return Route("replica", "lsn-check", min_lsn=client_lsn)
