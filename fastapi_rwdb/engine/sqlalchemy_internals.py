"""Every use of SQLAlchemy that is not its public API, fenced in one module.

Each is here because it is the cheap way (or the only way) to do something on
the hot path, and each is checked when this module is imported. If a
SQLAlchemy release changes one, the package falls back to a public way that is
slower but still correct, and says so once in the log; the contract tests
(``tests/unit/test_sqlalchemy_contract.py``) fail loudly on that release, so the
fallback is never the silent state of affairs.

1. ``Session._execute_internal(statement, params, *, execution_options,
   bind_arguments, ...)``: every ORM and Core statement of a session passes
   through it (``execute``, ``scalar``, ``scalars``, ``get``, SQLModel's
   ``exec``; the async session runs the sync one). Overridden by
   :class:`~fastapi_rwdb.orm.writes.TrackedWrites` (what a transaction may have
   written, noted for free), :class:`~fastapi_rwdb.orm.replay.ReplayConflictRetry`
   and :class:`~fastapi_rwdb.orm.reconnect.LostConnectionRetry` (retrying a first
   statement), and :class:`~fastapi_rwdb.orm.reads.RoutedReads` (a first statement
   whose replica's position was checked with it, sent again when it was short).
   The public alternative, an engine
   ``before_cursor_execute`` listener, puts every statement of the application
   on SQLAlchemy's slower event-dispatch path. Fallback: every transaction counts
   as "may have written", so PostgreSQL is asked at commit (psycopg: in the
   COMMIT's own message); replay conflicts are answered with a 503, not retried;
   a read's position is always asked before its first statement.
2. ``sqlalchemy.util.await_`` (``await_only`` before 2.1): runs a coroutine from
   the sync side of an async engine, inside SQLAlchemy's greenlet, which is
   where the pool's hooks run.
3. ``Dialect.set_readonly(dbapi_connection, value)`` of the psycopg and asyncpg
   dialects: a read connection is made read-only once, when opened. Fallback:
   the drivers' own switch (psycopg's ``read_only``, the asyncpg adapter's
   ``readonly``), which is what the method sets.
4. ``Dialect.do_commit`` replaced on one engine's *own* dialect instance
   (:func:`route_commit`): the method is public, replacing it is not a
   documented extension point. It is where SQLAlchemy commits a connection,
   after every ``before_commit`` listener, which is where the write tracking's
   one-message COMMIT must go (:mod:`fastapi_rwdb.engine.commit`).
5. ``Dialect.set_connection_execution_options(connection, opts)`` wrapped on one
   engine's own dialect instance (:func:`before_connection_options`), for the same
   reason as 4.: it is where SQLAlchemy applies a connection's options, and the
   public alternative, the engine's ``set_connection_execution_options`` event,
   turns on SQLAlchemy's per-statement event dispatch for every statement and
   every BEGIN, COMMIT and ROLLBACK of the engine (see benchmarks/peers.md for
   what it cost). Fallback: that event.
6. ``Dialect.do_execute``, ``do_execute_no_params``, ``do_executemany``,
   ``do_commit`` and ``do_rollback`` wrapped on one engine's own dialect instance
   (:func:`around_driver_calls`): the statement deadline
   (:mod:`fastapi_rwdb.engine.deadline`) is armed just before the driver is
   called and disarmed when it returns. The public alternative, the engine's
   ``before_cursor_execute``/``after_cursor_execute``/``commit`` events, turns
   on the same per-statement event dispatch as 5. An error the driver raises
   still reaches the dialect's ``handle_error`` event (a ``DialectEvents``
   listener: it leaves the engine's statements on the fast path). Fallback:
   those engine events.
7. ``_start_transaction()`` and ``_transaction`` of SQLAlchemy's asyncpg adapter
   (:func:`adapter_transaction_opener`): the coroutine its cursor awaits to open
   the connection's transaction before the first statement, and where it keeps
   the open one. The checkout's ping opens a read's transaction with the
   replica's position read in the same message (as psycopg's does, through its
   public attributes), so that the adapter then sees the transaction open and
   sends no ``BEGIN`` of its own. Fallback: the position read in a round trip
   of its own, before the transaction.
8. ``DefaultDialect._on_connect_isolation_level``: the level
   ``create_engine(isolation_level=...)`` sets on every new connection, which
   neither ``Connection.get_execution_options()`` nor ``default_isolation_level``
   (the server's own) shows, and which cannot be asked of a connection already
   lost. The read session moves a later statement whose replica was lost to the
   primary only when every statement of the transaction took its own snapshot
   (:mod:`fastapi_rwdb.orm.replay`). Fallback: the level is unknown, and such a
   statement fails as an outage (503), as before.
9. ``Session.identity_map`` swapped for an empty one while the session rolls back
   (:func:`rollback_keeping_loaded`): a rollback expires every object the session
   holds, and a read moved to the primary after its transaction had loaded objects
   must leave them as they were (an expired object cannot load again on an async
   session; SQLModel reads its ``__dict__``, found empty). Only for a session with
   nothing pending (else a plain rollback, which forgets the changes). Fallback:
   a plain rollback.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import Engine, event
from sqlalchemy import util as _sa_util
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

logger = logging.getLogger("fastapi_rwdb")

_T = TypeVar("_T")

#: ``sqlalchemy.util.await_`` (2.1), or ``await_only`` (its name before; see 2. above).
await_: Callable[[Awaitable[_T]], _T] = getattr(_sa_util, "await_", None) or _sa_util.await_only

__all__ = [
    "EXECUTE_INTERNAL",
    "Armed",
    "adapter_transaction_opener",
    "around_driver_calls",
    "await_",
    "before_connection_options",
    "configured_isolation",
    "rollback_keeping_loaded",
    "route_commit",
    "set_readonly",
]

#: Keyword arguments ``Session._execute_internal`` is known to take.
_EXECUTE_INTERNAL_PARAMS = ("statement", "params", "execution_options", "bind_arguments")


def _execute_internal_as_expected() -> bool:
    method = getattr(Session, "_execute_internal", None)
    if not callable(method):
        return False
    try:
        names = list(inspect.signature(method).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return False
    return names[:1] == ["self"] and all(p in names for p in _EXECUTE_INTERNAL_PARAMS)


#: Whether sessions may override ``Session._execute_internal`` (see 1. above).
EXECUTE_INTERNAL = _execute_internal_as_expected()
if not EXECUTE_INTERNAL:  # pragma: no cover - only on a SQLAlchemy that changed it
    logger.warning(
        "fastapi_rwdb: this SQLAlchemy has no Session._execute_internal of the expected "
        "shape; write sessions ask PostgreSQL at every commit whether they wrote, and "
        "replay conflicts on replicas are answered with 503 instead of being retried"
    )


def set_readonly(dialect: Dialect, dbapi_connection: Any) -> None:
    """Make a new DBAPI connection read-only (every transaction ``READ ONLY``)."""
    method = getattr(dialect, "set_readonly", None)
    if callable(method):
        method(dbapi_connection, True)
    elif hasattr(dbapi_connection, "read_only"):  # pragma: no cover - psycopg
        dbapi_connection.read_only = True
    else:  # pragma: no cover - SQLAlchemy's asyncpg adapter
        dbapi_connection.readonly = True


#: :func:`configured_isolation` when SQLAlchemy does not say (see 8. above).
UNKNOWN_ISOLATION = "unknown"


def configured_isolation(dialect: Dialect) -> str | None:
    """The isolation level ``create_engine(isolation_level=...)`` gave the connections of
    ``dialect``'s engine (see 8. above): ``None`` when none was given, or
    :data:`UNKNOWN_ISOLATION`."""
    level = getattr(dialect, "_on_connect_isolation_level", UNKNOWN_ISOLATION)
    return level if level is None or isinstance(level, str) else UNKNOWN_ISOLATION


def rollback_keeping_loaded(session: Session) -> None:
    """Roll ``session``'s transaction back without expiring the objects it holds (see 9.
    above). With changes pending, a plain rollback: it forgets them, as it must."""
    kept = getattr(session, "identity_map", None)
    if kept is None or session.new or session.dirty or session.deleted:
        session.rollback()
        return
    session.identity_map = type(kept)()
    try:
        session.rollback()
    finally:
        session.identity_map = kept


def adapter_transaction_opener(dbapi_connection: Any) -> Callable[[], Awaitable[None]] | None:
    """The coroutine function that opens the asyncpg adapter's transaction as its cursor
    would (see 7. above), or ``None``: not that adapter's, a transaction is open
    already, or a SQLAlchemy without it."""
    start = getattr(dbapi_connection, "_start_transaction", None)
    if not inspect.iscoroutinefunction(start) or not hasattr(dbapi_connection, "_transaction"):
        return None
    if dbapi_connection._transaction is not None:
        return None
    return start


def route_commit(engine: Engine, hook_of: Callable[[Any], Callable[[Any], None] | None]) -> None:
    """Let ``hook_of(dbapi_connection)`` send a connection's COMMIT in SQLAlchemy's stead.

    SQLAlchemy commits a connection through ``Dialect.do_commit``, after every
    ``before_commit`` listener and with its own error handling around it (an
    error is wrapped, the error hooks see it, a dead connection is invalidated).
    Only this engine's own dialect instance is changed; when ``hook_of`` has
    nothing for a connection, the DBAPI ``commit()`` runs as before.
    """
    dbapi_commit = engine.dialect.do_commit

    def do_commit(dbapi_connection: Any) -> None:
        hook = hook_of(dbapi_connection)
        if hook is None:
            dbapi_commit(dbapi_connection)
        else:
            hook(dbapi_connection.driver_connection)

    engine.dialect.do_commit = do_commit  # type: ignore[method-assign]


def before_connection_options(engine: Engine, hook: Callable[[Any, Any], None]) -> None:
    """Call ``hook(connection, opts)`` whenever a ``Connection`` of ``engine`` is given
    execution options, before SQLAlchemy applies them (see 5. above).

    Only this engine's own dialect instance is changed. On a SQLAlchemy whose
    dialect has no such method, the engine's ``set_connection_execution_options``
    event is used instead (correct, with every statement on the slower path).
    """
    original = getattr(engine.dialect, "set_connection_execution_options", None)
    if not callable(original):  # pragma: no cover - only on a SQLAlchemy that changed it
        logger.warning(
            "fastapi_rwdb: this SQLAlchemy's dialect has no set_connection_execution_options; "
            "using the engine event instead (every statement then pays for event dispatch)"
        )
        event.listen(engine, "set_connection_execution_options", hook)
        return

    def set_connection_execution_options(connection: Any, opts: Any) -> None:
        hook(connection, opts)
        original(connection, opts)

    engine.dialect.set_connection_execution_options = set_connection_execution_options  # type: ignore[method-assign]


#: The dialect methods :func:`around_driver_calls` wraps, and the arguments each takes.
_DRIVER_CALLS = {
    "do_execute": ["cursor", "statement", "parameters", "context"],
    "do_execute_no_params": ["cursor", "statement", "context"],
    "do_executemany": ["cursor", "statement", "parameters", "context"],
    "do_commit": ["dbapi_connection"],
    "do_rollback": ["dbapi_connection"],
}


def _driver_calls_as_expected(dialect: Dialect) -> bool:
    for name, params in _DRIVER_CALLS.items():
        method = getattr(dialect, name, None)
        if not callable(method):
            return False
        try:
            if list(inspect.signature(method).parameters) != params:
                return False
        except (TypeError, ValueError):  # pragma: no cover
            return False
    return True


#: What :func:`around_driver_calls`' ``arm`` answers: whether it armed anything, or
#: the function that hands the statement to the driver in its stead (it is given
#: the call to make).
Armed = bool | Callable[[Callable[[], None]], None]


def around_driver_calls(
    engine: Engine,
    arm: Callable[[Any], Armed],
    disarm: Callable[[Any], bool],
    *,
    commits: bool,
    arm_rollback: Callable[[Any], bool] | None = None,
) -> None:
    """Call ``arm(pooled)`` just before ``engine`` hands a statement (and, with
    ``commits``, a COMMIT) to the driver, and ``disarm(pooled)`` when the driver
    returned; ``pooled`` is the pool's connection (``Connection.connection``).
    ``arm_rollback``: the same for a ROLLBACK (which never carries a statement).

    ``arm`` says whether it armed anything: if not, the driver is called with
    nothing around it. It may instead return a function that sends the statement
    its own way (the deadline's ``BEGIN`` sent with the first statement): it is
    given the driver call to make. ``disarm`` says whether the connection must not be used
    again (what watched it gave up as the answer came): the ``Connection`` is
    then invalidated (a COMMIT's connection is recycled at its next checkout,
    as the dialect does not see the ``Connection``). When the driver raises,
    nothing is disarmed here: the engine's ``handle_error`` listener finds what
    was armed and decides what the error means. See 6. above.
    """
    dialect = engine.dialect
    if not _driver_calls_as_expected(dialect):  # pragma: no cover - a SQLAlchemy that changed
        logger.warning(
            "fastapi_rwdb: this SQLAlchemy's dialect methods do_execute, do_executemany or "
            "do_commit changed; the statement deadline uses engine events instead (every "
            "statement then pays for event dispatch)"
        )
        _around_by_events(engine, arm, disarm, commits=commits, arm_rollback=arm_rollback)
        return

    def around(original: Callable[..., None]) -> Callable[..., None]:
        def call(cursor: Any, statement: Any, *rest: Any) -> None:
            context = rest[-1]
            if context is None:  # not a Connection's statement: nothing to watch
                original(cursor, statement, *rest)
                return
            conn = context.root_connection
            armed = arm(conn.connection)
            if armed is True:
                original(cursor, statement, *rest)
            elif not armed:
                original(cursor, statement, *rest)
                return
            else:
                armed(lambda: original(cursor, statement, *rest))
            if disarm(conn.connection):
                conn.invalidate()

        return call

    dialect.do_execute = around(dialect.do_execute)  # type: ignore[method-assign]
    dialect.do_execute_no_params = around(dialect.do_execute_no_params)  # type: ignore[method-assign]
    dialect.do_executemany = around(dialect.do_executemany)  # type: ignore[method-assign]
    wrapped: Any = dialect  # its methods replaced on this instance only
    if commits:
        wrapped.do_commit = _around_ending(dialect.do_commit, arm, disarm)
    if arm_rollback is not None:
        wrapped.do_rollback = _around_ending(dialect.do_rollback, arm_rollback, disarm)


def _around_ending(
    original: Callable[[Any], None], arm: Callable[[Any], Armed], disarm: Callable[[Any], bool]
) -> Callable[[Any], None]:
    """A COMMIT's or ROLLBACK's dialect method with ``arm`` and ``disarm`` around it
    (SQLAlchemy hands these the pool's connection)."""

    def call(pooled: Any) -> None:
        if not arm(pooled):
            original(pooled)
            return
        original(pooled)
        if disarm(pooled):
            pooled.invalidate(soft=True)

    return call


def _around_by_events(
    engine: Engine,
    arm: Callable[[Any], Armed],
    disarm: Callable[[Any], bool],
    *,
    commits: bool,
    arm_rollback: Callable[[Any], bool] | None,
) -> None:  # pragma: no cover - only on a SQLAlchemy that changed the dialect methods
    """:func:`around_driver_calls` through the engine's public events (slower): what
    ``arm`` would send with the statement goes just before it instead."""

    def before(conn: Any, *args: Any) -> None:
        if disarm(conn.connection):  # a COMMIT's watch left armed (see below)
            conn.invalidate()
        armed = arm(conn.connection)
        if callable(armed):
            armed(lambda: None)

    def after(conn: Any, *args: Any) -> None:
        if disarm(conn.connection):
            conn.invalidate()

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    if commits:
        # The commit event comes before the driver's COMMIT; its watch is disarmed
        # when the connection next begins or executes (or goes back to the pool).
        event.listen(engine, "commit", before)
        event.listen(engine, "begin", after)
    if arm_rollback is not None:
        # The same for a ROLLBACK, disarmed when the connection goes back to the pool.
        event.listen(engine, "rollback", lambda conn: arm_rollback(conn.connection))
