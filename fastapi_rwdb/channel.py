"""What sessions and the pool's hooks pass each other outside any call.

A pooled connection's record (``ConnectionPoolEntry.info``, a dict that lives as
long as the DBAPI connection) and one contextvar carry values between code that
never calls each other: a session on one side, the pool's event hooks
(:mod:`fastapi_rwdb.hooks`) on the other. Nothing in the call signatures shows
these trips, so they are all listed here:

- **The replica's position, at no round trip of its own.** A read session that
  needs to know how far the server behind its connection has got sets
  :data:`want_position` around ``engine.connect()``
  (:func:`fastapi_rwdb.sessions._checkout`); the pool's checkout ping
  (``_ping`` in :func:`fastapi_rwdb.hooks.instrument`) sees it, reads the
  position instead of running its no-op query, and leaves it under
  :data:`POSITION_INFO`, where the session takes it. Same round trip as the ping
  it replaces.
- **The transaction, opened by that same ping.** When the session will run its
  statements on the connection it checks out, it also sets
  :data:`begin_with_position`; on psycopg the ping then sends the ``BEGIN`` in
  the position query's message (:func:`fastapi_rwdb.driver.begin_reading_position`)
  and marks the record with :data:`BEGUN_INFO` until something needs the
  transaction gone before any statement ran in it
  (:func:`fastapi_rwdb.driver.end_unused_transaction`).
- **No round trip for a connection known to be behind.** A read that tries replica
  connections for a position also sets :data:`position_needed`; the ping
  remembers each position it read (:data:`LAST_POSITION_INFO`), and a connection
  whose server was short of the needed position moments ago gets that
  remembered position instead of a ping, marked :data:`REMEMBERED_INFO`, so the
  session moves on to the next connection at no cost.
- **The write tracking's COMMIT.** The tracking (:mod:`fastapi_rwdb.tracking`)
  leaves a callable under :data:`COMMIT_INFO`; the engine's commit (routed by
  :func:`fastapi_rwdb.internals.route_commit`, attached in hooks) calls it
  instead of the DBAPI ``commit()``.
- **A position other than the server's.** A connection with
  :data:`REPORTED_POSITION` set reports that value whenever read-your-writes asks
  (the testing kit's stale replica).
"""

from __future__ import annotations

from contextvars import ContextVar

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
#: Set while a read session checks out a connection whose position it needs (a
#: client's token, the lag limit, session consistency): the checkout ping then
#: reads that position instead of running its no-op query. Same round trip, so
#: knowing where the server is costs nothing more. Other checkouts ping the cheap way.
want_position: ContextVar[bool] = ContextVar("rwdb_want_position", default=False)
#: Set with ``want_position`` when the session will run its statements on the
#: connection it checks out (not when it only wants the position and gives the
#: connection back). On psycopg the ping then opens the transaction too: see
#: :func:`fastapi_rwdb.driver.begin_reading_position`.
begin_with_position: ContextVar[bool] = ContextVar("rwdb_begin_with_position", default=False)
#: Connection-record info key: the checkout ping left a transaction open that no
#: statement may have used yet (see :func:`fastapi_rwdb.driver.end_unused_transaction`).
BEGUN_INFO = "rwdb_begun"
#: Set with ``want_position`` while a read tries replica connections for this
#: position: see :data:`LAST_POSITION_INFO`.
position_needed: ContextVar[int | None] = ContextVar("rwdb_position_needed", default=None)
#: Connection-record info key: ``(position, time.monotonic())`` of the last position
#: the ping read on this connection.
LAST_POSITION_INFO = "rwdb_last_position"
#: Connection-record info key: the position under ``POSITION_INFO`` is the one
#: remembered from a moment ago (short of the needed one), not asked now.
REMEMBERED_INFO = "rwdb_remembered"
