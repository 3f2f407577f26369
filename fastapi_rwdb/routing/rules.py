"""Where a read goes: the whole decision, as two pure functions.

:func:`choose_read_route` looks at the request's state, the pinning mode and the
read side's health, and returns a :class:`Route`. Its rules are checked in
order and the first that matches wins.

What no rule can know in advance is how far the replica behind a given pooled
connection has replayed: through HAProxy's read port each connection stays on
one node, and another connection may reach another replica. For that,
``choose_read_route`` returns a replica route with ``min_lsn`` set, and the read
session asks :func:`next_replica_step` what to do after each thing it observes
(a connection checked out and its position read, a connection lost, a pause
spent waiting): try another connection, take one, wait for the most advanced
to catch up, or go to the primary. The session only carries the steps out
(:mod:`fastapi_rwdb.orm.reads`), so every branch of the decision is here and
unit-tested without a database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..settings import PinMode
from .replicas import ReadSideHealth
from .request import RequestState

__all__ = [
    "REPLICA",
    "TRIES",
    "Poll",
    "Primary",
    "ReplicaStep",
    "Route",
    "Seen",
    "Take",
    "TryAnother",
    "choose_read_route",
    "far_enough",
    "next_replica_step",
    "passed_reason",
]


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
        return _replica_route(lag_floor, None)
    # 4. This request committed a write: its own reads must see it, and only the
    #    primary is certain to have it.
    if state.commit_lsn is not None:
        return Route("primary", "wrote-in-request")
    # 5. No (valid) token and nothing seen yet: the client has written nothing recently.
    if mode == "off" or (state.token is None and state.seen_lsn is None):
        return _replica_route(lag_floor, None)
    # 6. Time-window mode: pinned until the token expires.
    if mode == "window":
        return Route("primary", "pinned")
    # 7. A replica was already found to lack what this client needs, in this request:
    #    the request's reads stay where they can see it.
    if state.replica_behind:
        return Route("primary", "replica-behind")
    # 8. Otherwise a replica serves if it has replayed the client's last write (and,
    #    in session consistency, everything the client has read). Checked on each
    #    session's own connection (next_replica_step).
    return _replica_route(lag_floor, state.needed_lsn)


def _replica_route(lag_floor: int | None, client_lsn: int | None) -> Route:
    """A replica route that needs the higher of the lag floor and the client's position."""
    if client_lsn is None:
        if lag_floor is None:
            return REPLICA
        return Route("replica", "lag-check", min_lsn=lag_floor, if_behind="replica-lag")
    if lag_floor is not None and lag_floor > client_lsn:
        return Route("replica", "lsn-check", min_lsn=lag_floor, if_behind="replica-lag")
    return Route("replica", "lsn-check", min_lsn=client_lsn)


# -- which connection, for a route that needs a position ------------------------------

#: Replica connections a read may check, one after another, before the primary. Each is
#: one more pooled connection (perhaps to another replica) and one round trip.
TRIES = 3

#: The reason a read that found its position reports, by the route's reason.
_PASSED = {"lsn-check": "caught-up", "lag-check": "within-lag"}


@dataclass(frozen=True, slots=True)
class Seen:
    """What one replica connection showed the read."""

    position: int | None = None  # the WAL position its server has replayed
    lost: bool = False  # it failed while checked out or asked: discarded
    unreachable: bool = False  # none could be opened (the connect retry gave up): lost too
    remembered: bool = False  # its position from moments ago, known without a round trip
    benched: bool = False  # unreachable as every new connection reached a benched replica


@dataclass(frozen=True, slots=True)
class TryAnother:
    """Check out one more replica connection and read its position. ``begin``: let the
    position query open the session's transaction too (only worth it on the first
    try: a connection found behind would need a ROLLBACK before going back)."""

    begin: bool


@dataclass(frozen=True, slots=True)
class Take:
    """Serve the reads on connection ``index``; ``reason`` for the routing header."""

    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class Poll:
    """Sleep a moment, then ask connection ``index`` (the most advanced) again."""

    index: int


@dataclass(frozen=True, slots=True)
class Primary:
    """No replica connection has the position: the primary serves, for ``reason``."""

    reason: str


ReplicaStep = TryAnother | Take | Poll | Primary


def next_replica_step(
    route: Route, seen: Sequence[Seen], *, idle: int, wait: float, waited: float | None
) -> ReplicaStep:
    """What a read that needs ``route.min_lsn`` does next, given what it has ``seen``.

    ``idle``: connections idle in the replica pool now. ``wait``: how long it may
    wait for a replica to catch up (``RWDB_PIN_WAIT_MS``, or the session's own);
    ``waited``: how long it has waited so far, ``None`` before it began to.
    The caller holds every connection in ``seen`` that is not lost until it has
    taken one, so the pool cannot hand the same connection back twice.
    """
    # One pass over what was seen (this runs on every read that needs a position).
    held = tries = 0
    best = -1  # the most advanced connection held
    unreachable = False  # a connect gave up
    benched = False  # ... because every connection it opened reached a benched replica
    for i, one in enumerate(seen):
        if one.lost:
            tries += 1
            unreachable = unreachable or one.unreachable
            benched = benched or one.benched
            continue
        # 1. A connection whose server has replayed far enough serves.
        if far_enough(one.position, route.min_lsn):
            return Take(i, passed_reason(route))
        held += 1
        tries += not one.remembered
        if best < 0 or (one.position or -1) > (seen[best].position or -1):
            best = i
    # 2. The read port could not be opened at all (its connect retry gave up, or each
    #    new connection reached a benched replica): another try would pay the same
    #    again; the primary serves this read, and the breaker, told by the connect
    #    retry, spares later ones the attempt.
    if unreachable:
        return Primary("replica-benched" if benched else "replica-unreachable")
    # 3. Before any waiting: another connection, perhaps to another replica, while tries
    #    are left. One known to be behind from moments ago cost no round trip, so it
    #    used no try (a paused replica's connections must not use up a read's tries).
    #    Once some are held, only an idle one is taken: the check never waits for the pool.
    if waited is None and tries < TRIES and not (held and idle == 0):
        return TryAnother(begin=tries == 0)
    # 4. Give the most advanced of them a little time to catch up.
    if held and wait > 0 and (waited or 0.0) < wait:
        return Poll(best)
    # 5. None has it in time: the primary, which is certain to.
    return Primary(route.if_behind)


def passed_reason(route: Route) -> str:
    """The reason a read reports when a replica had the position ``route`` needs."""
    return _PASSED.get(route.reason, route.reason)


def far_enough(position: int | None, min_lsn: int | None) -> bool:
    """Whether a server at ``position`` may serve a read that needs ``min_lsn``."""
    return min_lsn is None or (position is not None and position >= min_lsn)
