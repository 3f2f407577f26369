"""A transaction's COMMIT sent by someone else than the DBAPI, where SQLAlchemy commits.

The write tracking (:mod:`fastapi_rwdb.orm.writes`) sends a psycopg transaction's
COMMIT together with the read of the primary's WAL position, in one message. It
must go where SQLAlchemy commits the connection: after every ``before_commit``
listener (one that raised after the server had committed would tell the
application its write failed) and inside SQLAlchemy's error handling (a failed
COMMIT is wrapped, the error hooks see it, a dead connection is invalidated).
That place is the engine's ``Dialect.do_commit``, replaced on the engine's own
dialect by :func:`~fastapi_rwdb.engine.sqlalchemy_internals.route_commit`.

:func:`commit_with` leaves the sender on the connection; the engine's commit
finds it there and calls it instead of the DBAPI ``commit()``, once. Both ends
are in this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine

from .sqlalchemy_internals import route_commit

#: Sends one transaction's COMMIT on the driver's connection.
Sender = Callable[[Any], None]

_SENDER = "rwdb_commit"  # connection-record info key, private to this module


def commit_with(connection: Connection, send: Sender) -> dict[str, Any]:
    """Let ``send`` commit ``connection``'s transaction when SQLAlchemy commits it.

    Returns where it was left, for :func:`withdraw` (the pooled connection's record,
    which outlives the ``Connection``). Nothing here holds ``send`` but that place, so
    a sender that refers to it back (to withdraw itself) makes no reference cycle
    once it is taken or withdrawn: a write leaves no garbage for the collector.
    """
    info: dict[str, Any] = connection.info
    info[_SENDER] = send
    return info


def withdraw(where: dict[str, Any], send: Sender) -> None:
    """Take ``send`` back from ``where`` (the transaction rolled back instead): callable
    after the connection went back to the pool, when the transaction's end is noticed."""
    if where.get(_SENDER) is send:
        del where[_SENDER]


def install(engine: Engine) -> None:
    """Route ``engine``'s commits through the senders left by :func:`commit_with`."""
    route_commit(engine, _sender_of)


def _sender_of(dbapi_connection: Any) -> Sender | None:
    info = getattr(dbapi_connection, "info", None)  # the pool's proxy: the record's dict
    return info.pop(_SENDER, None) if isinstance(info, dict) else None
