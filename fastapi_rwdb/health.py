"""How usable the read side is right now, kept apart from any one request.

Two signals feed :func:`fastapi_rwdb.routing.choose_read_route`:

* a circuit breaker on opening read connections: after ``read_fallback_after``
  failed connects in a row, reads go to the primary; after
  ``read_retry_seconds`` one read tries the read side again;
* the replay lag measured by a background task (never per request): above
  ``max_replica_lag`` seconds, reads go to the primary until it drops again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

logger = logging.getLogger("fastapi_rwdb")

PRIMARY_LSN_SQL = text("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
REPLICA_SQL = text(
    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn() - '0/0'::pg_lsn,"
    " extract(epoch FROM now() - pg_last_xact_replay_timestamp())"
)


@dataclass
class ReadSideHealth:
    fallback_after: int = 3
    retry_seconds: float = 5.0
    max_lag: float | None = None
    failures: int = 0
    open_until: float = 0.0  # monotonic time; reads go to the primary before it
    lag: float | None = None  # seconds, from the last background check
    lag_checked_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def read_side_down(self) -> bool:
        # Once open_until has passed the breaker is half-open: reads try the read
        # side again, and a single failed connect re-opens it (failures is kept).
        return time.monotonic() < self.open_until

    @property
    def lag_exceeded(self) -> bool:
        return self.max_lag is not None and self.lag is not None and self.lag > self.max_lag

    def connect_failed(self) -> None:
        with self._lock:
            self.failures += 1
            if self.failures >= self.fallback_after:
                if not self.read_side_down:
                    logger.warning(
                        "fastapi_rwdb: the read side refused %d connections in a row; reads go "
                        "to the primary for %.0fs, then the read side is tried again",
                        self.failures,
                        self.retry_seconds,
                    )
                self.open_until = time.monotonic() + self.retry_seconds

    def connect_succeeded(self) -> None:
        if self.failures or self.open_until:
            with self._lock:
                if self.open_until:
                    logger.warning("fastapi_rwdb: the read side accepts connections again")
                self.failures, self.open_until = 0, 0.0

    def record_lag(self, lag: float | None) -> None:
        was = self.lag_exceeded
        self.lag, self.lag_checked_at = lag, time.time()
        if self.lag_exceeded != was:
            logger.warning(
                "fastapi_rwdb: replica lag %s; reads %s",
                "n/a" if lag is None else f"{lag:.1f}s",
                "go to the primary" if self.lag_exceeded else "are back on the replicas",
            )


async def measure_lag(write: AsyncEngine, read: AsyncEngine) -> float | None:
    """Seconds the read side is behind, or 0 if it has everything the primary had.

    ``now() - pg_last_xact_replay_timestamp()`` alone grows on an idle cluster,
    so it only counts when the replica has not replayed the primary's position.
    """
    async with write.connect() as conn:
        primary_lsn = int((await conn.execute(PRIMARY_LSN_SQL)).scalar_one())
    async with read.connect() as conn:
        in_recovery, replayed, seconds = (await conn.execute(REPLICA_SQL)).one()
    if not in_recovery or replayed is None or int(replayed) >= primary_lsn:
        return 0.0
    return max(0.0, float(seconds)) if seconds is not None else None


async def watch_lag(
    health: ReadSideHealth, write: AsyncEngine, read: AsyncEngine, interval: float
) -> None:
    """Runs for the life of the app (started by setup's lifespan)."""
    while True:
        try:
            health.record_lag(await measure_lag(write, read))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the breaker and the requests report outages
            logger.debug("fastapi_rwdb: lag check failed: %s", type(exc).__name__)
        await asyncio.sleep(interval)
