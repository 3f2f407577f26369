"""The read deadline's pure parts (engine/deadline.py): the server's statement
timeout, the connect bound; and the watchdog that ends a wait on a socket
(engine/watchdog.py)."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import socket
import sys
import time
import weakref
from typing import Any

import pytest

from fastapi_rwdb.engine import deadline
from fastapi_rwdb.engine.asyncpg_connection import PackageConnection
from fastapi_rwdb.engine.deadline import ConnectBudget, server_timeout_ms, set_local
from fastapi_rwdb.engine.watchdog import WATCHDOG, AsyncWatch


@pytest.mark.parametrize(
    ("deadline", "ms"), [(5.0, 4000), (1.0, 800), (0.5, 400), (30.0, 29000), (0.001, 1)]
)
def test_the_server_gives_up_a_little_before_the_client(deadline: float, ms: int) -> None:
    assert server_timeout_ms(deadline) == ms
    assert set_local(deadline) == f"SET LOCAL statement_timeout = {ms}"


def test_a_read_connect_is_bounded_by_the_deadline() -> None:
    sync = {"connect_timeout": 5}
    ConnectBudget(sync, 1.0, is_async=False, side="read").next_attempt(sync)
    assert sync == {"connect_timeout": 2}  # psycopg: whole seconds, at least 2
    aio: dict[str, object] = {"timeout": 5.0}
    ConnectBudget(aio, 1.5, is_async=True, side="read").next_attempt(aio)
    assert aio["connection_class"] is PackageConnection
    assert aio["timeout"] == pytest.approx(1.5, abs=0.01)  # too short to keep a retry's time
    off = {"connect_timeout": 5}
    ConnectBudget(off, 0, is_async=False, side="read").next_attempt(off)
    assert off == {"connect_timeout": 5}


def test_all_attempts_of_a_connect_share_the_deadline() -> None:
    """A frozen first attempt leaves room for one more (HAProxy sends it elsewhere); no
    attempt is begun that could end after the deadline."""
    sync: dict[str, object] = {"connect_timeout": 30}
    budget = ConnectBudget(sync, 5.0, is_async=False, side="read")
    assert budget.next_attempt(sync) and sync["connect_timeout"] == 2  # 5 s less a retry's 2.5
    assert budget.next_attempt(sync, after=2.2) and sync["connect_timeout"] == 2  # 2.8 left
    assert not budget.next_attempt(sync, after=3.5)  # 1.5 left: psycopg cannot wait less than 2
    aio: dict[str, object] = {}
    budget = ConnectBudget(aio, 5.0, is_async=True, side="write")
    assert budget.next_attempt(aio) and aio["timeout"] == pytest.approx(3.75, abs=0.01)
    assert budget.next_attempt(aio, after=3.9) and aio["timeout"] == pytest.approx(1.1, abs=0.01)
    assert not budget.next_attempt(aio, after=4.5)
    unbounded: dict[str, object] = {"connect_timeout": 5}
    budget = ConnectBudget(unbounded, 0, is_async=False, side="read")
    assert all(budget.next_attempt(unbounded, after=60) for _ in range(5))


def test_the_watchdog_ends_a_wait_on_a_silent_socket_at_the_deadline() -> None:
    ours, theirs = socket.socketpair()
    try:
        watch = WATCHDOG.arm(ours.fileno(), 0.2)
        ours.settimeout(5)
        started = time.monotonic()
        assert ours.recv(1) == b""  # shut down: the wait ends, as EOF
        took = time.monotonic() - started
        assert 0.15 < took < 1.5
        assert watch.disarm() is True
        assert ours.fileno() >= 0  # the descriptor itself stays the driver's
    finally:
        ours.close()
        theirs.close()


def test_a_watch_disarmed_in_time_never_fires() -> None:
    ours, theirs = socket.socketpair()
    try:
        watch = WATCHDOG.arm(ours.fileno(), 0.1)
        assert watch.disarm() is False
        time.sleep(0.3)
        theirs.sendall(b"x")
        ours.settimeout(1)
        assert ours.recv(1) == b"x"  # still open both ways
    finally:
        ours.close()
        theirs.close()


def test_a_short_deadline_armed_after_a_long_one_fires_on_time() -> None:
    # The watchdog sleeps until the nearest deadline it knows: a shorter one armed
    # later (a route's own timeout, another side's) must wake it.
    ours, theirs = socket.socketpair()
    other, peer = socket.socketpair()
    try:
        long = WATCHDOG.arm(other.fileno(), 30.0)
        time.sleep(0.05)  # the thread now sleeps until the long one is due
        short = WATCHDOG.arm(ours.fileno(), 0.2)
        ours.settimeout(5)
        started = time.monotonic()
        assert ours.recv(1) == b""
        assert time.monotonic() - started < 1.5
        assert short.disarm() is True
        assert long.disarm() is False  # not due: untouched
    finally:
        for s in (ours, theirs, other, peer):
            s.close()


def test_a_disarmed_watch_is_not_kept() -> None:
    # Held only while armed: thousands of statements a second under load would
    # otherwise keep thousands of objects alive for the whole deadline.
    ours, theirs = socket.socketpair()
    try:
        watch = WATCHDOG.arm(ours.fileno(), 60.0)
        armed = sys.getrefcount(watch)
        assert watch.disarm() is False
        assert sys.getrefcount(watch) == armed - 1  # the watchdog let go of it
    finally:
        ours.close()
        theirs.close()


class _Connection:
    """What an asyncpg watch needs of its connection: terminate()."""

    def __init__(self) -> None:
        self.terminated_at: float | None = None

    def terminate(self) -> None:
        self.terminated_at = time.monotonic()


async def test_the_event_loop_terminates_an_asyncpg_connection_at_its_deadline() -> None:
    slow, quick, late = _Connection(), _Connection(), _Connection()
    started = time.monotonic()
    watch = AsyncWatch(slow, 0.2)
    answered = AsyncWatch(quick, 0.1)
    assert answered.disarm() is False
    long = AsyncWatch(late, 30.0)
    short = AsyncWatch(late, 0.05)  # armed after a longer one: its timer moves closer
    await asyncio.sleep(0.1)
    assert short.disarm() is True and late.terminated_at is not None
    assert long.disarm() is False
    await asyncio.sleep(0.2)
    assert watch.disarm() is True
    assert slow.terminated_at is not None and 0.15 < slow.terminated_at - started < 1.0
    assert quick.terminated_at is None  # disarmed in time: untouched


async def test_a_disarmed_asyncpg_watch_is_not_kept() -> None:
    watch = AsyncWatch(_Connection(), 60.0)
    armed = sys.getrefcount(watch)
    assert watch.disarm() is False
    assert sys.getrefcount(watch) == armed - 1  # the loop's watchdog let go of it


class _Request:
    pass


_CURRENT: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("current")


async def test_the_loop_timer_keeps_no_request_alive() -> None:
    # The timer is set by whichever statement arms first: in that request's context,
    # it would hold the request's state until it fires, seconds later.
    request = _Request()
    gone = weakref.ref(request)
    reset = _CURRENT.set(request)
    watch = AsyncWatch(_Connection(), 30.0)  # this loop's first: it sets the timer
    _CURRENT.reset(reset)
    del request
    gc.collect()
    assert gone() is None
    assert watch.disarm() is False


def test_the_begin_rides_with_the_first_statement_only_while_the_pool_is_quiet() -> None:
    from types import SimpleNamespace

    from fastapi_rwdb.engine.deadline import PIPELINE_WHILE_IN_USE, quiet

    def engine(in_use: int) -> Any:
        return SimpleNamespace(pool=SimpleNamespace(checkedout=lambda: in_use))

    assert quiet(engine(1))
    assert quiet(engine(PIPELINE_WHILE_IN_USE))
    assert not quiet(engine(PIPELINE_WHILE_IN_USE + 1))
    assert quiet(SimpleNamespace(pool=object()))  # no count: as before


class _Terminated(PackageConnection):
    """A package connection as asyncpg leaves it once terminated: no protocol left."""

    def __init__(self) -> None:  # (asyncpg's own needs a server)
        self._aborted = True
        self._protocol = None

    def __del__(self) -> None:
        pass


def test_a_terminated_asyncpg_connection_is_asked_nothing_it_cannot_answer() -> None:
    """SQLAlchemy rolls back connections it terminated after a lost connection (a
    switchover): the question whether a transaction is open must not raise
    AttributeError there (a 500 in CI's switchover scenario), but leave the rollback to
    raise the driver's own error, watched as before; nor may a check ride on it."""
    raw = _Terminated()
    assert deadline._nothing_to_end(raw) is False
    assert deadline._carries_check(raw) is False


class _Stuck(_Connection):
    def terminate(self) -> None:
        raise RuntimeError("cannot")


async def test_one_connection_that_cannot_be_ended_stops_no_other_watch() -> None:
    stuck, other = _Stuck(), _Connection()
    first = AsyncWatch(stuck, 0.05)
    second = AsyncWatch(other, 0.05)
    later = AsyncWatch(_Connection(), 0.2)
    await asyncio.sleep(0.4)
    assert first.disarm() and second.disarm() and later.disarm()
    assert other.terminated_at is not None


def test_an_event_loop_that_ended_is_not_kept() -> None:
    # A test suite makes a loop per test: the deadline's per-loop state must not keep
    # one alive, armed once or with a timer still set when it closed.
    loop = asyncio.new_event_loop()

    async def arm() -> None:
        AsyncWatch(_Connection(), 30.0).disarm()

    loop.run_until_complete(arm())
    loop.close()
    gone = weakref.ref(loop)
    del loop
    gc.collect()
    assert gone() is None
