"""Which replica is behind each read connection, and the bench applied to it.

Through HAProxy's read port a client cannot choose a replica: each new connection
reaches whichever server comes next. To pass over a benched replica
(:mod:`fastapi_rwdb.routing.bench`) the package must know, per connection, which
server it reached. It asks once, when the connection opens (:func:`admit`, one
round trip, outside any transaction), and keeps the answer in the pool record's
info: no request pays for it again, and the checkout's test (:func:`benched`) is
a dictionary lookup.

The name. Behind PgBouncer, ``inet_server_addr()``/``inet_server_port()`` are
the address PgBouncer connected to, which no view of the cluster lists. A
replica's WAL receiver (``pg_stat_wal_receiver.slot_name``) names the replication
slot Patroni made for that member, named after the member (Patroni lower-cases
it and writes any character other than ``a-z0-9_`` as ``_``): the name
``pg_stat_replication`` and the replica view list, so the bench, the debug route
and the gauge name the same replica. The app role sees it through ``pg_monitor``,
which the replica view already needs. Without that role, without slots, or on a
server that streams from no one (the primary behind the read port when no replica
is up), the name is the PostgreSQL server's ``address:port``, unique all the same.
Neither is a secret; the metric label and the protected debug route show it, the
anonymous 503 does not.

What benches (:func:`timed_out`): the read deadline firing on a statement or a
BEGIN (:mod:`.deadline`), or on the checkout ping (:mod:`.checkout`), of a
connection whose server is known. A connect that times out does not: through
the read port it cannot say where it was going (it feeds the breaker, as every
failed connect does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..routing.bench import ReplicaBench
from .wire import fetch_outside_transaction

#: One text column: the member's slot name, else the server's address:port.
IDENTITY_SQL = (
    "SELECT coalesce((SELECT slot_name::text FROM pg_stat_wal_receiver LIMIT 1),"
    " host(inet_server_addr()) || ':' || inet_server_port(), 'local socket')"
)

#: New connections a read may close because they reached a benched replica before
#: it gives up on the read port (:class:`~fastapi_rwdb.errors.ReplicaBenchedError`).
#: HAProxy's round robin sends each new connection to the next server, so with one
#: replica benched the next connect reaches another; three covers two benched in a
#: row, and bounds what a read pays when all are.
LANDINGS = 3

# Connection-record info key, private to this module.
_SERVER = "rwdb_server"


@dataclass(frozen=True, slots=True)
class _Server:
    name: str
    bench: ReplicaBench


def admit(connection: Any, record: Any, bench: ReplicaBench, timeout: float) -> bool:
    """Learn which replica ``connection`` (just opened, driver-level) reached, once, and
    keep it on its pool ``record``; whether the connection may serve (its replica is
    not benched). ``timeout``: the read deadline (0: none)."""
    raw = getattr(connection, "driver_connection", connection)
    name = fetch_outside_transaction(raw, IDENTITY_SQL, timeout or None) or "unknown"
    bench.saw(name)
    # info goes with this connection; record_info outlives it (see passed_over).
    record.info[_SERVER] = record.record_info[_SERVER] = _Server(name, bench)
    return not bench.is_benched(name)


def passed_over(record: Any) -> bool:
    """Whether the pool drops pooled ``record`` rather than hand it out, when another
    idle one can serve: its connection reaches a benched replica, or it has none (its
    last was discarded) while a replica is benched. Opening one then could reach the
    frozen replica, and a connect through HAProxy that gets no answer costs its whole
    timeout; the pool opens new connections again when the load needs them."""
    if record.dbapi_connection is not None:
        return benched(record.info)
    server: _Server | None = record.record_info.get(_SERVER)
    return server is not None and server.bench.any_benched()


def benched(info: dict[str, Any]) -> bool:
    """Whether the connection whose record info is ``info`` reaches a benched replica."""
    server: _Server | None = info.get(_SERVER)
    return server is not None and server.bench.is_benched(server.name)


def timed_out(info: dict[str, Any]) -> None:
    """The connection whose record info is ``info`` got no answer within its deadline:
    bench its replica (nothing when the server is unknown, or not a read's)."""
    server: _Server | None = info.get(_SERVER)
    if server is not None:
        server.bench.bench(server.name)


def replica_of(info: dict[str, Any]) -> str | None:
    """The replica behind the connection whose record info is ``info``, if known."""
    server: _Server | None = info.get(_SERVER)
    return None if server is None else server.name
