"""The connect-failure table (engine/connect_errors.py): a test per row, with the
exceptions the drivers and the pool really raise, bare and as SQLAlchemy wraps them;
and the failure the issue saw (psycopg's ConnectionTimeout answered 500), reproduced
against a socket on 127.0.0.1 that accepts and never answers (no stack needed)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import asyncpg
import psycopg
import psycopg.errors
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

import fastapi_rwdb
from fastapi_rwdb import Database, DatabaseUnavailableError, RWDBSettings
from fastapi_rwdb.engine.connect_errors import (
    TABLE,
    classify_connect_error,
    is_transient_connect_error,
    row_of,
)
from fastapi_rwdb.web.unavailable import unavailable_reason


def _wrapped(orig: BaseException) -> OperationalError:
    """As SQLAlchemy raises a DBAPI error from the pool's connect."""
    return OperationalError("connect", {}, orig)


def _adapted(orig: BaseException) -> BaseException:
    """As SQLAlchemy's asyncpg adapter translates an asyncpg error (``__cause__``)."""
    error = AsyncAdapt_asyncpg_dbapi.Error(str(orig), orig)
    error.__cause__ = orig
    return error


#: (row label start, exception, verdict). Every row of TABLE appears at least once.
CASES: list[tuple[str, BaseException, str | None]] = [
    (
        "ours",
        DatabaseUnavailableError("cannot connect to the read side after 4 attempts"),
        "unreachable",
    ),
    ("SQLAlchemy's pool", PoolTimeoutError("QueuePool limit of size 5 reached"), "pool-busy"),
    # -- refused logins: no retry, an outage all the same
    (
        "login refused",
        psycopg.OperationalError('password authentication failed for user "app"'),
        "misconfigured",
    ),
    ("login refused", psycopg.errors.InvalidPassword("wrong password"), "misconfigured"),
    ("login refused", psycopg.OperationalError('database "nope" does not exist'), "misconfigured"),
    (
        "login refused",
        asyncpg.exceptions.InvalidPasswordError("password authentication failed"),
        "misconfigured",
    ),
    (
        "login refused",
        _adapted(asyncpg.exceptions.InvalidCatalogNameError('database "x" does not exist')),
        "misconfigured",
    ),
    (
        "login refused",  # PgBouncer's refusal: 08P01, told by its text
        asyncpg.exceptions.ProtocolViolationError('password authentication failed for user "x"'),
        "misconfigured",
    ),
    # -- psycopg
    (
        "psycopg: no answer",
        psycopg.errors.ConnectionTimeout("connection timeout expired"),
        "unreachable",
    ),
    (
        "psycopg: no answer",
        _wrapped(psycopg.errors.ConnectionTimeout("connection timeout expired")),
        "unreachable",
    ),
    (
        "either driver",
        psycopg.errors.CannotConnectNow("the database system is starting up"),
        "unreachable",
    ),
    ("either driver", psycopg.errors.TooManyConnections("too many clients"), "unreachable"),
    ("either driver", psycopg.errors.AdminShutdown("terminating connection"), "unreachable"),
    (
        "psycopg: the connection could not",
        psycopg.OperationalError("connection failed: Connection refused"),
        "unreachable",
    ),
    (
        "psycopg: the connection could not",
        _wrapped(psycopg.OperationalError("server closed the connection unexpectedly")),
        "unreachable",
    ),
    # -- asyncpg
    ("asyncpg: no answer", TimeoutError(), "unreachable"),
    (
        "either driver",
        asyncpg.exceptions.CannotConnectNowError("the database system is shutting down"),
        "unreachable",
    ),
    (
        "either driver",
        _adapted(asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients")),
        "unreachable",
    ),
    (
        "either driver",  # PgBouncer: no server connection to give (08P01)
        asyncpg.exceptions.ProtocolViolationError("pgbouncer cannot connect to server"),
        "unreachable",
    ),
    (
        "either driver",
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        "unreachable",
    ),
    ("asyncpg: the socket", ConnectionRefusedError(111, "Connect call failed"), "unreachable"),
    ("asyncpg: the socket", ConnectionResetError(104, "Connection reset by peer"), "unreachable"),
    ("asyncpg: the socket", socket.gaierror(-2, "Name or service not known"), "unreachable"),
    # -- not connection failures: raised as they are
    ("", ValueError("invalid connection option"), None),
    ("", TypeError("connect() got an unexpected keyword argument"), None),
    ("", psycopg.ProgrammingError("invalid dsn"), None),
]


@pytest.mark.parametrize(("label", "exc", "verdict"), CASES)
def test_each_row_of_the_table(label: str, exc: BaseException, verdict: str | None) -> None:
    assert classify_connect_error(exc) == verdict
    row = row_of(exc)
    if verdict is None:
        assert row is None
    else:
        assert row is not None and row.label.startswith(label), row
    assert is_transient_connect_error(exc) is (verdict == "unreachable")


def test_every_row_is_tested() -> None:
    tested = {row_of(exc) for _, exc, _ in CASES}
    assert [row.label for row in TABLE if row not in tested] == []


@pytest.mark.parametrize(
    "exc",
    [
        _wrapped(psycopg.errors.ConnectionTimeout("connection timeout expired")),
        _wrapped(psycopg.OperationalError('password authentication failed for user "x"')),
    ],
)
def test_a_wrapped_connect_failure_without_sqlstate_is_an_outage(exc: BaseException) -> None:
    """Before, a DBAPIError with no SQLSTATE and no invalidation was a 500."""
    assert unavailable_reason(exc) is not None


# -- the 500, reproduced ----------------------------------------------------------


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 whose kernel completes the handshake and that never says a
    word: a frozen PgBouncer, as a connecting client sees it."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def test_a_read_connection_that_times_out_is_a_503_not_a_500(silent_port: int) -> None:
    settings = RWDBSettings(
        write_url=f"postgresql://u:secret-pw@127.0.0.1:{silent_port}/db",
        read_url=f"postgresql://u:secret-pw@127.0.0.1:{silent_port}/db",
        connect_timeout=1,
        connect_retries=0,
    )
    app = FastAPI()
    fastapi_rwdb.setup(app, Database(settings))

    @app.get("/read")
    def read(db: fastapi_rwdb.ReadSession) -> int:
        return int(db.execute(text("SELECT 1")).scalar_one())

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/read")
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"]
    assert "secret-pw" not in response.text and str(silent_port) not in response.text
