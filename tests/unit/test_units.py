"""Pure logic, no database: the read side's breaker (with a fake clock), outage
classification, driver error helpers, LSN parsing of bad input and ``using()``.
(The routing rules and the replica view: test_routing.py; LSN text: test_tokens.py.)
Runs in well under a second, like every test not marked ``stack``:
``pytest -m "not stack"``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

import asyncpg  # type: ignore[import-untyped]
import psycopg
import pytest
from sqlalchemy.exc import DBAPIError, InternalError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

import fastapi_rwdb
from fastapi_rwdb import Database, DatabaseUnavailableError, RWDBSettings
from fastapi_rwdb.engine.connect_errors import is_transient_connect_error
from fastapi_rwdb.engine.sqlstates import is_out_of_step, sqlstate_of
from fastapi_rwdb.routing import replicas as health
from fastapi_rwdb.routing.lsn import parse_lsn
from fastapi_rwdb.routing.replicas import ReadSideHealth, watch_replicas
from fastapi_rwdb.web.unavailable import unavailable_reason

# -- the read side's breaker -----------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr("fastapi_rwdb.routing.replicas.time.monotonic", fake)
    return fake


def test_breaker_opens_after_the_configured_failures_in_a_row(clock: FakeClock) -> None:
    health = ReadSideHealth(fallback_after=3, retry_seconds=5.0)
    health.connect_failed()
    health.connect_failed()
    assert not health.read_side_down
    health.connect_failed()
    assert health.read_side_down


def test_a_success_in_between_starts_the_count_again(clock: FakeClock) -> None:
    health = ReadSideHealth(fallback_after=3, retry_seconds=5.0)
    for _ in range(2):
        health.connect_failed()
    health.connect_succeeded()
    for _ in range(2):
        health.connect_failed()
    assert not health.read_side_down and health.failures == 2


def test_open_breaker_lets_a_read_try_again_after_the_retry_time(clock: FakeClock) -> None:
    health = ReadSideHealth(fallback_after=2, retry_seconds=5.0)
    health.connect_failed()
    health.connect_failed()
    clock.now += 4.9
    assert health.read_side_down
    clock.now += 0.2
    assert not health.read_side_down  # half-open: the next read tries the read side


def test_half_open_breaker_reopens_on_one_failure(clock: FakeClock) -> None:
    health = ReadSideHealth(fallback_after=3, retry_seconds=5.0)
    for _ in range(3):
        health.connect_failed()
    clock.now += 6
    assert not health.read_side_down
    health.connect_failed()  # one, not three: the failures were kept
    assert health.read_side_down
    clock.now += 4.9
    assert health.read_side_down  # open for a whole retry time from the new failure


def test_half_open_breaker_closes_on_a_success(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fastapi_rwdb")
    health = ReadSideHealth(fallback_after=1, retry_seconds=5.0)
    health.connect_failed()
    assert "reads go to the primary for 5s" in caplog.text
    clock.now += 6
    health.connect_succeeded()
    assert (health.failures, health.open_until) == (0, 0.0)
    assert "accepts connections again" in caplog.text
    health.connect_failed()
    assert health.read_side_down  # fallback_after=1: at once, as the first time


def test_repeated_failures_while_open_log_once(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fastapi_rwdb")
    health = ReadSideHealth(fallback_after=2, retry_seconds=5.0)
    for _ in range(6):
        health.connect_failed()
    assert caplog.text.count("refused") == 1


# -- driver errors -----------------------------------------------------------------------


class CodedError(Exception):
    """An asyncpg-style driver error: the SQLSTATE as an attribute."""

    def __init__(self, sqlstate: Any, message: str = "error") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def wrapped(orig: BaseException, cls: type[DBAPIError] = OperationalError, **kw: Any) -> DBAPIError:
    """A driver error as SQLAlchemy raises it."""
    return cls("SELECT 1", None, orig, **kw)  # type: ignore[arg-type]


def test_sqlstate_of_finds_the_code_where_each_layer_keeps_it() -> None:
    assert sqlstate_of(CodedError("25006")) == "25006"
    assert sqlstate_of(wrapped(CodedError("08006"))) == "08006"  # on .orig
    try:
        raise RuntimeError("outer") from CodedError("57P01")
    except RuntimeError as exc:
        assert sqlstate_of(exc) == "57P01"  # on __cause__
    assert sqlstate_of(psycopg.errors.ReadOnlySqlTransaction("x")) == "25006"


def _as_sqlalchemy_raises(driver_error: Exception) -> DBAPIError:
    """``driver_error`` as SQLAlchemy's asyncpg adapter translates and wraps it."""
    from sqlalchemy.dialects.postgresql.asyncpg import (
        AsyncAdapt_asyncpg_connection,
        AsyncAdapt_asyncpg_dbapi,
    )

    dbapi = AsyncAdapt_asyncpg_dbapi(asyncpg)
    try:
        try:
            raise driver_error
        except Exception as exc:
            AsyncAdapt_asyncpg_connection._handle_exception_no_connection(dbapi, exc)
    except Exception as translated:
        return wrapped(translated, InternalError)
    raise AssertionError("not translated")


def test_a_driver_out_of_step_is_told_through_every_wrapping() -> None:
    lost = asyncpg.exceptions.InternalClientError(
        "cannot switch to state 18; another operation (2) is in progress"
    )
    assert is_out_of_step(lost)
    assert is_out_of_step(_as_sqlalchemy_raises(lost))
    answered_twice = psycopg.InternalError("received 2 results from command 'ROLLBACK'")
    assert is_out_of_step(answered_twice)
    assert is_out_of_step(wrapped(answered_twice, InternalError))
    for other in (
        asyncpg.exceptions.InterfaceError("cannot perform operation: another operation"),
        asyncpg.exceptions.PostgresError("x"),
        psycopg.InternalError("a server's internal error, with its SQLSTATE"),
        psycopg.errors.InternalError_("received: an XX000 from the server"),
        ValueError("x"),
    ):
        assert not is_out_of_step(other)
        assert not is_out_of_step(wrapped(other, InternalError))


@pytest.mark.parametrize("exc", [ValueError("x"), CodedError(None), CodedError(25006)])
def test_sqlstate_of_is_none_without_a_text_code(exc: BaseException) -> None:
    assert sqlstate_of(exc) is None


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionRefusedError(111, "refused"), True),  # asyncpg: a bare OSError
        (OSError("reset"), True),
        (CodedError("08001"), True),
        (CodedError("08006"), True),
        (CodedError("57P01"), True),  # admin shutdown
        (CodedError("57P03"), True),  # the server is starting up
        (CodedError("53300"), True),  # too many connections
        (CodedError("28P01"), False),  # wrong password
        (CodedError("3D000"), False),  # no such database
        (psycopg.OperationalError("connection failed: Connection refused"), True),
        (psycopg.OperationalError('password authentication failed for user "x"'), False),
        (psycopg.OperationalError('database "nope" does not exist'), False),
        (psycopg.OperationalError('role "batch" is not permitted to log in'), False),
        (ValueError("not a connection problem"), False),
    ],
)
def test_which_connect_errors_are_worth_another_try(exc: BaseException, transient: bool) -> None:
    assert is_transient_connect_error(exc) is transient


# -- how an outage reaches the client ----------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (DatabaseUnavailableError("cannot connect to the write side"), "cannot connect"),
        (PoolTimeoutError("QueuePool limit"), "pool timeout"),
        (wrapped(CodedError("25006"), InternalError), "primary became read-only"),
        (
            wrapped(CodedError(None), connection_invalidated=True),
            "connection was lost",
        ),
        (wrapped(CodedError("08006")), "server is unavailable (SQLSTATE 08006)"),
        (wrapped(CodedError("57P01")), "server is unavailable (SQLSTATE 57P01)"),
        (wrapped(CodedError("53300")), "server is unavailable (SQLSTATE 53300)"),
    ],
)
def test_outages_get_a_reason(exc: BaseException, reason: str) -> None:
    found = unavailable_reason(exc)
    assert found is not None and reason in found


@pytest.mark.parametrize(
    "exc",
    [
        wrapped(CodedError("23505"), InternalError),  # a unique violation: the app's bug
        wrapped(CodedError("42P01")),  # no such table
        wrapped(CodedError(None)),
        ValueError("not a database error"),
    ],
)
def test_other_errors_are_not_outages(exc: BaseException) -> None:
    assert unavailable_reason(exc) is None


async def test_the_replica_watch_stops_even_if_its_cancellation_is_swallowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SQLAlchemy before 2.1.5 on Python 3.11 (its pool's checkout, CPython gh-86296)
    can return a connection in place of the cancellation that reached it: the view
    then ends normally although the app's shutdown cancelled the watcher, which must
    stop anyway, or the lifespan waits for it forever."""
    viewing, swallow = asyncio.Event(), True

    async def view_that_swallows_a_cancellation(write: AsyncEngine) -> tuple[int, list[Any]]:
        viewing.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            if not swallow:
                raise
        return 1, []

    monkeypatch.setattr(health, "view_replicas", view_that_swallows_a_cancellation)
    watcher = asyncio.create_task(
        watch_replicas(ReadSideHealth(), lambda: cast(AsyncEngine, None), lambda: True)
    )
    try:
        await viewing.wait()
        watcher.cancel()
        await asyncio.wait({watcher}, timeout=5)
        assert watcher.cancelled(), "the watcher went on after it was cancelled"
    finally:
        swallow = False
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


# -- LSNs --------------------------------------------------------------------------------------


def test_parse_lsn_orders_like_postgresql() -> None:
    assert parse_lsn("1/0") > parse_lsn("0/FFFFFFFF")  # type: ignore[operator]


@pytest.mark.parametrize("text", ["", "garbage", "1/", "/1"])
def test_parse_lsn_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_lsn(text)


# -- a Database for a block of code -------------------------------------------------------------


def test_using_installs_a_database_for_a_block_and_puts_the_previous_one_back() -> None:
    before = fastapi_rwdb.get_database()
    outer, inner = (Database(RWDBSettings(password="x")) for _ in range(2))
    with fastapi_rwdb.using(outer) as installed:
        assert installed is outer and fastapi_rwdb.get_database() is outer
        with pytest.raises(RuntimeError), fastapi_rwdb.using(inner):
            assert fastapi_rwdb.get_database() is inner
            raise RuntimeError
        assert fastapi_rwdb.get_database() is outer
    assert fastapi_rwdb.get_database() is before
