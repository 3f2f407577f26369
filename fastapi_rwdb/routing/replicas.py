"""How usable the read side is right now, kept apart from any one request.

Three signals feed :func:`fastapi_rwdb.routing.choose_read_route`:

* a circuit breaker on opening read connections: after ``read_fallback_after``
  failed connects in a row, reads go to the primary; after
  ``read_retry_seconds`` one read tries the read side again;
* a view of every streaming replica, taken from the primary's
  ``pg_stat_replication`` by a background task (never per request). It says
  when *every* replica has replayed a position (only then may a client's token
  be dropped early), and, with the primary's recent WAL positions kept beside
  it, turns ``RWDB_MAX_REPLICA_LAG`` seconds into a WAL position that the
  replica behind a connection must have replayed: the lag limit is checked per
  connection with the position its checkout ping already reads;
* the bench (:mod:`.bench`): replicas that gave no answer in time, passed over
  for a while, per connection.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from .bench import ReplicaBench
from .lsn import parse_lsn

logger = logging.getLogger("fastapi_rwdb")

#: One row per streaming replica, plus the primary's position (one row even with none).
REPLICAS_SQL = text(
    "SELECT pg_current_wal_lsn()::text, r.application_name, r.state, r.replay_lsn::text"
    " FROM (SELECT 1) AS one LEFT JOIN pg_stat_replication AS r ON true"
)


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One replica as the primary sees it (``pg_stat_replication``)."""

    name: str  # application_name: Patroni's member name
    state: str  # streaming, catchup, ...
    replay_lsn: int | None  # None when the role may not see it (needs pg_monitor)
    lag_bytes: int | None
    lag_seconds: float | None  # at least this far behind in time (see lag_seconds_of)


@dataclass
class ReadSideHealth:
    fallback_after: int = 3
    retry_seconds: float = 5.0
    max_lag: float | None = None
    expected_replicas: int | None = None  # RWDB_REPLICAS; None: the most ever seen
    interval: float = 1.0  # of the background view
    failures: int = 0
    open_until: float = 0.0  # monotonic time; reads go to the primary before it
    replicas: tuple[ReplicaStatus, ...] = ()
    primary_lsn: int | None = None
    viewed_at: float | None = None  # monotonic time of the last view
    most_replicas_seen: int = 0
    bench: ReplicaBench = field(default_factory=ReplicaBench)  # replicas passed over a while
    # (monotonic time, primary WAL position) of recent views, oldest first. Replaced,
    # never changed in place: request threads read it while the watcher records.
    _history: tuple[tuple[float, int], ...] = field(default=(), repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _lagging: bool = field(default=False, repr=False)

    # -- the breaker -------------------------------------------------------------------

    @property
    def read_side_down(self) -> bool:
        # Once open_until has passed the breaker is half-open: reads try the read
        # side again, and a single failed connect re-opens it (failures is kept).
        return time.monotonic() < self.open_until

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

    # -- the replicas' view ----------------------------------------------------------------

    def fresh(self, now: float | None = None) -> bool:
        """Whether the view is recent enough to act on (a few missed checks at most)."""
        now = time.monotonic() if now is None else now
        return self.viewed_at is not None and now - self.viewed_at <= 3 * self.interval + 1.0

    def record_view(
        self,
        primary_lsn: int,
        rows: list[tuple[str, str, int | None]],
        now: float | None = None,
    ) -> None:
        """Store one look at ``pg_stat_replication``: (name, state, replay position) rows."""
        now = time.monotonic() if now is None else now
        keep = (self.max_lag or 0.0) + 4 * self.interval + 5.0
        with self._lock:
            history = [*self._history, (now, primary_lsn)]
            while len(history) > 2 and history[1][0] < now - keep:
                del history[0]
            self._history = tuple(history)
            self.primary_lsn, self.viewed_at = primary_lsn, now
        self.replicas = tuple(
            ReplicaStatus(
                name,
                state,
                replay,
                None if replay is None else max(0, primary_lsn - replay),
                None if replay is None else self.lag_seconds_of(replay, now),
            )
            for name, state, replay in sorted(rows)
        )
        streaming = self._streaming()
        if len(streaming) > self.most_replicas_seen:
            self.most_replicas_seen = len(streaming)
        lagging = self.lag_exceeded
        if lagging != self._lagging:
            self._lagging = lagging
            logger.warning(
                "fastapi_rwdb: every replica is more than %ss behind; reads go to the primary"
                if lagging
                else "fastapi_rwdb: a replica is within %ss again; reads go back to the replicas",
                self.max_lag,
            )

    def _streaming(self) -> list[ReplicaStatus]:
        return [r for r in self.replicas if r.state == "streaming" and r.replay_lsn is not None]

    def all_replayed(self, lsn: int, now: float | None = None) -> bool:
        """Whether every replica the read port can reach has replayed ``lsn``.

        "Every" is what the primary sees streaming, and only if that is as many
        replicas as expected (``RWDB_REPLICAS``, else the most ever seen by this
        process): a replica that stopped streaming is missing from the view but
        may still serve reads. In any doubt (no view, a stale one, a replica
        missing) the answer is no, and the client keeps its token.
        """
        if not self.fresh(now):
            return False
        streaming = self._streaming()
        expected = self.expected_replicas
        if expected is None:
            expected = max(1, self.most_replicas_seen)
        if len(streaming) < expected:
            return False
        return all(r.replay_lsn is not None and r.replay_lsn >= lsn for r in streaming)

    def lag_seconds_of(self, replayed: int, now: float | None = None) -> float:
        """How far behind a replica that has replayed ``replayed`` is, at least.

        The earliest recorded primary position beyond ``replayed`` is WAL the
        replica still lacks; it existed that long ago. (Exact to one interval of
        the view; a replica at or past the newest recorded position counts as 0.)
        """
        now = time.monotonic() if now is None else now
        for at, lsn in self._history:
            if lsn > replayed:
                return max(0.0, now - at)
        return 0.0

    def lag_floor(self, now: float | None = None) -> int | None:
        """The WAL position a replica must have replayed to be within ``max_lag``.

        It is the primary's position as of ``max_lag`` seconds ago: a replica
        short of it lacks WAL older than the limit. ``None`` when there is no
        limit or not enough recent history to tell (then no lag check is made).
        """
        if self.max_lag is None:
            return None
        now = time.monotonic() if now is None else now
        if not self.fresh(now):
            return None
        floor = None
        cutoff = now - self.max_lag
        for at, lsn in self._history:
            if at > cutoff:
                break
            floor = lsn
        return floor

    @property
    def lag_exceeded(self) -> bool:
        """Every replica in the view is beyond the lag limit: no read need try one."""
        if self.max_lag is None or not self.fresh():
            return False
        streaming = self._streaming()
        return bool(streaming) and all(
            r.lag_seconds is not None and r.lag_seconds > self.max_lag for r in streaming
        )

    @property
    def lag(self) -> float | None:
        """Seconds the least-behind replica is behind (None: no view)."""
        lags = [r.lag_seconds for r in self._streaming() if r.lag_seconds is not None]
        return min(lags) if lags else None


async def view_replicas(write: AsyncEngine) -> tuple[int, list[tuple[str, str, int | None]]]:
    """The primary's position and its streaming replicas' replay positions."""
    async with write.connect() as conn:
        rows = (await conn.execute(REPLICAS_SQL)).all()
    primary_lsn = parse_lsn(rows[0][0]) if rows else None
    if primary_lsn is None:  # the write port reached a replica (failover in progress)
        raise RuntimeError("the write side is in recovery")
    return primary_lsn, [
        (str(name), str(state), parse_lsn(replay)) for _, name, state, replay in rows if name
    ]


async def watch_replicas(
    health: ReadSideHealth, write: Callable[[], AsyncEngine], in_use: Callable[[], bool]
) -> None:
    """Runs for the life of the app (started by setup's lifespan).

    It waits until the app has used the database (``in_use``): an app that
    never reads opens no connection for it, as nothing connects before first use.
    """
    while True:
        if not in_use():
            await asyncio.sleep(health.interval)
            continue
        try:
            primary_lsn, rows = await view_replicas(write())
            health.record_view(primary_lsn, rows)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the breaker and the requests report outages
            logger.debug("fastapi_rwdb: replica view failed: %s", type(exc).__name__)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Cancelled, yet the view ended without the CancelledError: SQLAlchemy before
            # 2.1.5 on Python 3.11 can return a pooled connection in its place (CPython
            # gh-86296). Going on would keep the app's shutdown waiting for us forever.
            raise asyncio.CancelledError
        await asyncio.sleep(health.interval)
