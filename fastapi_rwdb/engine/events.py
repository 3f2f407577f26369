"""What every engine of the package does around its connections: SQLAlchemy event hooks.

Attached once per engine by the factories (:mod:`.factory`): connect retry with
backoff (and the read side's breaker told about it), the checkout ping
(:mod:`.checkout`), read-only connections on the read side, SQLSTATE 25006 told
apart (a read session's write, or a demoted primary), a driver that lost its place
in the conversation discarded as a lost connection, the write tracking's
COMMIT routed to where SQLAlchemy commits (:mod:`.commit`), and asyncpg sockets'
keepalives (:mod:`.sockets`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import ExceptionContext

from ..errors import (
    DatabaseUnavailableError,
    ReadOnlySessionError,
    ReplicaBenchedError,
    ReplicaTimeoutError,
)
from ..routing.bench import ReplicaBench
from ..routing.replicas import ReadSideHealth
from ..settings import RWDBSettings, Side
from . import asyncpg_connection, commit, deadline, servers
from .checkout import install_ping, ping_timed_out
from .connect_errors import classify_connect_error
from .sockets import set_socket_options
from .sqlalchemy_internals import await_, before_connection_options, set_readonly
from .sqlstates import READ_ONLY_SQLSTATE, brief, is_out_of_step, sqlstate_of
from .wire import abandon, end_unused_transaction

logger = logging.getLogger("fastapi_rwdb")

#: Execution option that marks a connection as serving a read session; errors on
#: such a connection are reported as the caller's mistake, not a server problem.
ROLE_OPTION = "rwdb_role"

#: What psycopg's ``Connection`` options change on the server's transaction: an
#: open transaction must end before SQLAlchemy sets one.
_CHARACTERISTICS = frozenset({"isolation_level", "postgresql_readonly", "postgresql_deferrable"})


def _gave_up(
    side: Side, endpoint: str, attempts: int, exc: BaseException, verdict: str
) -> DatabaseUnavailableError:
    """The outage a failed connect becomes. Where, and what the driver said, go to the
    log only: the exception's text may reach an anonymous client in a 503."""
    if verdict == "misconfigured":
        logger.error(
            "fastapi_rwdb: the %s side at %s refused the login (%s); check POSTGRES_USER, "
            "POSTGRES_PASSWORD and POSTGRES_DB (or RWDB_%s_URL)",
            side,
            endpoint,
            brief(exc),
            side.upper(),
        )
        return DatabaseUnavailableError(f"the {side} side of the database refused the login")
    logger.warning(
        "fastapi_rwdb: cannot connect to the %s side at %s after %d attempts (%s)",
        side,
        endpoint,
        attempts,
        brief(exc),
    )
    return DatabaseUnavailableError(
        f"cannot connect to the {side} side of the database after {attempts} attempts"
    )


def _admitted(connection: Any, record: Any, bench: ReplicaBench, limit: float) -> bool:
    """Whether a new read connection may serve: its replica is learnt (one round trip)
    and not benched. One that may not, or whose question went unanswered, is closed."""
    try:
        if servers.admit(connection, record, bench, limit):
            return True
    except BaseException:
        abandon(connection)
        connection.close()
        raise
    abandon(connection)
    connection.close()
    return False


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
    # Which replica each read connection reached, asked once per connection, only when
    # something can be benched (see servers).
    bench = None
    if side == "read" and health is not None and health.bench.enabled:
        bench = health.bench

    @event.listens_for(engine, "do_connect")
    def _connect_with_retry(dialect: Any, conn_rec: Any, cargs: Any, cparams: Any) -> Any:
        delay = backoff
        if ping_timed_out(conn_rec):
            # The checkout this connect serves found its pooled connection's path frozen:
            # the read runs elsewhere now rather than wait out a connect timeout there.
            error = ReplicaTimeoutError if side == "read" else DatabaseUnavailableError
            raise error(
                f"a pooled connection of the {side} side did not answer its checkout ping "
                "in time; no new one is opened on the same path for this checkout"
            )
        limit = settings.read_timeout if side == "read" else settings.write_timeout
        budget = deadline.ConnectBudget(cparams, limit, is_async=is_async, side=side)
        budget.next_attempt(cparams)
        attempt = landings = 0
        while True:
            try:
                connection = dialect.connect(*cargs, **cparams)
                if bench is not None and not _admitted(connection, conn_rec, bench, limit):
                    landings += 1
                    if landings < servers.LANDINGS:
                        continue  # a new connection: HAProxy sends it to another server
                    raise ReplicaBenchedError(
                        f"{landings} new read connections in a row reached a benched replica "
                        "(one that gave no answer within the read deadline moments ago)"
                    )
            except ReplicaBenchedError:
                raise
            except Exception as exc:
                verdict = classify_connect_error(exc)
                if verdict is None:
                    raise  # not a connection failure: a bug, shown as one
                last = attempt == retries or not budget.next_attempt(cparams, after=delay)
                if verdict == "misconfigured" or last:
                    if health is not None:
                        health.connect_failed()
                    raise _gave_up(side, endpoint, attempt + 1, exc, verdict) from exc
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
                attempt += 1
            else:
                if health is not None:
                    health.connect_succeeded()
                return connection

    if ping:
        install_ping(engine, settings, side=side)
    if not is_async:
        # The tracking's one-message COMMIT goes where SQLAlchemy commits.
        commit.install(engine)

        # Not an engine event: any ConnectionEvents listener puts every statement,
        # BEGIN and COMMIT of the engine on SQLAlchemy's event-dispatch path.
        def _characteristics(conn: Any, opts: dict[str, Any]) -> None:
            # The checkout ping may have opened the transaction (wire.begin_reading_position):
            # psycopg refuses a new isolation level inside one. Nothing ran in it yet.
            if _CHARACTERISTICS.isdisjoint(opts) or conn.in_transaction():
                return
            fairy = conn.connection
            end_unused_transaction(fairy.info, fairy.dbapi_connection)

        before_connection_options(engine, _characteristics)

    # After commit.install: the deadline's COMMIT wrapper must enclose the tracking's.
    if side == "write" and settings.write_timeout > 0:
        deadline.watch(engine, is_async=is_async, side=side, every=settings.write_timeout)

    if is_async:
        # libpq sets psycopg's from its connection parameters (factory.connect_args).
        @event.listens_for(engine, "connect")
        def _tcp_options(dbapi_connection: Any, conn_rec: Any) -> None:
            set_socket_options(dbapi_connection.driver_connection, settings)

        @event.listens_for(engine, "connect")
        def _copy_after_commands(dbapi_connection: Any, conn_rec: Any) -> None:
            # Once per process: can a BEGIN or COMMIT carry a query's answer?
            await_(asyncpg_connection.probe(dbapi_connection.driver_connection))

    if side == "read":
        deadline.watch(engine, is_async=is_async, side=side)

        @event.listens_for(engine, "connect")
        def _read_only(dbapi_connection: Any, conn_rec: Any) -> None:
            set_readonly(engine.dialect, dbapi_connection)

    @event.listens_for(engine, "handle_error")
    def _out_of_step(ctx: ExceptionContext) -> None:
        # SQLAlchemy asks asyncpg whether its socket closed: not yet, at that moment.
        if not is_out_of_step(ctx.original_exception):
            return
        if ctx.connection is not None:  # (None: as it opened, and the pool closes it)
            abandon(ctx.connection.connection.dbapi_connection)  # its goodbye would wait
        ctx.is_disconnect = True  # discard this connection...
        ctx.invalidate_pool_on_disconnect = False  # ... and only this one

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
