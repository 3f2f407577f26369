"""Every way opening or checking out a connection can fail, in one table.

A request must never answer 500 because the network or the database did
something: a server that does not answer, refuses, resets, is starting up or
is full is an outage (retried a few times, then the read side's breaker is
told and the client gets a 503 with ``Retry-After``). Each driver says so in
its own words: psycopg raises ``OperationalError`` subclasses with or without
a SQLSTATE (``ConnectionTimeout`` has none), asyncpg raises bare ``OSError``
and ``TimeoutError`` for the socket and ``PostgresError`` subclasses for the
server, SQLAlchemy wraps either (``DBAPIError.orig``, or its asyncpg adapter's
``Error`` with the driver's as ``__cause__``), and SQLAlchemy's own pool
raises ``TimeoutError`` when every connection is busy. Keeping them all here,
first matching row wins, means the connect retry (:mod:`.events`), the read
routing (:mod:`fastapi_rwdb.orm.reads`) and the 503 handler
(:mod:`fastapi_rwdb.web.unavailable`) can never disagree on what one means,
and a new driver exception is one new row (and one new unit test).

A configuration mistake (wrong password, unknown database or role) is not
worth another try, but it is still something the database did: it fails at
once, and is answered as an outage too (the log says which setting to check).
What matches no row is not a connection failure (a bug, a bad argument) and is
raised as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import psycopg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from ..errors import DatabaseUnavailableError
from .sqlstates import is_connection_failure, sqlstate_of

#: ``unreachable``: the server or a proxy on the way did not answer, refused or went
#: away; worth another try, and after the tries, an outage the breaker hears of.
#: ``misconfigured``: the server answered no to these credentials or this database:
#: no retry, an outage all the same. ``pool-busy``: this process's pool had no
#: connection to give in time: an outage of this worker, not of the server.
ConnectVerdict = Literal["unreachable", "misconfigured", "pool-busy"]

#: SQLSTATEs of a login the server refused: 28000 invalid authorization, 28P01 wrong
#: password, 3D000 unknown database.
_MISCONFIGURED_SQLSTATES = frozenset({"28000", "28P01", "3D000"})

#: What psycopg's message says when a login is refused without a SQLSTATE
#: (libpq reports the server's refusal as text; PgBouncer answers 08P01 for it).
_MISCONFIGURED_WORDS = ("authentication", "does not exist", "role ", "no such user")


@dataclass(frozen=True, slots=True)
class Row:
    """One kind of failure: what it is (for the reader and the tests), how to tell it."""

    label: str
    matches: Callable[[BaseException], bool]
    verdict: ConnectVerdict


def _refused_login(exc: BaseException) -> bool:
    code = sqlstate_of(exc)
    if code in _MISCONFIGURED_SQLSTATES:
        return True
    # A driver error without its own SQLSTATE (psycopg's login errors), or PgBouncer's
    # 08P01, which it sends for a refused login as for everything else.
    return (
        code in (None, "08P01")
        and _is_driver_error(exc)
        and any(word in str(exc).lower() for word in _MISCONFIGURED_WORDS)
    )


def _is_driver_error(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.Error) or type(exc).__module__.startswith("asyncpg")


#: First match wins; order matters where classes overlap (a refused login is also an
#: ``OperationalError``; ``TimeoutError`` is also an ``OSError``).
TABLE: tuple[Row, ...] = (
    Row(
        "ours: the connect retry gave up (DatabaseUnavailableError)",
        lambda e: isinstance(e, DatabaseUnavailableError),
        "unreachable",
    ),
    Row(
        "SQLAlchemy's pool: no connection free within RWDB_POOL_TIMEOUT (TimeoutError)",
        lambda e: isinstance(e, PoolTimeoutError),
        "pool-busy",
    ),
    Row(
        "login refused: wrong password, unknown role or database (28000, 28P01, 3D000)",
        _refused_login,
        "misconfigured",
    ),
    Row(
        "psycopg: no answer within connect_timeout (ConnectionTimeout)",
        lambda e: isinstance(e, psycopg.errors.ConnectionTimeout),
        "unreachable",
    ),
    Row(
        "either driver: class 08, shutting down, starting up, too many connections",
        lambda e: is_connection_failure(sqlstate_of(e)),
        "unreachable",
    ),
    Row(
        "asyncpg: no answer within its connect timeout (TimeoutError)",
        lambda e: isinstance(e, TimeoutError),
        "unreachable",
    ),
    Row(
        "asyncpg: the socket refused, reset, or the host unknown (the OSError family)",
        lambda e: isinstance(e, OSError),
        "unreachable",
    ),
    Row(
        "psycopg: the connection could not be made or was closed (OperationalError, no SQLSTATE)",
        lambda e: isinstance(e, psycopg.OperationalError) and sqlstate_of(e) is None,
        "unreachable",
    ),
)


def classify_connect_error(exc: BaseException) -> ConnectVerdict | None:
    """What ``exc``, raised while opening or checking out a connection, means; ``None``:
    not a connection failure. Looks through SQLAlchemy's wrapping (``orig``) and a
    translated error's cause."""
    for candidate in _unwrapped(exc):
        for row in TABLE:
            if row.matches(candidate):
                return row.verdict
    return None


def row_of(exc: BaseException) -> Row | None:
    """The first row of :data:`TABLE` that ``exc`` (unwrapped) matches: for the tests."""
    for candidate in _unwrapped(exc):
        for row in TABLE:
            if row.matches(candidate):
                return row
    return None


def is_transient_connect_error(exc: BaseException) -> bool:
    """Whether opening a connection may succeed if tried again shortly."""
    return classify_connect_error(exc) == "unreachable"


def _unwrapped(exc: BaseException) -> list[BaseException]:
    """``exc``, then the driver's error inside SQLAlchemy's wrapper, then its cause."""
    found = [exc]
    orig = getattr(exc, "orig", None) if isinstance(exc, DBAPIError) else None
    if isinstance(orig, BaseException):
        found.append(orig)
    if exc.__cause__ is not None and not isinstance(exc, DatabaseUnavailableError):
        found.append(exc.__cause__)
    return found
