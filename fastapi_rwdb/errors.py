"""Exceptions raised by fastapi_rwdb.

They carry messages written for the person who has to fix the problem: which
setting, which dependency, what to use instead. None of them ever includes a
password or a full connection URL.
"""

from __future__ import annotations


class RWDBError(Exception):
    """Base class for every error this package raises on purpose."""


class SettingsError(RWDBError, ValueError):
    """The configuration cannot work; raised at start-up, naming the variable."""


class ReadOnlySessionError(RWDBError):
    """A read session was asked to change data.

    Raised before the statement reaches the database when the ORM tries to
    flush, and in place of PostgreSQL's ``25006`` error when Core DML or raw SQL
    slips through. Nothing is written either way.
    """


class DatabaseUnavailableError(RWDBError, ConnectionError):
    """A connection could not be opened, even after the bounded retries.

    Both drivers report it the same way (asyncpg would raise a bare ``OSError``,
    psycopg an ``OperationalError``). :func:`fastapi_rwdb.setup` turns it into a
    503 with ``Retry-After``. Its text names the side only: hosts, ports and the
    driver's message are logged, and the error it was raised from carries them.
    """


class ReplicaConflictError(RWDBError):
    """A replica cancelled a read to replay the primary's changes (SQLSTATE ``40001``,
    "conflict with recovery") in a transaction that could not be moved.

    A transaction's first statement is retried on the primary instead (nothing had
    been seen yet), and so is a later one whose transaction held nothing a new one
    would lack (READ COMMITTED, only compiled SELECTs before it: see
    :mod:`fastapi_rwdb.orm.replay`). Here it might have (a ``SET LOCAL`` in a text
    statement, a cursor, one snapshot for the whole transaction), so the request
    fails, and :func:`fastapi_rwdb.setup` turns this into a 503 with
    ``Retry-After``. Raised from the driver error, kept as ``__cause__``.
    """


class ReplicaTimeoutError(DatabaseUnavailableError):
    """A read got no answer from its replica within its deadline (``RWDB_READ_TIMEOUT``,
    or the route's ``timeout=``), in a transaction that could not be moved.

    The path to that replica is frozen (a stopped PgBouncer, a host stalled on I/O):
    a busy server would have answered within the deadline, with its own statement
    timeout (SQLSTATE ``57014``). The connection was discarded. A transaction's first
    statement runs again elsewhere instead, and a later one on the primary when that
    cannot lose what its transaction set up (:class:`ReplicaConflictError` says
    when); here it could: the request fails, answered with a 503 and ``Retry-After``.
    """


class WriteOutcomeUnknownError(DatabaseUnavailableError):
    """A write-side statement or COMMIT got no answer within ``RWDB_WRITE_TIMEOUT``:
    the write may or may not have happened.

    The connection was discarded and nothing is run again (the server may have
    committed it). Answered with a 503 and ``Retry-After`` whose text says so; a
    client that retries should send an idempotency key (docs/reliability.md, "Deadlines").
    """


class ReplicaBenchedError(DatabaseUnavailableError):
    """Every connection the read port gave for this read reached a benched replica (one
    that gave no answer within the read deadline moments ago: ``RWDB_REPLICA_BENCH_SECONDS``).

    A transaction's first statement then runs on the primary
    (``X-RWDB-Read: primary; reason=replica-benched``); anything else is a 503.
    """
