"""The pool's event hooks: what every engine of the package does around its connections.

Attached once per engine by the factories (:mod:`fastapi_rwdb.engines`): connect
retry with backoff (and the read side's breaker told about it), the checkout
ping (one round trip, skipped for a connection returned moments ago whose socket
is quiet, and the carrier of the replica's position: see
:mod:`fastapi_rwdb.channel`), read-only connections on the read side, SQLSTATE
25006 told apart (a read session's write, or a demoted primary), and the write
tracking's COMMIT routed to where SQLAlchemy commits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import InvalidatePoolError

from .channel import (
    BEGUN_INFO,
    COMMIT_INFO,
    LAST_POSITION_INFO,
    POSITION_INFO,
    REMEMBERED_INFO,
    begin_with_position,
    position_needed,
    want_position,
)
from .driver import begin_reading_position, end_unused_transaction, looks_alive, ping_query
from .errors import DatabaseUnavailableError, ReadOnlySessionError
from .faults import READ_ONLY_SQLSTATE, is_transient_connect_error, sqlstate_of
from .health import ReadSideHealth
from .internals import EXECUTE_INTERNAL, await_, route_commit, set_readonly
from .settings import RWDBSettings, Side

logger = logging.getLogger("fastapi_rwdb")

#: Execution option that marks a connection as serving a read session; errors on
#: such a connection are reported as the caller's mistake, not a server problem.
ROLE_OPTION = "rwdb_role"

_FRESH = "rwdb_fresh"
#: How long a connection found short of a position is taken to still be short of
#: it (a paused or lagging replica): reads that need as much skip it without a
#: ping for that long. Short, as a lagging replica catches up within its lag.
_BEHIND_FOR = 0.25


def _known_behind(info: dict[str, Any], needed: int | None) -> bool:
    last = info.get(LAST_POSITION_INFO)
    return (
        needed is not None
        and last is not None
        and last[0] is not None
        and last[0] < needed
        and time.monotonic() - last[1] < _BEHIND_FOR
    )


#: What psycopg's ``Connection`` options change on the server's transaction: an
#: open transaction must end before SQLAlchemy sets one.
_CHARACTERISTICS = frozenset({"isolation_level", "postgresql_readonly", "postgresql_deferrable"})
_RETURNED_AT = "rwdb_returned_at"  # time.monotonic() when last returned to the pool


def _brief(exc: BaseException) -> str:
    """Error class and first line: enough to diagnose, no DSN (drivers never print the password)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def _commit_hook(dbapi_connection: Any) -> Any:
    """The write tracking's COMMIT for this transaction, if it left one (tracking.py)."""
    info = getattr(dbapi_connection, "info", None)  # the pool's proxy: the record's dict
    return info.pop(COMMIT_INFO, None) if isinstance(info, dict) else None


def instrument(
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
            has got, the ping reads that position instead of running a no-op, so
            read-your-writes needs no query of its own: a channel no call shows
            (channel.py); on psycopg, when the session will use the connection, the
            same message opens its transaction (driver.begin_reading_position).
            The session sets ``want_position`` around its
            ``engine.connect()`` (``sessions._checkout``); this hook reads it and
            leaves the position in ``record.info[POSITION_INFO]``, which the
            session pops once ``connect()`` has returned. A
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
            record.info.pop(BEGUN_INFO, None)
            if record.info.pop(_FRESH, False):
                return
            position = want_position.get()
            if position and _known_behind(record.info, position_needed.get()):
                # Short of what this read needs a moment ago: not worth a round trip.
                record.info[POSITION_INFO] = record.info[LAST_POSITION_INFO][0]
                record.info[REMEMBERED_INFO] = True
                return
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
                    value = ping_query(dbapi_connection, position, settings.connect_timeout)
            except Exception as exc:
                # After a failover every pooled connection is likely dead: discard
                # them all; the pool opens a new one for this checkout.
                raise InvalidatePoolError(f"ping failed: {_brief(exc)}") from exc
            if position:  # for the read session that asked: sessions._checkout pops it
                record.info[POSITION_INFO] = value
                record.info[LAST_POSITION_INFO] = (value, time.monotonic())

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
