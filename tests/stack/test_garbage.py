"""A request leaves nothing for the cyclic garbage collector.

Objects that only the collector can free (reference cycles) make it run more often,
and each run walks every young object of the process: under load that is CPU taken
from every request, and memory held until it runs. A plain SQLAlchemy request
makes none; neither may the package's, on any route: writes (Core and ORM, sync
and async), reads with and without a token.
"""

from __future__ import annotations

import collections
import gc
import types
import uuid
from collections.abc import Iterator

import pytest
from fastapi import FastAPI

from benchmarks.common import call

from ..helpers import add_named_item_routes, rwdb_app

pytestmark = pytest.mark.stack

ROUNDS = 40


def make_app() -> FastAPI:
    app = rwdb_app()
    add_named_item_routes(app)
    return app


@pytest.fixture
def collector_paused() -> Iterator[None]:
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def requests(app: FastAPI, name: str) -> int:
    """One round of every route; the reads after the writes carry the client's token.
    (Straight into the ASGI app: an HTTP client library makes cycles of its own.)"""
    token = b""
    paths = ["/core", "/orm", "/async/core", "/async/orm"]
    for path in paths:
        response = await call(app, "POST", f"{path}/{name}", [(b"x-rwdb-pin", token)])
        assert response.status == 200, response.body
        token = response.header(b"x-rwdb-pin") or b""
        assert token
    for headers in ([(b"x-rwdb-pin", token)], []):  # with the token, then without
        for path in ["/read", "/async/read"]:
            response = await call(app, "GET", f"{path}/{name}", headers)
            assert response.status == 200, response.body
            if headers:  # its own writes: read where they are
                assert response.body == b'{"count":4}'
    return len(paths) + 4


async def test_requests_make_no_reference_cycles(collector_paused: None) -> None:
    app = make_app()
    async with app.router.lifespan_context(app):
        for _ in range(3):  # warm-up: pools, caches, first-use probes
            await requests(app, f"garbage-{uuid.uuid4().hex[:8]}")
        gc.collect()
        gc.garbage.clear()
        made = 0
        for _ in range(ROUNDS):
            made += await requests(app, f"garbage-{uuid.uuid4().hex[:8]}")
        gc.collect()
    kinds = collections.Counter(_name(o) for o in gc.garbage if _ours(o))
    # A cycle per request leaves ROUNDS of each of its kinds at least. (A connection
    # closed meanwhile, by the pool or the server, may leave a few of its own.)
    most = kinds.most_common(1)[0][1] if kinds else 0
    assert most < ROUNDS, f"{made} requests left {kinds.most_common(8)}"


def _ours(found: object) -> bool:
    """Whether an object the collector found is the package's: its class, or its code.
    (Others' are not the package's to fix: SQLAlchemy 2.1.0, the lowest version the
    package allows, leaves a cycle per result of its own, its cursor metadata.)"""
    module = found.__module__ if isinstance(found, types.FunctionType) else type(found).__module__
    return (module or "").startswith("fastapi_rwdb")


def _name(found: object) -> str:
    return getattr(found, "__qualname__", None) or type(found).__qualname__
