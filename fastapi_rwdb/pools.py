"""The application's connection pools, read from memory: for ``/debug/pool-stats``
and the Prometheus gauges. Nothing here connects or builds an engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.pool import QueuePool

if TYPE_CHECKING:
    from .database import Database


def pool_stats(database: Database) -> dict[str, Any]:
    """The six pools, read from memory (the body of ``GET {prefix}/pool-stats``).

    Per driver: ``write``, ``read`` (the replicas) and ``primary_read`` (reads
    that must see the primary). Engines that were never used are not built here:
    one not built yet is reported with ``"built": false``, its configured size
    and zero connections.
    """
    settings = database.settings
    report: dict[str, Any] = {}
    pairs = (
        ("sync", "engines", "primary_read", "primary_read_engine"),
        ("async", "async_engines", "async_primary_read", "async_primary_read_engine"),
    )
    for pair_name, pair_key, primary_key, primary_attr in pairs:
        pair_built = database.is_built(pair_key)
        pair = getattr(database, pair_key) if pair_built else None
        primary_built = database.is_built(primary_key)
        sides: dict[str, Any] = {}
        for side in ("write", "read", "primary_read"):
            if side not in ("write", "read"):
                built = primary_built
                engine = getattr(database, primary_attr) if built else None
                size, max_overflow = settings.pool_limits("primary_read")
                endpoint = settings.endpoint("write")
            else:
                built = pair_built
                engine = getattr(pair, side) if pair is not None else None
                size, max_overflow = settings.pool_limits(side)
                endpoint = settings.endpoint("read" if side == "read" else "write")
            entry: dict[str, Any] = {
                "built": built,
                "endpoint": endpoint,
                "size": size,
                "max_overflow": max_overflow,
                "checked_in": 0,
                "checked_out": 0,
                "overflow": 0,
                "open": 0,
                "usage": 0.0,
            }
            pool = engine.pool if engine is not None else None
            if isinstance(pool, QueuePool):
                size, out = pool.size(), pool.checkedout()
                entry.update(
                    size=size,
                    checked_in=pool.checkedin(),
                    checked_out=out,
                    # Negative while the pool has fewer connections than its size.
                    overflow=max(0, pool.overflow()),
                    open=size + pool.overflow(),
                    usage=round(out / (size + max_overflow), 3),
                )
            sides[side] = entry
        report[pair_name] = sides
    return report
