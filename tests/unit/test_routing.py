"""The routing rules and the replica view, rule by rule. No database: pure logic."""

from __future__ import annotations

import time

import pytest

from fastapi_rwdb.routing.replicas import ReadSideHealth
from fastapi_rwdb.routing.request import RequestState
from fastapi_rwdb.routing.rules import (
    TRIES,
    Poll,
    Primary,
    ReplicaStep,
    Route,
    Seen,
    Take,
    TryAnother,
    choose_read_route,
    next_replica_step,
)
from fastapi_rwdb.routing.tokens import Token
from fastapi_rwdb.settings import PinMode

T = Token(lsn=1000, expires=2**31)


def viewed(
    rows: list[tuple[str, str, int | None]], primary: int = 2000, **kw: float
) -> ReadSideHealth:
    health = ReadSideHealth(**kw)  # type: ignore[arg-type]
    health.record_view(primary, rows)
    return health


@pytest.mark.parametrize(
    ("state", "mode", "expected"),
    [
        (None, "lsn", Route("replica", "default")),
        (RequestState(), "lsn", Route("replica", "default")),
        (RequestState(token=T), "lsn", Route("replica", "lsn-check", min_lsn=1000)),
        (RequestState(token=T), "off", Route("replica", "default")),
        (RequestState(token=T), "window", Route("primary", "pinned")),
        (RequestState(token=T, commit_lsn=5), "lsn", Route("primary", "wrote-in-request")),
        (RequestState(commit_lsn=5), "window", Route("primary", "wrote-in-request")),
        (RequestState(token=T, replica_behind=True), "lsn", Route("primary", "replica-behind")),
        # session consistency: what the client has seen counts like what it wrote
        (RequestState(seen_lsn=1500), "lsn", Route("replica", "lsn-check", min_lsn=1500)),
        (RequestState(token=T, seen_lsn=900), "lsn", Route("replica", "lsn-check", min_lsn=1000)),
    ],
)
def test_rules_without_health(state: RequestState | None, mode: PinMode, expected: Route) -> None:
    assert choose_read_route(state, mode, None) == expected


def test_a_refusing_read_side_sends_everything_to_the_primary() -> None:
    health = ReadSideHealth(fallback_after=1, retry_seconds=60)
    health.connect_failed()
    assert choose_read_route(None, "lsn", health) == Route("primary", "replica-down")
    assert choose_read_route(RequestState(token=T), "lsn", health).reason == "replica-down"


def test_every_replica_too_far_behind_sends_reads_to_the_primary() -> None:
    health = ReadSideHealth(max_lag=0.5, interval=0.1)
    base = time.monotonic() - 2.0
    stuck = [("a", "streaming", 100), ("b", "streaming", 100)]
    for offset, primary in ((0.0, 100), (0.5, 200), (1.0, 300), (1.9, 400)):
        health.record_view(primary, stuck, now=base + offset)
    # Both lack WAL the primary had 1.4 s before the last look.
    assert [r.lag_seconds for r in health.replicas] == [pytest.approx(1.4)] * 2
    assert health.lag_exceeded
    assert choose_read_route(None, "lsn", health) == Route("primary", "replica-lag")
    health.record_view(400, [("a", "streaming", 100), ("b", "streaming", 400)], now=base + 2.0)
    assert not health.lag_exceeded  # b is current: reads try the replicas again
    assert choose_read_route(None, "lsn", health).target == "replica"


def test_the_lag_limit_becomes_a_position_each_connection_must_have() -> None:
    health = ReadSideHealth(max_lag=1.0, interval=0.5)
    for now, lsn in ((100.0, 10), (100.5, 20), (101.0, 30), (101.5, 40)):
        health.record_view(lsn, [("a", "streaming", lsn)], now=now)
    # The primary's position as of one second before 101.5 is 20 (recorded at 100.5).
    assert health.lag_floor(now=101.5) == 20
    assert health.lag_seconds_of(19, now=101.5) == pytest.approx(1.0)  # lacks 20, from 100.5
    assert health.lag_seconds_of(40, now=101.5) == 0.0
    health.fresh = lambda now=None: True  # type: ignore[method-assign]
    route = choose_read_route(None, "lsn", health)
    assert route.target == "replica" and route.min_lsn is not None
    assert route.if_behind == "replica-lag"


def test_a_client_token_and_the_lag_limit_take_the_stricter_position() -> None:
    health = ReadSideHealth(max_lag=1.0)
    health.lag_floor = lambda now=None: 5000  # type: ignore[method-assign]
    route = choose_read_route(RequestState(token=T), "lsn", health)
    assert (route.min_lsn, route.if_behind) == (5000, "replica-lag")
    health.lag_floor = lambda now=None: 10  # type: ignore[method-assign]
    route = choose_read_route(RequestState(token=T), "lsn", health)
    assert (route.min_lsn, route.if_behind) == (1000, "replica-behind")


def test_no_lag_floor_without_a_fresh_view() -> None:
    health = ReadSideHealth(max_lag=1.0, interval=1.0)
    assert health.lag_floor() is None  # nothing seen yet
    health.record_view(10, [("a", "streaming", 10)], now=0.0)
    assert health.lag_floor(now=100.0) is None  # stale: no check rather than a wrong one


@pytest.mark.parametrize(
    ("rows", "expected_replicas", "lsn", "answer"),
    [
        ([("a", "streaming", 2000), ("b", "streaming", 2000)], None, 1500, True),
        ([("a", "streaming", 2000), ("b", "streaming", 1000)], None, 1500, False),
        ([("a", "streaming", 2000)], 2, 1500, False),  # one expected replica missing
        ([("a", "streaming", 2000), ("b", "catchup", 2000)], None, 1500, True),
        ([("a", "streaming", None)], None, 1, False),  # positions hidden (no pg_monitor)
        ([], None, 1, False),
    ],
)
def test_all_replayed(
    rows: list[tuple[str, str, int | None]], expected_replicas: int | None, lsn: int, answer: bool
) -> None:
    health = ReadSideHealth(expected_replicas=expected_replicas)
    health.record_view(2000, rows)
    assert health.all_replayed(lsn) is answer


def test_a_replica_that_stops_streaming_keeps_tokens_until_it_is_back() -> None:
    health = ReadSideHealth()
    both = [("a", "streaming", 2000), ("b", "streaming", 2000)]
    health.record_view(2000, both)
    assert health.all_replayed(1500)
    health.record_view(2000, both[:1])  # b is gone from pg_stat_replication
    assert not health.all_replayed(1500)
    health.record_view(2000, both)
    assert health.all_replayed(1500)


def test_a_stale_view_answers_no() -> None:
    health = ReadSideHealth(interval=1.0)
    health.record_view(2000, [("a", "streaming", 2000)], now=0.0)
    assert health.all_replayed(1, now=1.0)
    assert not health.all_replayed(1, now=60.0)


# -- which replica connection: next_replica_step, branch by branch ---------------------

NEED = Route("replica", "lsn-check", min_lsn=1000)
LAG = Route("replica", "lag-check", min_lsn=1000, if_behind="replica-lag")


def step(route: Route, seen: list[Seen], *, idle: int = 5, wait: float = 0.0,
         waited: float | None = None) -> ReplicaStep:  # fmt: skip
    return next_replica_step(route, seen, idle=idle, wait=wait, waited=waited)


def test_the_first_try_opens_the_transaction_with_the_ping() -> None:
    assert step(NEED, []) == TryAnother(begin=True)


def test_a_connection_that_has_the_position_is_taken_with_the_passed_reason() -> None:
    assert step(NEED, [Seen(1000)]) == Take(0, "caught-up")
    assert step(LAG, [Seen(900), Seen(1200)]) == Take(1, "within-lag")
    # no position needed (session consistency with no token): the first connection serves
    assert step(Route("replica", "default"), [Seen(None)]) == Take(0, "default")


def test_a_connection_behind_leads_to_another_that_does_not_begin() -> None:
    assert step(NEED, [Seen(900)]) == TryAnother(begin=False)


def test_tries_are_bounded() -> None:
    behind = [Seen(900)] * TRIES
    assert step(NEED, behind) == Primary("replica-behind")
    assert step(LAG, behind) == Primary("replica-lag")


def test_a_connection_known_behind_uses_no_try() -> None:
    remembered = [Seen(900, remembered=True)] * 5
    assert step(NEED, remembered) == TryAnother(begin=True)  # still the first real try
    assert step(NEED, [*remembered, Seen(900), Seen(900)]) == TryAnother(begin=False)
    assert step(NEED, [*remembered, *[Seen(900)] * TRIES]) == Primary("replica-behind")


def test_a_lost_connection_uses_a_try_and_is_never_taken() -> None:
    assert step(NEED, [Seen(lost=True)]) == TryAnother(begin=False)
    assert step(NEED, [Seen(lost=True)] * TRIES) == Primary("replica-behind")
    # lost ones are not held: with nothing held, the pool may be waited for
    assert step(NEED, [Seen(lost=True)], idle=0) == TryAnother(begin=False)


def test_a_read_port_that_cannot_be_opened_sends_the_read_to_the_primary_at_once() -> None:
    """Issue 20, item 11: the connect retry already spent its attempts; another try
    would pay them again, and waiting for a held one would not help this read."""
    gone = Seen(lost=True, unreachable=True)
    assert step(NEED, [gone]) == Primary("replica-unreachable")
    assert step(LAG, [Seen(900), gone], wait=0.5) == Primary("replica-unreachable")
    # one already found far enough still serves
    assert step(NEED, [Seen(1000), gone]) == Take(0, "caught-up")


def test_no_idle_connection_ends_the_tries_once_one_is_held() -> None:
    assert step(NEED, [Seen(900)], idle=0) == Primary("replica-behind")
    assert step(NEED, [], idle=0) == TryAnother(begin=True)  # the first may wait for the pool


def test_the_most_advanced_is_waited_for_within_the_wait() -> None:
    seen = [Seen(800), Seen(950), Seen(900)]
    assert step(NEED, seen, wait=0.5) == Poll(1)
    assert step(NEED, seen, wait=0.5, waited=0.2) == Poll(1)
    assert step(NEED, seen, wait=0.5, waited=0.5) == Primary("replica-behind")
    assert step(NEED, [*seen[:1], Seen(1000), seen[2]], wait=0.5, waited=0.2) == Take(
        1, "caught-up"
    )


def test_waiting_never_goes_back_to_trying() -> None:
    # Once waiting began, an idle pool and tries left do not start new tries.
    assert step(NEED, [Seen(900)], idle=0, wait=0.5, waited=0.01) == Poll(0)


def test_a_connection_lost_while_waiting_passes_the_wait_to_the_next() -> None:
    seen = [Seen(900), Seen(lost=True)]
    assert step(NEED, seen, wait=0.5, waited=0.1) == Poll(0)
    assert step(NEED, [Seen(lost=True)] * 2, wait=0.5, waited=0.1) == Primary("replica-behind")
