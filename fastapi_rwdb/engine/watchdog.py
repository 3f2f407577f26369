"""What ends a statement's wait at its deadline (:mod:`.deadline` arms them): the
event loop terminates an asyncpg connection; one thread shuts the socket of a
psycopg connection.

The shutdown of a socket another thread waits on is the one trick here:
``shutdown(2)`` ends the wait of a thread blocked on that socket without closing
its descriptor (which the driver still owns), so nothing can reuse the number.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import os
import socket
import threading
import time
import weakref
from typing import Any

logger = logging.getLogger("fastapi_rwdb")


class _Lanes:
    """The armed watches, by deadline length; a lane is a dict in arming order, so its
    watches fall due in that order and its first is its next.

    A watch is held only while it is armed: disarming takes it out at once. (A heap
    with cancelled entries left in until their time, as ``asyncio`` keeps its timers,
    would keep a statement's watch alive for its whole deadline: under load thousands
    of objects, which make the cyclic garbage collector run several times as often.)
    A process has few lengths: the read and write deadlines, some routes' own."""

    __slots__ = ("_by_length",)

    def __init__(self) -> None:
        self._by_length: dict[float, dict[Any, None]] = {}

    def add(self, watch: Any, length: float) -> dict[Any, None]:
        """File ``watch`` (its ``due`` now plus ``length``); the lane to take it out of."""
        lane = self._by_length.get(length)
        if lane is None:
            lane = self._by_length[length] = {}
        lane[watch] = None
        return lane

    def take_due(self, now: float) -> tuple[list[Any], float]:
        """Take out the watches due at ``now``; and when the next falls due (``inf``: none)."""
        due: list[Any] = []
        nearest = math.inf
        for length, lane in list(self._by_length.items()):
            while lane:
                watch = next(iter(lane))
                if watch.due > now:
                    nearest = min(nearest, watch.due)
                    break
                del lane[watch]
                due.append(watch)
            if not lane:
                del self._by_length[length]  # (made again when needed)
        return due, nearest


class AsyncWatch:
    """One statement's deadline on asyncpg: the event loop terminates the connection.
    ``ending``: it watches a ROLLBACK. One timer per event loop serves them all
    (:class:`_LoopWatchdog`): a timer per statement would leave each cancelled one in
    the loop's queue for a while (see :class:`_Lanes`)."""

    __slots__ = ("_lane", "due", "ending", "fired", "raw")

    def __init__(self, raw: Any, deadline: float, *, ending: bool = False) -> None:
        loop = asyncio.get_running_loop()  # (RuntimeError with none: nothing to watch)
        dog = _LOOP_WATCHDOGS.get(loop)
        if dog is None:
            dog = _LOOP_WATCHDOGS[loop] = _LoopWatchdog()
        self.raw = raw
        self.fired = False
        self.ending = ending
        self.due = loop.time() + deadline
        self._lane = dog.arm(self, deadline, loop)

    def disarm(self) -> bool:
        """Stop watching; whether the deadline had passed."""
        self._lane.pop(self, None)
        return self.fired


class _LoopWatchdog:
    """One event loop's asyncpg deadlines, on a single timer set for the nearest.

    It holds no reference to its loop, nor to the timer's handle (which refers to the
    loop): kept per loop in a dict with weak keys, it would keep a loop that ended
    alive (a test suite makes one per test). A timer replaced by a nearer one is not
    cancelled but ignored when it fires (its number is not the latest)."""

    __slots__ = ("_at", "_lanes", "_timers")

    def __init__(self) -> None:
        self._lanes = _Lanes()
        self._at = math.inf
        self._timers = 0

    def arm(
        self, watch: AsyncWatch, length: float, loop: asyncio.AbstractEventLoop
    ) -> dict[Any, None]:
        lane = self._lanes.add(watch, length)
        if watch.due < self._at:
            self._set(loop, watch.due)
        return lane

    def _set(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        self._at = at
        self._timers += 1
        if at != math.inf:
            # In a context of its own: the current one is a request's, which the timer
            # would keep alive (its state, its scope) until it fires, seconds later.
            loop.call_at(at, self._check, self._timers, context=contextvars.Context())

    def _check(self, timer: int) -> None:
        if timer != self._timers:
            return  # replaced by a nearer one
        loop = asyncio.get_running_loop()
        due, nearest = self._lanes.take_due(loop.time())
        self._set(loop, nearest)  # first: one connection's failure below stops no other watch
        for watch in due:
            watch.fired = True
            try:
                watch.raw.terminate()
            except Exception:  # (its wait ends with the connection's own error anyway)
                logger.warning(
                    "fastapi_rwdb: could not end a statement past its deadline", exc_info=True
                )


_LOOP_WATCHDOGS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWatchdog] = (
    weakref.WeakKeyDictionary()
)


class _Watch:
    __slots__ = ("due", "ending", "fd", "fired", "lane")

    def __init__(self, fd: int, due: float, *, ending: bool) -> None:
        self.fd = fd
        self.due = due
        self.fired = False
        self.ending = ending
        self.lane: dict[Any, None]  # set as it is filed

    def disarm(self) -> bool:
        with WATCHDOG.lock:
            self.lane.pop(self, None)
            return self.fired


class _Watchdog:
    """One thread for every psycopg statement's deadline (a timer thread each would
    cost a thread start per statement), sleeping until the nearest (:class:`_Lanes`)."""

    def __init__(self) -> None:
        self._start_over()
        # A forked child has the parent's memory but not its thread (nor its
        # connections): it starts with none, which arm() then starts, and no lock a
        # thread of the parent may have held. (Asked here once, not per statement.)
        os.register_at_fork(after_in_child=self._start_over)

    def _start_over(self) -> None:
        self.lock = threading.Lock()
        self._wake = threading.Condition(self.lock)
        self._lanes = _Lanes()
        self._until = math.inf  # when the thread wakes next by itself
        self._thread: threading.Thread | None = None

    def arm(self, fd: int, deadline: float, *, ending: bool = False) -> _Watch:
        with self.lock:
            watch = _Watch(fd, time.monotonic() + deadline, ending=ending)
            watch.lane = self._lanes.add(watch, deadline)
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
                due, self._until = self._lanes.take_due(now)
                for watch in due:
                    watch.fired = True
                    _shut(watch.fd)
                wait = self._until - now
                self._wake.wait(None if wait == math.inf else wait)


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
