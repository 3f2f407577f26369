"""TCP keepalives and ``TCP_USER_TIMEOUT`` on every connection, both drivers.

A host that vanishes without closing its sockets (power loss, a partitioned
network, a VM frozen by its hypervisor) sends no FIN and no RST. Without these
options a connection to it stays open for as long as the kernel keeps
retransmitting (about 15 minutes on Linux) when a statement was sent, and for
ever when it sits idle in the pool. Keepalive probes find an idle connection's
dead peer; ``TCP_USER_TIMEOUT`` bounds how long sent data may go unacknowledged.
Neither touches a slow statement on a live server: its kernel acknowledges the
statement at once and answers the probes while PostgreSQL works.

psycopg passes them to libpq, which sets them itself (``keepalives*`` and
``tcp_user_timeout`` connection parameters). asyncpg has no such parameters
(``server_settings`` are PostgreSQL's, not the client socket's), so they are set
on its socket right after it connects. That socket is reached through
``asyncpg.Connection._transport``, a private attribute: this module is the only
place that touches it. Fallback: when an asyncpg release no longer has it, the
connection is used without the options and a warning says so once;
``tests/unit/test_sockets.py`` fails on that release, and
``tests/stack/test_keepalives.py`` reads the options back from real sockets.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from ..settings import RWDBSettings

logger = logging.getLogger("fastapi_rwdb")

__all__ = ["asyncpg_socket", "libpq_params", "set_socket_options", "socket_options"]

#: The private attribute of ``asyncpg.Connection`` that holds its asyncio transport.
ASYNCPG_TRANSPORT_ATTRIBUTE = "_transport"

_warned = False

# Linux names the idle time TCP_KEEPIDLE, macOS TCP_KEEPALIVE; TCP_USER_TIMEOUT is
# Linux-only. An option the platform lacks is left to the kernel, as libpq does.
_KEEPIDLE: int | None = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))
_KEEPINTVL: int | None = getattr(socket, "TCP_KEEPINTVL", None)
_KEEPCNT: int | None = getattr(socket, "TCP_KEEPCNT", None)
_USER_TIMEOUT: int | None = getattr(socket, "TCP_USER_TIMEOUT", None)


def user_timeout_ms(settings: RWDBSettings) -> int:
    """``RWDB_TCP_USER_TIMEOUT`` in the milliseconds both libpq and the kernel take."""
    return round(settings.tcp_user_timeout * 1000)


def libpq_params(settings: RWDBSettings) -> dict[str, Any]:
    """The libpq connection parameters for psycopg (ignored on Unix sockets)."""
    if not settings.tcp_keepalives:
        params: dict[str, Any] = {"keepalives": 0}
    else:
        params = {
            "keepalives": 1,
            "keepalives_idle": settings.tcp_keepalives_idle,
            "keepalives_interval": settings.tcp_keepalives_interval,
            "keepalives_count": settings.tcp_keepalives_count,
        }
    if settings.tcp_user_timeout > 0:
        params["tcp_user_timeout"] = user_timeout_ms(settings)
    return params


def socket_options(settings: RWDBSettings) -> list[tuple[int, int, int]]:
    """``(level, option, value)`` for ``setsockopt``: what libpq would set, on this platform."""
    options: list[tuple[int, int, int]] = []
    if settings.tcp_keepalives:
        options.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
        for option, value in (
            (_KEEPIDLE, settings.tcp_keepalives_idle),
            (_KEEPINTVL, settings.tcp_keepalives_interval),
            (_KEEPCNT, settings.tcp_keepalives_count),
        ):
            if option is not None:
                options.append((socket.IPPROTO_TCP, option, value))
    if settings.tcp_user_timeout > 0 and _USER_TIMEOUT is not None:
        options.append((socket.IPPROTO_TCP, _USER_TIMEOUT, user_timeout_ms(settings)))
    return options


def asyncpg_socket(driver_connection: Any) -> Any | None:
    """The socket under an ``asyncpg.Connection`` (``None`` when it cannot be reached).

    asyncio's ``get_extra_info("socket")`` is public; the transport is not.
    """
    transport = getattr(driver_connection, ASYNCPG_TRANSPORT_ATTRIBUTE, None)
    if transport is None:
        return None
    return transport.get_extra_info("socket")


def set_socket_options(driver_connection: Any, settings: RWDBSettings) -> bool:
    """Set the options on a new asyncpg connection's socket; ``False`` when it could not be.

    A Unix socket takes none of them and needs none (its peer cannot vanish
    silently), as with libpq.
    """
    sock = asyncpg_socket(driver_connection)
    if sock is None:
        _warn_once(
            f"asyncpg.Connection has no {ASYNCPG_TRANSPORT_ATTRIBUTE} with a socket in "
            "this asyncpg release"
        )
        return False
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return True
    try:
        for level, option, value in socket_options(settings):
            sock.setsockopt(level, option, value)
    except OSError as exc:
        _warn_once(f"setsockopt failed ({exc.strerror or exc})")
        return False
    return True


def _warn_once(why: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    logger.warning(
        "fastapi_rwdb: TCP keepalives and TCP_USER_TIMEOUT are not set on asyncpg "
        "connections: %s. A database host that vanishes without closing its sockets "
        "will hold those connections until the kernel gives up (about 15 minutes). "
        "Pin asyncpg to a release the package supports, or report it.",
        why,
    )
