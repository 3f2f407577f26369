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
before its sync session dependency runs, and gives it back after that
dependency's teardown. There are fewer slots than tokens: a request inside the
gate holds at most one token at a time, so one is always left for a request that
holds a connection. A request asks once whatever number of sessions it opens
(FastAPI caches the dependency within a request), so two sessions of one
request cannot wait on each other. The slots are per event loop (an app served by
TestClient runs on a loop of its own), counted from the limiter when first used.

A dependency, not a wrapper put on each route's ASGI app at startup: FastAPI 0.16x
no longer copies an included router's routes into the app (it builds handlers of
its own for them), so such a wrapper would miss most routes on some FastAPI
versions. The price is FastAPI's machinery for an ``async`` generator dependency,
about 300 Python calls a sync request (benchmarks/notes.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar
from fastapi import Depends

_SLOTS: RunVar[anyio.Semaphore] = RunVar("fastapi_rwdb_thread_slots")


def slots() -> anyio.Semaphore:
    """This event loop's gate: one slot fewer than the default thread limiter's tokens."""
    try:
        return _SLOTS.get()
    except LookupError:
        tokens = int(anyio.to_thread.current_default_thread_limiter().total_tokens)
        gate = anyio.Semaphore(max(1, tokens - 1))
        _SLOTS.set(gate)
        return gate


async def thread_slot() -> AsyncIterator[None]:
    """The dependency every sync session dependency declares: a slot for this request."""
    async with slots():
        yield


#: A sync session dependency's first parameter: the request's slot. Unused (None) when
#: the function is called directly, outside FastAPI.
Slot = Annotated[None, Depends(thread_slot)]
