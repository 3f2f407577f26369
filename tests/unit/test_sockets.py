"""engine/sockets.py: libpq's keepalive parameters, the options set on an asyncpg socket,
the fallback when asyncpg's private transport is gone, and the contract with asyncpg."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from fastapi_rwdb import RWDBSettings, connect_args
from fastapi_rwdb.engine import sockets

TCP = socket.IPPROTO_TCP


def settings(**values: Any) -> RWDBSettings:
    return RWDBSettings(password="x", **values)


class _Transport:
    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None


class _Driver:
    """Stands in for an asyncpg.Connection: only the attribute the module reads."""

    def __init__(self, sock: socket.socket | None) -> None:
        self._transport = _Transport(sock)


@pytest.fixture
def tcp_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    yield sock
    sock.close()


@pytest.fixture(autouse=True)
def _rearm_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sockets, "_warned", False)


def test_asyncpg_connection_still_has_its_transport() -> None:
    """The contract: if this fails on an asyncpg release, asyncpg connections run
    without keepalives (the fallback warns); find the socket another way."""
    assert sockets.ASYNCPG_TRANSPORT_ATTRIBUTE in asyncpg.connection.Connection.__slots__


def test_libpq_params_default_and_off() -> None:
    assert sockets.libpq_params(settings()) == {
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 3,
        "keepalives_count": 3,
        "tcp_user_timeout": 20000,
    }
    assert sockets.libpq_params(settings(tcp_keepalives=False, tcp_user_timeout=0)) == {
        "keepalives": 0
    }


def test_psycopg_connect_args_carry_them_asyncpg_none() -> None:
    s = settings(tcp_keepalives_idle=5, tcp_user_timeout=1.5)
    args = connect_args("psycopg", s)
    assert (args["keepalives_idle"], args["tcp_user_timeout"]) == (5, 1500)
    assert not any(k.startswith(("keepalives", "tcp_")) for k in connect_args("asyncpg", s))


def test_options_are_set_on_a_tcp_socket(tcp_socket: socket.socket) -> None:
    s = settings(
        tcp_keepalives_idle=7,
        tcp_keepalives_interval=2,
        tcp_keepalives_count=4,
        tcp_user_timeout=9.5,
    )
    assert sockets.set_socket_options(_Driver(tcp_socket), s) is True
    assert tcp_socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert tcp_socket.getsockopt(TCP, socket.TCP_KEEPIDLE) == 7
    assert tcp_socket.getsockopt(TCP, socket.TCP_KEEPINTVL) == 2
    assert tcp_socket.getsockopt(TCP, socket.TCP_KEEPCNT) == 4
    assert tcp_socket.getsockopt(TCP, socket.TCP_USER_TIMEOUT) == 9500


def test_off_sets_nothing(tcp_socket: socket.socket) -> None:
    s = settings(tcp_keepalives=False, tcp_user_timeout=0)
    assert sockets.socket_options(s) == []
    assert sockets.set_socket_options(_Driver(tcp_socket), s) is True
    assert tcp_socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


def test_unix_socket_is_left_alone() -> None:
    left, right = socket.socketpair()
    with left, right:
        assert sockets.set_socket_options(_Driver(left), settings()) is True


def test_no_transport_warns_once_and_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    class Bare:
        pass

    with caplog.at_level(logging.WARNING, logger="fastapi_rwdb"):
        assert sockets.set_socket_options(Bare(), settings()) is False
        assert sockets.set_socket_options(_Driver(None), settings()) is False
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "TCP keepalives and TCP_USER_TIMEOUT are not set on asyncpg" in warnings[0]


def test_a_failed_setsockopt_warns(caplog: pytest.LogCaptureFixture) -> None:
    class Closed:
        family = socket.AF_INET

        def setsockopt(self, *args: Any) -> None:
            raise OSError(9, "Bad file descriptor")

    with caplog.at_level(logging.WARNING, logger="fastapi_rwdb"):
        assert sockets.set_socket_options(_Driver(Closed()), settings()) is False  # type: ignore[arg-type]
    assert "setsockopt failed (Bad file descriptor)" in caplog.text
