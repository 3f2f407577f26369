"""One gate, on the event loop, in front of every sync session dependency.

A sync route holds a worker thread of anyio's default limiter (40 tokens) while it
waits for a pooled connection, and needs another token after its endpoint returns
(FastAPI validates a sync endpoint's return value in the thread pool) before its
session is closed and its connection given back. With more requests in flight
than the pool holds and than there are tokens, every token can end up held by a
request waiting for a connection while every connection is held by a request
waiting for a token: nothing moves until ``pool_timeout`` (30 s) fails the
waiters. The hand-written pattern does exactly that at 90 clients a route.

So a request takes a slot here, on the event loop, where waiting holds no thread,
before its sync session dependency runs, and gives it back when that
dependency's teardown ends. There are fewer slots than tokens: a request inside
the gate holds at most one token at a time, so one is always left for a request
that holds a connection. A request asks once whatever number of sessions it opens
(FastAPI caches the dependency within a request: the sessions share one
:class:`Ticket`, given back when the last of them closes), so two sessions of one
request cannot wait on each other. One gate per event loop (an app served by
TestClient runs on a loop of its own), sized from the limiter when first used.

Why not anyio's ``Semaphore`` behind an ``async`` generator dependency: FastAPI's
machinery for a generator dependency (a context manager entered on an exit
stack) costs a sync request about 300 Python calls, and the semaphore yields to
the event loop twice even when a slot is free. Here the dependency is a plain
coroutine that takes a free slot without yielding, and the session dependency
gives the slot back from its worker thread: under a lock when no request waits,
through ``call_soon_threadsafe`` when one does. A ticket whose request ended
before its session dependency ran (a client gone in between) gives its slot back
when it is collected.

Only on asyncio: under trio (where FastAPI runs too) the dependency takes no slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from contextlib import AbstractContextManager
from typing import Annotated

import anyio.to_thread
from anyio.lowlevel import RunVar
from fastapi import Depends

_GATES: RunVar[Gate] = RunVar("fastapi_rwdb_thread_slots")


class Gate:
    """Slots taken on one event loop, given back from any thread."""

    __slots__ = ("_free", "_lock", "_loop", "_waiters", "size")

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self._loop = loop
        self._free = self.size = size
        self._lock = threading.Lock()
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def free(self) -> int:
        return self._free

    async def take(self) -> None:
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            with self._lock:
                queued = waiter in self._waiters
                if queued:
                    self._waiters.remove(waiter)
            if not queued and waiter.done() and not waiter.cancelled():
                self.give()  # handed a slot as it was cancelled: pass it on
            # (Popped but not yet handed: _hand sees the cancelled waiter and passes it on.)
            raise

    def give(self) -> None:
        """Give a slot back; from any thread."""
        with self._lock:
            if not self._waiters:
                self._free += 1
                return
            waiter = self._waiters.popleft()
        self._loop.call_soon_threadsafe(self._hand, waiter)

    def _hand(self, waiter: asyncio.Future[None]) -> None:
        if waiter.cancelled():
            self.give()
        else:
            waiter.set_result(None)


class Ticket:
    """A request's slot: held while any of its sync sessions is open (a context manager
    entered by each session dependency), given back once."""

    __slots__ = ("_gate", "_holders")

    def __init__(self, gate: Gate) -> None:
        self._gate: Gate | None = gate
        self._holders = 0

    def __enter__(self) -> None:
        self._holders += 1

    def __exit__(self, *exc: object) -> None:
        self._holders -= 1
        if not self._holders:
            self._give()

    def _give(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.give()

    def __del__(self) -> None:
        self._give()


#: What a session dependency holds when called outside FastAPI, or under trio.
NO_TICKET = contextlib.nullcontext()


def gate() -> Gate:
    """This event loop's gate: one slot fewer than the default thread limiter's tokens."""
    try:
        return _GATES.get()
    except LookupError:
        tokens = int(anyio.to_thread.current_default_thread_limiter().total_tokens)
        made = Gate(asyncio.get_running_loop(), max(1, tokens - 1))
        _GATES.set(made)
        return made


async def thread_slot() -> Ticket | None:
    """The dependency every sync session dependency declares: a slot for this request."""
    try:
        this = gate()
    except RuntimeError:  # not on asyncio
        return None
    await this.take()
    return Ticket(this)


def held(ticket: Ticket | None) -> AbstractContextManager[None]:
    """``with held(_slot):`` in a sync session dependency, around its session."""
    return NO_TICKET if ticket is None else ticket


#: A sync session dependency's first parameter: the request's slot. None when the
#: function is called directly, outside FastAPI.
Slot = Annotated[Ticket | None, Depends(thread_slot)]
