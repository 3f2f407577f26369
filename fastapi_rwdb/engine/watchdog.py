"""What ends a statement's wait at its deadline (:mod:`.deadline` arms them): the
event loop terminates an asyncpg connection; one thread shuts the socket of a
psycopg connection.

The shutdown of a socket another thread waits on is the one trick here:
``shutdown(2)`` ends the wait of a thread blocked on that socket without closing
its descriptor (which the driver still owns), so nothing can reuse the number.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import socket
import threading
import time
from typing import Any


class AsyncWatch:
    """One statement's deadline on asyncpg: the event loop terminates the connection.
    ``ending``: it watches a ROLLBACK."""

    __slots__ = ("_fired", "_handle", "ending")

    def __init__(self, raw: Any, deadline: float, *, ending: bool = False) -> None:
        self._fired = False
        self.ending = ending

        def fire() -> None:
            self._fired = True
            raw.terminate()

        self._handle = asyncio.get_running_loop().call_later(deadline, fire)

    def disarm(self) -> bool:
        """Stop watching; whether the deadline had passed."""
        self._handle.cancel()
        return self._fired


class _Watch:
    __slots__ = ("cancelled", "ending", "fd", "fired")

    def __init__(self, fd: int, *, ending: bool = False) -> None:
        self.fd = fd
        self.cancelled = False
        self.fired = False
        self.ending = ending

    def disarm(self) -> bool:
        with WATCHDOG.lock:
            self.cancelled = True
            return self.fired


class _Watchdog:
    """One thread for every psycopg statement's deadline (a timer thread each would
    cost a thread start per statement)."""

    def __init__(self) -> None:
        self._count = itertools.count()
        self._start_over()
        # A forked child has the parent's memory but not its thread (nor its
        # connections): it starts with none, which arm() then starts, and no lock a
        # thread of the parent may have held. (Asked here once, not per statement.)
        os.register_at_fork(after_in_child=self._start_over)

    def _start_over(self) -> None:
        self.lock = threading.Lock()
        self._wake = threading.Condition(self.lock)
        self._heap: list[tuple[float, int, _Watch]] = []
        self._thread: threading.Thread | None = None

    def arm(self, fd: int, deadline: float, *, ending: bool = False) -> _Watch:
        watch = _Watch(fd, ending=ending)
        with self.lock:
            heapq.heappush(self._heap, (time.monotonic() + deadline, next(self._count), watch))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="rwdb-read-deadline", daemon=True
                )
                self._thread.start()
            elif self._heap[0][2] is watch:
                self._wake.notify()
        return watch

    def _run(self) -> None:
        with self.lock:
            while True:
                while self._heap and self._heap[0][2].cancelled:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._wake.wait()
                    continue
                due, _, watch = self._heap[0]
                left = due - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                heapq.heappop(self._heap)
                watch.fired = True
                _shut(watch.fd)


def _shut(fd: int) -> None:
    """End every wait on socket ``fd`` (see the module's doc): on a duplicate of the
    descriptor, so that the driver's own stays open until the driver closes it."""
    try:
        duplicate = socket.socket(fileno=os.dup(fd))
    except OSError:
        return  # already closed: nothing waits on it
    try:
        duplicate.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        duplicate.close()


WATCHDOG = _Watchdog()
