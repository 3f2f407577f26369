"""The bench: replicas whose path froze are passed over for a while.

A read that meets a frozen replica pays its deadline once (``RWDB_READ_TIMEOUT``),
then runs on the primary. Without memory of it, every later read that reaches the
same replica, through another pooled connection or a new one, would pay the same
deadline. So a replica whose statement or checkout ping got no answer in time is
*benched* for ``RWDB_REPLICA_BENCH_SECONDS``: its connections are not handed out
and new connections that land on it are closed (:mod:`fastapi_rwdb.engine.servers`
does both), so the other replicas serve. When the time is up the replica is simply
accepted again: if it is still frozen, the next read that meets it pays one
deadline and benches it anew; nothing probes it in the meantime.

Only a silence benches. A replica that answers, even with an error (a busy server's
``57014``, a replay conflict), is working, and a connect that times out through
HAProxy's read port cannot say which server it was trying to reach: that one feeds
the read side's breaker, as every failed connect does.

Pure bookkeeping: a dictionary of names to monotonic times, read on every checkout
(one lookup, no lock: a dict's get and set are atomic), written under a lock only
when a replica is benched. The clock is injectable for the unit tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger("fastapi_rwdb")


@dataclass
class ReplicaBench:
    """Which replicas are benched, and until when (monotonic seconds).

    ``seconds``: the bench time (0: nothing is ever benched). Replicas are named as
    :mod:`fastapi_rwdb.engine.servers` identifies the server behind a connection.
    """

    seconds: float = 30.0
    clock: Callable[[], float] = time.monotonic
    _until: dict[str, float] = field(default_factory=dict, repr=False)
    _known: set[str] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    def saw(self, replica: str) -> None:
        """A connection reached ``replica``: it is listed (benched or not) from now on."""
        if replica not in self._known:
            with self._lock:
                self._known.add(replica)

    def bench(self, replica: str) -> bool:
        """``replica`` gave no answer in time: pass it over for the bench time from now.
        Whether it was not benched already (the first silence is logged, not each)."""
        if not self.enabled:
            return False
        with self._lock:
            now = self.clock()
            was = self._until.get(replica, 0.0) > now
            self._until[replica] = now + self.seconds
            self._known.add(replica)
        if not was:
            logger.warning(
                "fastapi_rwdb: replica %s gave no answer within the read deadline; its "
                "connections are passed over for %gs (RWDB_REPLICA_BENCH_SECONDS)",
                replica,
                self.seconds,
            )
        return not was

    def is_benched(self, replica: str) -> bool:
        """Whether ``replica`` is benched now: asked at every checkout, so a lookup."""
        until = self._until.get(replica)
        return until is not None and self.clock() < until

    def any_benched(self) -> bool:
        """Whether some replica is benched now."""
        if not self._until:
            return False
        now = self.clock()
        return any(until > now for until in list(self._until.values()))

    def seconds_left(self) -> dict[str, float]:
        """Every replica benched now, and how many seconds it stays benched."""
        now = self.clock()
        return {name: until - now for name, until in sorted(self._until.items()) if until > now}

    def states(self) -> dict[str, bool]:
        """Every replica a connection has reached: whether it is benched now."""
        now = self.clock()
        with self._lock:
            known = sorted(self._known)
        return {name: self._until.get(name, 0.0) > now for name in known}
