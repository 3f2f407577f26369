"""Replica reads that fail for reasons of the replica's, not of the query: retried
on the primary when that cannot contradict what the transaction did before.

Replay conflicts: a replica cancelled a read to apply the primary's changes.

A replica replaying WAL must sometimes remove row versions (VACUUM on the
primary) or take a lock that a running query still needs. It waits
``max_standby_streaming_delay`` and then cancels the query with SQLSTATE
``40001``, "canceling statement due to conflict with recovery" (``40P01`` when
replay deadlocked on a buffer pin). That is not the caller's bug and not an
outage: the same read would succeed elsewhere.

* If the cancelled statement was the **first** of its transaction, nothing has
  been seen yet: the transaction is rolled back and the statement run again on
  the primary, through the read session's own primary bind
  (``ReadBinds.primary``, READ ONLY like every read). The session stays on the
  primary until it is closed, so a request never reads older data after newer.
  The response says ``X-RWDB-Read: primary; reason=replay-conflict``. In
  session consistency the client's token then holds the primary's position.
* A **later** statement moves the same way when the transaction holds nothing a
  new one would lack: each statement took its own snapshot (READ COMMITTED, the
  server's default: the primary's snapshot is newer than the replica's last, as
  the replica's next would have been), every earlier statement was a SELECT the
  session compiled, its rows read at once, with no ``set_config`` or advisory
  lock, and nothing is pending. The rollback keeps what the session loaded as it
  was loaded (an expired object could not load again on an async session).
* Otherwise (a text statement, which may have been a ``SET LOCAL``;
  ``session.connection()``; REPEATABLE READ; more than ``_REMEMBERED``
  statements) the transaction stays where it is:
  :class:`~fastapi_rwdb.errors.ReplicaConflictError` is raised and answered
  with a 503 and ``Retry-After`` (see :mod:`fastapi_rwdb.web.unavailable`).

Unreachable replicas: the read port refused, did not answer, or its proxy could
not reach a server (the connect retry gave up, or the first statement met class
08 / a server going away).

* A transaction's first statement is a read-only one that has seen nothing: it
  runs again on the primary, in the same request (``X-RWDB-Read: primary;
  reason=replica-unreachable``), and the read side's breaker hears of it, so
  that later requests skip the attempt once it opens. The same when its replica
  gave no answer within the read deadline (``reason=replica-timeout``), or every
  new connection reached a benched replica (``reason=replica-benched``, see
  :mod:`fastapi_rwdb.routing.bench`). A later statement moves under the same
  conditions as above, else fails as an outage (503).
* A pooled connection lost under the first statement (HAProxy closes the
  sessions of a node that leaves the read port; a connection the checkout ping
  skipped) is first run again on a new connection of the read port by
  :mod:`.reconnect`, for every session; only if that new connection cannot be
  opened does the read go to the primary.

The retry needs the statement itself, so it hooks where every ORM and Core
statement of a session passes: SQLAlchemy's private
``Session._execute_internal`` (``execute``, ``scalar(s)``, ``get``, SQLModel's
``exec``, and the async session's, which runs the sync one), as
:mod:`.writes` does for the write side (see
:mod:`fastapi_rwdb.engine.sqlalchemy_internals`). A statement that succeeds
costs a dictionary lookup and is kept for the judgement above. Not covered:
statements run on a connection taken with ``session.connection()``, and rows
streamed with ``yield_per``/``stream_results`` (the cancellation arrives while
they are fetched, after some were handed out); those fail with the driver's error.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import CompoundSelect, Connection, Engine, Select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.visitors import iterate

from ..engine.sqlalchemy_internals import configured_isolation, rollback_keeping_loaded
from ..engine.sqlstates import REPLAY_CONFLICT, is_connection_failure, sqlstate_of
from ..engine.wire import POSITION_SQL
from ..errors import (
    DatabaseUnavailableError,
    ReplicaBenchedError,
    ReplicaConflictError,
    ReplicaTimeoutError,
)
from ..observe import metrics
from ..routing.lsn import parse_lsn
from ..routing.request import RequestState, request_state
from .reads import routed_to_replica
from .reconnect import is_autobegun, is_first_statement, transaction_connections, will_retry
from .session_info import ReadBinds, binds_of, own_state

REASON = "replay-conflict"
UNREACHABLE = "replica-unreachable"
TIMED_OUT = "replica-timeout"
BENCHED = "replica-benched"

#: Why a first read left the read side, by what the read side raised.
_REASONS: dict[type[DatabaseUnavailableError], str] = {
    ReplicaTimeoutError: TIMED_OUT,
    ReplicaBenchedError: BENCHED,
}

_ON_PRIMARY = "rwdb_read_on_primary"  # Session.info: a replay conflict moved the session
_RAN = "rwdb_read_ran"  # Session.info: (statement, options) of the transaction so far
_UNSEEN = (None, None)  # in _RAN: statements this module did not see
_REMEMBERED = 20  # statements of a transaction kept for that judgement, at most

#: Isolation levels where each statement takes its own snapshot.
_PER_STATEMENT = frozenset({"READ COMMITTED", "AUTOCOMMIT"})
#: Functions (by name prefix) that leave state in the transaction that calls them.
_STATEFUL = ("set_config", "setseed", "pg_advisory", "pg_try_advisory")


class ReplayConflictRetry(Session):
    """Mixed in before the routing read session: retries, where nothing had been read
    yet, a read that a replica cancelled (replay conflict) or lost (connection closed);
    otherwise lets it fail as a 503."""

    def _execute_internal(self, statement: Any, *args: Any, **kw: Any) -> Any:
        # Private SQLAlchemy method overridden on purpose: see the module docstring
        # and engine/sqlalchemy_internals.py (1.); without it, this class is unused.
        binds = binds_of(self)
        if binds is None:
            return super()._execute_internal(statement, *args, **kw)
        first = is_first_statement(self)  # no connection yet: nothing read
        earlier: list[Any] = [] if first else self.info.get(_RAN, [_UNSEEN])
        self.info[_RAN] = earlier
        try:
            result = super()._execute_internal(statement, *args, **kw)
        except DatabaseUnavailableError as exc:
            # The read port could not be opened (the connect retry gave up and told the
            # breaker), or its replica did not answer within the read deadline (the
            # connection is discarded): a first statement has seen nothing, the primary
            # has it all; a later one, what a new transaction would see (see below).
            movable = _movable(self, first, earlier)
            if not (movable and is_autobegun(self) and routed_to_replica(self, binds)):
                raise
            reason = _REASONS.get(type(exc), UNREACHABLE)
        except DBAPIError as exc:
            reason = _replica_failure(self, binds, exc, first, earlier)
        else:
            if len(earlier) < _REMEMBERED:
                earlier.append((statement, kw.get("execution_options")))
            elif earlier[-1] is not _UNSEEN:
                earlier.append(_UNSEEN)  # too many to judge: kept where they are
            return result
        rollback_keeping_loaded(self)  # what the session loaded stays as loaded
        _move_to_primary(self, reason)
        result = super()._execute_internal(statement, *args, **kw)
        _note_primary_position(self, binds)
        return result

    def connection(self, *args: Any, **kw: Any) -> Any:
        # What runs on the connection it hands out is not seen here: the transaction
        # may hold state from now on (a SET LOCAL, a cursor).
        conn = super().connection(*args, **kw)
        ran = self.info.setdefault(_RAN, [])
        if not ran or ran[-1] is not _UNSEEN:  # (once is enough: called in a loop, flat)
            ran.append(_UNSEEN)
        return conn

    def get_bind(self, mapper: Any = None, **kw: Any) -> Engine | Connection:
        binds = binds_of(self)
        if self.info.get(_ON_PRIMARY) and kw.get("bind") is None and binds is not None:
            return binds.primary
        return super().get_bind(mapper, **kw)

    def close(self) -> None:
        super().close()
        self.info.pop(_ON_PRIMARY, None)
        self.info.pop(_RAN, None)


def _replica_failure(
    session: Session, binds: ReadBinds, exc: DBAPIError, first: bool, earlier: list[Any]
) -> str:
    """Why a failed replica read may run again on the primary; raises when it may not."""
    code = sqlstate_of(exc)
    if code in REPLAY_CONFLICT and _on_replica(session, binds.replica):
        if not (_movable(session, first, earlier) and is_autobegun(session)):
            raise ReplicaConflictError(
                "a replica cancelled this read to replay the primary's changes (SQLSTATE "
                f"{code}, conflict with recovery) in a transaction that could not be "
                "moved to the primary; retry the request"
            ) from exc
        return REASON
    unreachable = is_connection_failure(code) or exc.connection_invalidated
    # A BEGIN that failed (the read deadline's one-message BEGIN runs in after_begin)
    # left no connection in the transaction: the routing's choice says where it was.
    on_replica = _on_replica(session, binds.replica) or routed_to_replica(session, binds)
    if not (unreachable and is_autobegun(session) and on_replica):
        raise exc
    if not _movable(session, first, earlier):
        raise exc
    if first:
        if will_retry(session, exc):
            raise exc  # LostConnectionRetry runs it again on a new replica connection first
        if binds.health is not None:
            binds.health.connect_failed()  # the proxy took the connection, no server behind
    # (A later statement's connection was open and served: lost, not refused; the
    # breaker, which counts refusals, does not hear of it.)
    return UNREACHABLE


def _movable(session: Session, first: bool, earlier: list[Any]) -> bool:
    """Whether the statement that failed can run in a new transaction on the primary.

    A first statement has seen nothing. A later one can when its transaction held
    nothing a new one would lack: every statement took its own snapshot (READ
    COMMITTED: the primary's is newer than any the replica gave, as the replica's
    next would have been), every earlier one was a SELECT compiled by the session,
    its rows read at once, and nothing is pending (the rollback would drop it).
    Anything else (text, which may be a ``SET LOCAL``; ``session.connection()``;
    streamed rows; ``set_config``, an advisory lock) keeps the failure where it is."""
    if first:
        return True
    if session.new or session.dirty or session.deleted:
        return False
    if not all(_snapshot_per_statement(c) for c in transaction_connections(session)):
        return False
    return all(_leaves_nothing(*ran) for ran in earlier)


def _snapshot_per_statement(conn: Connection) -> bool:
    level = (
        conn.get_execution_options().get("isolation_level")
        or configured_isolation(conn.dialect)
        or conn.default_isolation_level
    )
    return level in _PER_STATEMENT


def _leaves_nothing(statement: Any, options: Any) -> bool:
    """Whether ``statement`` left its transaction as it found it."""
    if not isinstance(statement, (Select, CompoundSelect)):
        return False
    if isinstance(statement, Select) and statement._for_update_arg is not None:
        return False
    for given in (options or {}, statement.get_execution_options()):
        if given.get("stream_results") or given.get("yield_per"):
            return False
    return not any(
        isinstance(element, FunctionElement)
        and str(getattr(element, "name", "")).lower().startswith(_STATEFUL)
        for element in iterate(statement)
    )


def _on_replica(session: Session, replica: Engine) -> bool:
    """Whether the transaction holds a connection of the read port's pool. (A 40001 on
    the primary is a genuine serialization failure, not a replay conflict.)"""
    return any(c.engine.pool is replica.pool for c in transaction_connections(session))


def _note_primary_position(session: Session, binds: ReadBinds) -> None:
    """Session consistency: the client has now read the primary, so its later reads
    must go nowhere older. The position is read after the statement, on its own
    connection, so it is at least as new as what the statement saw; one round trip
    more, on a path taken only after a replay conflict."""
    if not binds.follows_reads:
        return
    state: RequestState | None = own_state(session) or request_state.get()
    if state is None:
        return
    lsn = parse_lsn(session.connection().exec_driver_sql(POSITION_SQL).scalar())
    if lsn is not None:
        state.note_seen(lsn)


def _move_to_primary(session: Session, reason: str) -> None:
    session.info[_ON_PRIMARY] = True
    metrics.record_route("primary", reason)
    state = request_state.get()
    if state is not None:
        state.read_target = "primary"
        state.read_reason = reason
