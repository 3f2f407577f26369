"""Optional Prometheus metrics: ``pip install 'fastapi-rwdb[metrics]'``.

Without ``prometheus_client`` every function here returns at once (one
module-level flag is checked). With it, these are registered on
``prometheus_client``'s default registry when the package is imported:

``rwdb_reads_routed_total{target, reason}``
    Routing decisions of read sessions: ``target`` is ``replica`` or
    ``primary``, ``reason`` one of the few :func:`fastapi_rwdb.routing.choose_read_route`
    gives (``default``, ``caught-up``, ``replica-behind``, ``wrote-in-request``,
    ``pinned``, ...).
``rwdb_tokens_total{event}``
    Read-your-writes tokens ``issued``, ``rejected`` (sent by a client but
    forged, garbled, expired or foreign) and ``cleared``.

The gauges below are registered by :func:`install`, which ``setup()`` calls:

``rwdb_pool_size``, ``rwdb_pool_checked_out``, ``rwdb_pool_overflow`` ``{pair, side}``
    The six connection pools (``pair`` ``sync``/``async``, ``side``
    ``write``/``read``/``primary_read``), read when scraped; pools not built yet
    are left out.
``rwdb_replica_lag_bytes``, ``rwdb_replica_lag_seconds`` ``{replica}``
    Each replica the primary streams to (``pg_stat_replication``), from the
    app's last background look; left out while there is none.
``rwdb_replica_benched{replica}``
    1 while a replica is benched (it gave no answer within the read deadline and is
    passed over for ``RWDB_REPLICA_BENCH_SECONDS``), else 0; every replica a read
    connection of this process has reached, named as the bench names it.

Nothing is served over HTTP: mount ``prometheus_client.make_asgi_app()``
wherever the application wants its metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from . import listeners

try:
    from prometheus_client import REGISTRY, Counter
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError:  # pragma: no cover - exercised only without the extra
    ENABLED = False
else:
    ENABLED = True

if ENABLED:
    _routed = Counter(
        "rwdb_reads_routed",
        "Read sessions routed, by target (replica or primary) and reason",
        ["target", "reason"],
    )
    _tokens = Counter(
        "rwdb_tokens",
        "Read-your-writes tokens issued, rejected or cleared",
        ["event"],
    )

    class _PoolCollector(Collector):
        """Reads the process-wide Database's pools and replica view at scrape time."""

        def __init__(self, database: Callable[[], Any]) -> None:
            self._database = database

        def describe(self) -> Iterable[Any]:
            return _pool_families()

        def collect(self) -> Iterable[Any]:
            families = _pool_families()
            size, checked_out, overflow, lag_bytes, lag_seconds, benched = families
            database = self._database()
            built = ("engines", "async_engines", "primary_read", "async_primary_read")
            if not any(database.is_built(name) for name in built):
                return families  # and never load settings from here
            health = database.health
            for name, on_bench in health.bench.states().items():
                benched.add_metric([name], 1 if on_bench else 0)
            if health.fresh():
                for replica in health.replicas:
                    if replica.lag_bytes is not None:
                        lag_bytes.add_metric([replica.name], replica.lag_bytes)
                    if replica.lag_seconds is not None:
                        lag_seconds.add_metric([replica.name], replica.lag_seconds)
            for pair, sides in database.pool_stats().items():
                for side, stats in sides.items():
                    if not stats["built"]:
                        continue
                    labels = [pair, side]
                    size.add_metric(labels, stats["size"])
                    checked_out.add_metric(labels, stats["checked_out"])
                    overflow.add_metric(labels, stats["overflow"])
            return families

    def _pool_families() -> list[GaugeMetricFamily]:
        labels = ["pair", "side"]
        return [
            GaugeMetricFamily("rwdb_pool_size", "Configured pool size", labels=labels),
            GaugeMetricFamily(
                "rwdb_pool_checked_out", "Connections lent out by the pool", labels=labels
            ),
            GaugeMetricFamily(
                "rwdb_pool_overflow", "Connections open beyond the pool size", labels=labels
            ),
            GaugeMetricFamily(
                "rwdb_replica_lag_bytes",
                "WAL a replica has still to replay",
                labels=["replica"],
            ),
            GaugeMetricFamily(
                "rwdb_replica_lag_seconds",
                "How long ago the primary had WAL a replica has not replayed yet",
                labels=["replica"],
            ),
            GaugeMetricFamily(
                "rwdb_replica_benched",
                "1 while a replica that gave no answer in time is passed over, else 0",
                labels=["replica"],
            ),
        ]


_installed = False


def install(database: Callable[[], Any]) -> None:
    """Register the pool and replica gauges, once per process (``setup()`` does).

    ``database`` returns the Database to report on when scraped. Passed in, so
    that this module, which the sessions use for their counters, imports nothing
    of the package above it.
    """
    global _installed
    if ENABLED and not _installed:
        _installed = True
        REGISTRY.register(_PoolCollector(database))


# Labelled children, cached: ``labels()`` costs far more than ``inc()``. The label
# values come from a handful of literals in this package, so the caches stay tiny.
_route_children: dict[tuple[str, str], Any] = {}
_token_children: dict[str, Any] = {}


def record_route(target: str, reason: str, checked_lsn: int | None = None) -> None:
    """Count one routing decision of a read session (and tell the listeners, if any).

    ``checked_lsn``: the position the replica had to have replayed, if one was checked.
    """
    if ENABLED:
        child = _route_children.get((target, reason))
        if child is None:
            child = _route_children[target, reason] = _routed.labels(target, reason)
        child.inc()
    if listeners.active:
        listeners.route(target, reason, checked_lsn)


def record_token(event: str) -> None:
    """Count a read-your-writes token ``issued``, ``rejected`` or ``cleared``."""
    if ENABLED:
        child = _token_children.get(event)
        if child is None:
            child = _token_children[event] = _tokens.labels(event)
        child.inc()
    if listeners.active:
        listeners.token(event)
