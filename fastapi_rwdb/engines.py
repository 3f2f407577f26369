"""Engine factories that are safe behind PgBouncer in transaction mode.

Public on purpose: an application's own engines (Alembic, scripts, test
fixtures) need the same connection arguments, or they fail with
``prepared statement "_pg3_0" already exists`` the first time PgBouncer hands
them another client's server connection.
"""

from __future__ import annotations

import asyncio
import logging
import select
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, ExceptionContext
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .errors import DatabaseUnavailableError, ReadOnlySessionError
from .faults import READ_ONLY_SQLSTATE, is_transient_connect_error, sqlstate_of
from .health import ReadSideHealth
from .internals import EXECUTE_INTERNAL, await_, route_commit, set_readonly
from .lsn import parse_lsn
from .pooling import AsyncIdleClosingQueuePool, IdleClosingQueuePool
from .settings import Driver, RWDBSettings, Side, parse_url

logger = logging.getLogger("fastapi_rwdb")

# Where they were before faults.py held them; kept importable from here.
__all__ = ["is_transient_connect_error", "sqlstate_of"]

#: Execution option that marks a connection as serving a read session; errors on
#: such a connection are reported as the caller's mistake, not a server problem.
ROLE_OPTION = "rwdb_role"


#: Connection-record info key: the WAL position the checkout ping read, when asked.
POSITION_INFO = "rwdb_position"
#: Connection-record info key: a callable that sends this transaction's COMMIT
#: itself, in place of the DBAPI ``commit()`` (psycopg engines; see tracking).
COMMIT_INFO = "rwdb_commit"
#: Connection-record info key: a position the connection reports instead of its
#: server's, whenever read-your-writes asks how far it has got. The one hook for a
#: read side that is behind by other means than replay: fastapi_rwdb.testing's
#: stale replica (a snapshot of the primary) reports the position it was taken at.
REPORTED_POSITION = "rwdb_reported_position"
_FRESH = "rwdb_fresh"
_RETURNED_AT = "rwdb_returned_at"  # time.monotonic() when last returned to the pool
#: How far the server behind a connection is: the replay position on a replica,
#: the current position on a primary (whose data is all there is). As text: see lsn.py.
POSITION_SQL = (
    "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
    " ELSE pg_current_wal_lsn() END)::text"
)
#: Set while a read session checks out a connection whose position it needs (a
#: client's token, the lag limit, session consistency): the checkout ping then
#: reads that position instead of running its no-op query. Same round trip, so
#: knowing where the server is costs nothing more. Other checkouts ping the cheap way.
want_position: ContextVar[bool] = ContextVar("rwdb_want_position", default=False)
#: Set with ``want_position`` when the session will run its statements on the
#: connection it checks out (not when it only wants the position and gives the
#: connection back). On psycopg the ping then opens the transaction too: see
#: :func:`begin_reading_position`.
begin_with_position: ContextVar[bool] = ContextVar("rwdb_begin_with_position", default=False)
#: Connection-record info key: the checkout ping left a transaction open that no
#: statement has used yet (see :func:`end_unused_transaction`).
_BEGUN = "rwdb_begun"
#: Connection-record info key: this connection's transactions take their snapshot
#: at their first statement (not READ COMMITTED): the ping must not open them.
_SNAPSHOT_AT_FIRST = "rwdb_snapshot_at_first"
#: What psycopg's ``Connection`` options change on the server's transaction: an
#: open transaction must end before SQLAlchemy sets one.
_CHARACTERISTICS = frozenset({"isolation_level", "postgresql_readonly", "postgresql_deferrable"})


def connect_args(driver: Driver, settings: RWDBSettings) -> dict[str, Any]:
    """DBAPI connect arguments for one driver.

    Unless ``RWDB_PREPARED_STATEMENTS`` is on, every server-side statement
    cache is off: PgBouncer in transaction mode gives each transaction any
    server connection, and a statement prepared on one is missing (or
    duplicated) on the next.
    """
    if driver == "psycopg":
        args: dict[str, Any] = {
            "connect_timeout": max(1, round(settings.connect_timeout)),
            "application_name": settings.application_name,
        }
        if not settings.prepared_statements:
            args["prepare_threshold"] = None
        return args
    args = {
        "timeout": settings.connect_timeout,
        "server_settings": {"application_name": settings.application_name},
    }
    if not settings.prepared_statements:
        args["statement_cache_size"] = 0
        args["prepared_statement_cache_size"] = 0
    return args


def _pool_args(side: Side, settings: RWDBSettings, kwargs: dict[str, Any]) -> dict[str, Any]:
    if "poolclass" in kwargs:
        # The caller's own pool (NullPool for Alembic or a test's throwaway engine)
        # may take none of the queue pool's sizes; pre-ping is the package's own.
        return {"pool_pre_ping": settings.pool_pre_ping}
    size, overflow = settings.pool_limits(side)
    return {
        "pool_size": size,
        "max_overflow": overflow,
        "pool_timeout": settings.pool_timeout,
        "pool_recycle": settings.pool_recycle,
        # Done by the package's own checkout ping (see _instrument), not SQLAlchemy's.
        "pool_pre_ping": settings.pool_pre_ping,
        "idle_timeout": settings.pool_idle_seconds,
    }


def _with_pool_class(options: dict[str, Any], is_async: bool) -> dict[str, Any]:
    """The package's pool (pooling.py) unless the caller chose another pool class."""
    if options.get("poolclass") is None:
        options["poolclass"] = AsyncIdleClosingQueuePool if is_async else IdleClosingQueuePool
    else:  # the caller's pool knows nothing of the idle timeout
        options.pop("idle_timeout", None)
    return options


def make_engine(
    url: str | URL,
    settings: RWDBSettings | None = None,
    *,
    side: Side = "write",
    health: ReadSideHealth | None = None,
    **kwargs: Any,
) -> Engine:
    """A psycopg 3 engine with the package's pool, retry and PgBouncer settings.

    ``side="read"`` makes every transaction ``READ ONLY`` (set once per
    connection, sent with ``BEGIN``: no extra round trip, nothing left behind on
    PgBouncer's shared server connections). ``health`` is told about failed and
    successful connects. ``kwargs`` override :func:`sqlalchemy.create_engine`
    arguments.
    """
    url = _as_url(url, "psycopg")
    settings = settings or _settings_for(url)
    options = _engine_options("psycopg", side, settings, kwargs)
    ping = options.pop("pool_pre_ping")
    engine = create_engine(url, pool_pre_ping=False, **_with_pool_class(options, False))
    _instrument(engine, side, settings, health, ping=ping, is_async=False)
    return engine


def make_async_engine(
    url: str | URL,
    settings: RWDBSettings | None = None,
    *,
    side: Side = "write",
    health: ReadSideHealth | None = None,
    **kwargs: Any,
) -> AsyncEngine:
    """The asyncpg twin of :func:`make_engine`."""
    url = _as_url(url, "asyncpg")
    settings = settings or _settings_for(url)
    options = _engine_options("asyncpg", side, settings, kwargs)
    ping = options.pop("pool_pre_ping")
    engine = create_async_engine(url, pool_pre_ping=False, **_with_pool_class(options, True))
    _instrument(engine.sync_engine, side, settings, health, ping=ping, is_async=True)
    return engine


@dataclass(frozen=True, slots=True)
class EnginePair:
    """The write (primary) and read (replicas) engines of one driver."""

    write: Engine
    read: Engine


@dataclass(frozen=True, slots=True)
class AsyncEnginePair:
    write: AsyncEngine
    read: AsyncEngine


def make_primary_read_engine(settings: RWDBSettings) -> Engine:
    """The primary, for reads that must see it: READ ONLY, with a pool of its own.

    Apart from the write pool so that reads can never take the connections writes
    need, and without the read side's breaker: its failures say nothing about the
    replicas.
    """
    return make_engine(
        settings.url("write", "psycopg"), settings, side="read", **_primary_read_pool(settings)
    )


def make_async_primary_read_engine(settings: RWDBSettings) -> AsyncEngine:
    """The asyncpg twin of :func:`make_primary_read_engine`."""
    return make_async_engine(
        settings.url("write", "asyncpg"), settings, side="read", **_primary_read_pool(settings)
    )


def _primary_read_pool(settings: RWDBSettings) -> dict[str, Any]:
    size, overflow = settings.pool_limits("primary_read")
    return {"pool_size": size, "max_overflow": overflow}


def make_engine_pair(settings: RWDBSettings, health: ReadSideHealth | None = None) -> EnginePair:
    return EnginePair(
        write=make_engine(settings.url("write", "psycopg"), settings, side="write"),
        read=make_engine(settings.url("read", "psycopg"), settings, side="read", health=health),
    )


def make_async_engine_pair(
    settings: RWDBSettings, health: ReadSideHealth | None = None
) -> AsyncEnginePair:
    url = settings.url("read", "asyncpg")
    return AsyncEnginePair(
        write=make_async_engine(settings.url("write", "asyncpg"), settings, side="write"),
        read=make_async_engine(url, settings, side="read", health=health),
    )


def _ping_query(dbapi_connection: Any, position: bool, timeout: float) -> int | None:
    # psycopg's connection is the DBAPI connection; asyncpg's sits under SQLAlchemy's adapter.
    raw = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if position:
        return parse_lsn(fetch_outside_transaction(raw, POSITION_SQL, timeout))
    if isinstance(raw, psycopg.Connection):
        # An empty query, as SQLAlchemy's own ping: the server has nothing to parse.
        _execute_autocommit(raw, ";")
    else:  # asyncpg (which cannot take an empty query): the simple protocol, one round trip
        await_(raw.execute("SELECT 1", timeout=timeout))
    return None


def begin_reading_position(
    raw: psycopg.Connection[Any], info: dict[str, Any], timeout: float
) -> int | None:
    """The server's WAL position, read in the message that opens the transaction
    the session's statements will run in.

    psycopg sends its ``BEGIN`` as a round trip of its own before the first
    statement; sent here with the position query (``BEGIN ...; SELECT``, one
    simple-query message on psycopg's documented low-level handle), it costs
    nothing, and a read with a token needs no more round trips than one without.
    psycopg sees the transaction open and sends no ``BEGIN`` of its own; its
    ``rollback()`` ends it as usual. The ``BEGIN`` is the one psycopg would send
    (same isolation level, read-only and deferrable options).

    Sound only where every statement takes its own snapshot (READ COMMITTED): the
    snapshot of the session's first statement is then taken after the position
    was read, so it holds everything up to it. Under REPEATABLE READ the snapshot
    would be the position query's own, possibly older than the position it
    reads: such a connection gets the position outside any transaction instead.
    """
    level = raw.isolation_level
    if info.get(_SNAPSHOT_AT_FIRST) or level not in (None, psycopg.IsolationLevel.READ_COMMITTED):
        return parse_lsn(fetch_outside_transaction(raw, POSITION_SQL))
    results = _simple_query(
        raw.pgconn, _begin_command(raw) + b"; " + _POSITION_AND_ISOLATION_SQL, timeout
    )
    last = results[-1] if results else None
    if last is None or last.status != psycopg.pq.ExecStatus.TUPLES_OK:
        message = "" if last is None else (last.error_message or b"").decode(errors="replace")
        raise psycopg.OperationalError(message.strip() or "no answer to the position query")
    position = parse_lsn(_text(last.get_value(0, 0)))
    if last.get_value(0, 1) != b"read committed":
        # The server's default isolation level is another: ask outside any
        # transaction from now on.
        info[_SNAPSHOT_AT_FIRST] = True
        raw.rollback()
        return position
    info[_BEGUN] = True
    return position


def _simple_query(pgconn: Any, sql: bytes, timeout: float) -> list[Any]:
    """Every result of a simple-query message, waiting on the socket as psycopg does.

    Not libpq's blocking ``PQgetResult``: psycopg calls it holding the GIL (it only
    ever calls it once a result is there), so waiting in it would stop every other
    thread of the process for the round trip.
    """
    pgconn.send_query(sql)
    poller = select.poll()
    poller.register(pgconn.socket, select.POLLIN)
    deadline = time.monotonic() + timeout
    while pgconn.flush():  # the socket took part of the message: wait to send the rest
        _wait(select.POLLOUT, pgconn.socket, deadline)
    results: list[Any] = []
    while True:
        pgconn.consume_input()
        while not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:
                return results
            results.append(result)
        if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            raise psycopg.OperationalError(f"no answer within {timeout:g} s")


def _wait(events: int, fd: int, deadline: float) -> None:
    poller = select.poll()
    poller.register(fd, events)
    if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
        raise psycopg.OperationalError("the connection does not take the query")


#: The position and the transaction's isolation level (the server's default may not
#: be READ COMMITTED): see begin_reading_position.
_POSITION_AND_ISOLATION_SQL = (POSITION_SQL + ", current_setting('transaction_isolation')").encode()


def _begin_command(raw: psycopg.Connection[Any]) -> bytes:
    """The ``BEGIN`` psycopg sends for this connection's options.

    Built from its public attributes; a contract test compares it with
    psycopg's own on the installed release.
    """
    parts = [b"BEGIN"]
    if raw.isolation_level is not None:
        level = psycopg.IsolationLevel(raw.isolation_level)
        parts.append(b"ISOLATION LEVEL " + level.name.replace("_", " ").encode())
    if raw.read_only is not None:
        parts.append(b"READ ONLY" if raw.read_only else b"READ WRITE")
    if raw.deferrable is not None:
        parts.append(b"DEFERRABLE" if raw.deferrable else b"NOT DEFERRABLE")
    return b" ".join(parts)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def end_unused_transaction(connection_info: dict[str, Any], dbapi_connection: Any) -> None:
    """Roll back the transaction the checkout ping opened, if no statement has run
    in it (SQLAlchemy has not begun one of its own): before something that
    psycopg refuses inside a transaction, such as a change of isolation level,
    or a query that must run outside it."""
    if not connection_info.pop(_BEGUN, False):
        return
    raw = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if (
        isinstance(raw, psycopg.Connection)
        and raw.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    ):
        raw.rollback()


def looks_alive(dbapi_connection: Any) -> bool:
    """Whether an idle connection shows no sign of having been closed, asked of the
    local socket: no round trip.

    An idle connection's socket has nothing to read. If it has (the server or a
    proxy closed it, or sent a notice), the caller pings to find out. asyncpg's
    event loop has already read any such thing and marked the connection closed.
    """
    raw = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if isinstance(raw, psycopg.Connection):
        if raw.closed or raw.broken:
            return False
        try:
            poller = select.poll()
            poller.register(raw.fileno(), select.POLLIN)
            return not poller.poll(0)
        except (OSError, ValueError, psycopg.Error):
            return False
    is_closed = getattr(raw, "is_closed", None)
    return not (is_closed is None or is_closed())


def fetch_outside_transaction(raw: Any, sql: str, timeout: float | None = None) -> str | None:
    """The first column of ``sql``'s first row, as text, run on a driver connection
    (psycopg or asyncpg) outside any transaction: one statement, one round trip,
    no BEGIN and no ROLLBACK around it. ``sql`` must return one text column."""
    if isinstance(raw, psycopg.Connection):
        row = _execute_autocommit(raw, sql).fetchone()
        return None if row is None else row[0]
    return _fetch_by_copy(raw, sql, timeout)


def _execute_autocommit(raw: psycopg.Connection[Any], sql: str) -> psycopg.Cursor[Any]:
    """``sql`` on psycopg outside any transaction (no BEGIN first); the cursor holds
    the results, so they can be fetched after autocommit is restored."""
    was = raw.autocommit
    raw.autocommit = True
    try:
        return raw.execute(sql)
    finally:
        raw.autocommit = was


def _fetch_by_copy(raw: Any, sql: str, timeout: float | None) -> str | None:
    """:func:`fetch_outside_transaction` on asyncpg.

    asyncpg's ``fetchval`` costs two round trips (it describes the statement
    first); a ``COPY (...) TO STDOUT`` of the same query goes in the simple
    protocol and returns its row, as text, in one.
    """
    chunks: list[bytes] = []

    async def collect(data: bytes) -> None:
        chunks.append(bytes(data))

    await_(raw.copy_from_query(sql, output=collect, timeout=timeout))
    line = b"".join(chunks).split(b"\n", 1)[0].decode()
    return None if line in ("", "\\N") else line


def _brief(exc: BaseException) -> str:
    """Error class and first line: enough to diagnose, no DSN (drivers never print the password)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def _as_url(url: str | URL, driver: Driver) -> URL:
    if isinstance(url, str):
        try:
            url = parse_url(url)
        except ValueError as exc:
            raise ValueError(f"database URL {exc}") from None
    return url.set(drivername=f"postgresql+{driver}")


def _engine_options(
    driver: Driver, side: Side, settings: RWDBSettings, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The engine arguments: the package's, overridden by the caller's ``kwargs``,
    except for the role. A caller's ``execution_options`` are merged with it: in
    its place, a write on the read side would look like a demoted primary."""
    return {
        **_pool_args(side, settings, kwargs),
        "connect_args": connect_args(driver, settings),
        **kwargs,
        "execution_options": {**kwargs.get("execution_options", {}), ROLE_OPTION: side},
    }


def _commit_hook(dbapi_connection: Any) -> Any:
    """The write tracking's COMMIT for this transaction, if it left one (tracking.py)."""
    info = getattr(dbapi_connection, "info", None)  # the pool's proxy: the record's dict
    return info.pop(COMMIT_INFO, None) if isinstance(info, dict) else None


def _settings_for(url: URL) -> RWDBSettings:
    """The environment's settings for an engine whose URL is given.

    The URL stands for both sides' connection settings, so POSTGRES_PASSWORD
    (only needed to build a URL from the parts) may be unset; the pool, timeout
    and retry variables are still read, and still checked.
    """
    given = url.render_as_string(hide_password=False)
    return RWDBSettings(write_url=given, read_url=given)


def _instrument(
    engine: Engine,
    side: Side,
    settings: RWDBSettings,
    health: ReadSideHealth | None,
    *,
    ping: bool,
    is_async: bool,
) -> None:
    """Attach connect retry, read-only connections and error translation."""
    retries = settings.connect_retries
    backoff = settings.connect_retry_backoff
    endpoint = f"{engine.url.host}:{engine.url.port}"

    @event.listens_for(engine, "do_connect")
    def _connect_with_retry(dialect: Any, conn_rec: Any, cargs: Any, cparams: Any) -> Any:
        delay = backoff
        for attempt in range(retries + 1):
            try:
                connection = dialect.connect(*cargs, **cparams)
            except Exception as exc:
                if not is_transient_connect_error(exc):
                    raise
                if attempt == retries:
                    if health is not None:
                        health.connect_failed()
                    # Where, and what the driver said, go to the log only: the
                    # exception's text may reach an anonymous client in a 503.
                    logger.warning(
                        "fastapi_rwdb: cannot connect to the %s side at %s after %d attempts (%s)",
                        side,
                        endpoint,
                        retries + 1,
                        _brief(exc),
                    )
                    raise DatabaseUnavailableError(
                        f"cannot connect to the {side} side of the database after "
                        f"{retries + 1} attempts"
                    ) from exc
                logger.warning(
                    "cannot open a %s connection to %s (%s); retry %d of %d in %.2fs",
                    side,
                    endpoint,
                    type(exc).__name__,
                    attempt + 1,
                    retries,
                    delay,
                )
                if is_async:
                    await_(asyncio.sleep(delay))
                else:
                    time.sleep(delay)
                delay *= 2
            else:
                if health is not None:
                    health.connect_succeeded()
                return connection
        raise AssertionError("unreachable")  # pragma: no cover

    if ping:
        # Without the session hook that retries a statement on a dead connection
        # (reconnect.py), every checkout pings.
        skip_window = settings.ping_skip_ms / 1000 if EXECUTE_INTERNAL else 0.0

        @event.listens_for(engine, "connect")
        def _fresh(dbapi_connection: Any, record: Any) -> None:
            record.info[_FRESH] = True

        if skip_window:

            @event.listens_for(engine, "checkin")
            def _returned(dbapi_connection: Any, record: Any) -> None:
                if dbapi_connection is not None:  # None: invalidated, not coming back
                    record.info[_RETURNED_AT] = time.monotonic()

        @event.listens_for(engine, "checkout")
        def _ping(dbapi_connection: Any, record: Any, proxy: Any) -> None:
            """Pre-ping, cheaper than SQLAlchemy's and with a use.

            SQLAlchemy pings asyncpg inside BEGIN/ROLLBACK: four round trips
            behind PgBouncer. This one is one round trip on both drivers, outside
            any transaction. When a read session needs to know how far the server
            has got (see ``want_position``), the ping reads that position instead
            of running a no-op, so read-your-writes needs no query of its own. A
            connection opened just now is not pinged, as in SQLAlchemy: should it
            be unusable, the request's own statement fails and the pool is
            invalidated.

            Nor is a connection returned to the pool less than
            ``RWDB_PING_SKIP_MS`` ago whose socket has nothing to say (as
            HikariCP's ``aliveBypassWindowMs``): a round trip saved on nearly
            every request under load. A server or proxy that closed it makes the
            socket readable, and then it is pinged after all; one that died
            silently is found by the first statement, which reconnect.py runs
            again on a new connection. A checkout that wants the position always
            pings: the position is why it pings.
            """
            record.info.pop(_BEGUN, None)
            if record.info.pop(_FRESH, False):
                return
            position = want_position.get()
            if (
                not position
                and time.monotonic() - record.info.get(_RETURNED_AT, -skip_window) < skip_window
                and looks_alive(dbapi_connection)
            ):
                return
            try:
                if position and not is_async and begin_with_position.get():
                    value = begin_reading_position(
                        dbapi_connection, record.info, settings.connect_timeout
                    )
                else:
                    value = _ping_query(dbapi_connection, position, settings.connect_timeout)
            except Exception as exc:
                # After a failover every pooled connection is likely dead: discard
                # them all; the pool opens a new one for this checkout.
                raise InvalidatePoolError(f"ping failed: {_brief(exc)}") from exc
            if position:
                record.info[POSITION_INFO] = value

    if not is_async:
        # The tracking's one-message COMMIT goes where SQLAlchemy commits (internals.py).
        route_commit(engine, _commit_hook)

        @event.listens_for(engine, "set_connection_execution_options")
        def _characteristics(conn: Any, opts: dict[str, Any]) -> None:
            # The checkout ping may have opened the transaction (begin_reading_position):
            # psycopg refuses a new isolation level inside one. Nothing ran in it yet.
            if _CHARACTERISTICS.isdisjoint(opts) or conn.in_transaction():
                return
            fairy = conn.connection
            end_unused_transaction(fairy.info, fairy.dbapi_connection)

    if side == "read":

        @event.listens_for(engine, "connect")
        def _read_only(dbapi_connection: Any, conn_rec: Any) -> None:
            set_readonly(engine.dialect, dbapi_connection)

    @event.listens_for(engine, "handle_error")
    def _read_only_error(ctx: ExceptionContext) -> None:
        """25006 means two things: a write in a read session (the caller's mistake:
        explain it, keep the pool) or a write session on a primary that was
        demoted by a failover (discard every pooled connection to it)."""
        if sqlstate_of(ctx.original_exception) != READ_ONLY_SQLSTATE or ctx.connection is None:
            return
        # The read engine serves only read sessions, whatever options a caller set on
        # it or its connections; on the write engine, the Database's primary-read
        # sessions are told apart by the role their (merged) options carry.
        if side != "read" and ctx.connection.get_execution_options().get(ROLE_OPTION) != "read":
            logger.warning(
                "fastapi_rwdb: the write side at %s is read-only (demoted primary?); "
                "discarding its pooled connections",
                endpoint,
            )
            ctx.is_disconnect = True
            ctx.invalidate_pool_on_disconnect = True
            return
        raise ReadOnlySessionError(
            "a read session tried to change data; reads run in READ ONLY transactions. "
            "Use get_write_db / get_async_write_db (or WriteSession / AsyncWriteSession) "
            "for code that writes."
        ) from ctx.sqlalchemy_exception
