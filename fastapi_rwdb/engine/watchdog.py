"""What ends a statement's wait at its deadline (:mod:`.deadline` arms them): the
event loop terminates an asyncpg connection; one thread shuts the socket of a
psycopg connection.

The shutdown of a socket another thread waits on is the one trick here:
``shutdown(2)`` ends the wait of a thread blocked on that socket without closing
its descriptor (which the driver still owns), so nothing can reuse the number.
"""

from __future__ import annotations

import asyncio
import math
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
    __slots__ = ("due", "ending", "fd", "fired", "lane")

    def __init__(self, fd: int, due: float, lane: dict[_Watch, None], *, ending: bool) -> None:
        self.fd = fd
        self.due = due
        self.lane = lane
        self.fired = False
        self.ending = ending

    def disarm(self) -> bool:
        with WATCHDOG.lock:
            self.lane.pop(self, None)
            return self.fired


class _Watchdog:
    """One thread for every psycopg statement's deadline (a timer thread each would
    cost a thread start per statement).

    A watch is held only while it is armed: disarming takes it out at once. (A heap
    with cancelled entries left in it until their time, as ``asyncio`` keeps its
    timers, would keep two objects per statement alive for the whole deadline: under
    load thousands, which make the cyclic garbage collector run twice as often.) The
    watches of one deadline length are due in the order they were armed, so each
    length has its lane, a dict in arming order, and the next due of a lane is its
    first entry; a process has a few lengths (the read and write deadlines, a few
    routes' own)."""

    def __init__(self) -> None:
        self._start_over()
        # A forked child has the parent's memory but not its thread (nor its
        # connections): it starts with none, which arm() then starts, and no lock a
        # thread of the parent may have held. (Asked here once, not per statement.)
        os.register_at_fork(after_in_child=self._start_over)

    def _start_over(self) -> None:
        self.lock = threading.Lock()
        self._wake = threading.Condition(self.lock)
        self._lanes: dict[float, dict[_Watch, None]] = {}
        self._until = math.inf  # when the thread wakes next by itself
        self._thread: threading.Thread | None = None

    def arm(self, fd: int, deadline: float, *, ending: bool = False) -> _Watch:
        with self.lock:
            lane = self._lanes.get(deadline)
            if lane is None:
                lane = self._lanes[deadline] = {}
            watch = _Watch(fd, time.monotonic() + deadline, lane, ending=ending)
            lane[watch] = None
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="rwdb-read-deadline", daemon=True
                )
                self._thread.start()
            elif watch.due < self._until:
                self._wake.notify()
        return watch

    def _run(self) -> None:
        with self.lock:
            while True:
                now = time.monotonic()
                until = math.inf
                for length, lane in list(self._lanes.items()):
                    while lane:
                        watch = next(iter(lane))
                        if watch.due > now:
                            until = min(until, watch.due)
                            break
                        del lane[watch]
                        watch.fired = True
                        _shut(watch.fd)
                    if not lane:
                        del self._lanes[length]  # (a lane is made again when needed)
                self._until = until
                self._wake.wait(None if until == math.inf else until - now)


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
