"""The read deadline's pure parts (engine/deadline.py): the server's statement
timeout, the connect bound, and the watchdog that ends a wait on a socket."""

from __future__ import annotations

import socket
import time

import pytest

from fastapi_rwdb.engine.deadline import (
    _WATCHDOG,
    DeadlineConnection,
    bound_connect,
    server_timeout_ms,
    set_local,
)


@pytest.mark.parametrize(
    ("deadline", "ms"), [(5.0, 4000), (1.0, 800), (0.5, 400), (30.0, 29000), (0.001, 1)]
)
def test_the_server_gives_up_a_little_before_the_client(deadline: float, ms: int) -> None:
    assert server_timeout_ms(deadline) == ms
    assert set_local(deadline) == f"SET LOCAL statement_timeout = {ms}"


def test_a_read_connect_is_bounded_by_the_deadline() -> None:
    sync = {"connect_timeout": 5}
    bound_connect(sync, 1.0, is_async=False, side="read")
    assert sync == {"connect_timeout": 2}  # psycopg: whole seconds, at least 2
    aio: dict[str, object] = {"timeout": 5.0}
    bound_connect(aio, 1.5, is_async=True, side="read")
    assert aio == {"timeout": 1.5, "connection_class": DeadlineConnection}
    off = {"connect_timeout": 5}
    bound_connect(off, 0, is_async=False, side="read")
    assert off == {"connect_timeout": 5}


def test_the_watchdog_ends_a_wait_on_a_silent_socket_at_the_deadline() -> None:
    ours, theirs = socket.socketpair()
    try:
        watch = _WATCHDOG.arm(ours.fileno(), 0.2)
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
        watch = _WATCHDOG.arm(ours.fileno(), 0.1)
        assert watch.disarm() is False
        time.sleep(0.3)
        theirs.sendall(b"x")
        ours.settimeout(1)
        assert ours.recv(1) == b"x"  # still open both ways
    finally:
        ours.close()
        theirs.close()
