"""The gate in front of sync session dependencies (web/thread_slots.py)."""

from __future__ import annotations

import anyio
import anyio.from_thread
import anyio.to_thread
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from fastapi_rwdb.web.thread_slots import Slot, slots


def test_one_slot_fewer_than_worker_threads_per_event_loop() -> None:
    async def gate() -> tuple[anyio.Semaphore, anyio.Semaphore, int]:
        tokens = int(anyio.to_thread.current_default_thread_limiter().total_tokens)
        return slots(), slots(), tokens

    first, again, tokens = anyio.run(gate)
    assert first is again  # one gate per loop
    assert first.value == tokens - 1
    other, _, _ = anyio.run(gate)
    assert other is not first  # another loop, another gate


def test_a_request_takes_one_slot_however_many_sync_sessions_it_opens() -> None:
    taken: list[int] = []

    def session_a(_slot: Slot = None) -> int:
        taken.append(anyio.from_thread.run_sync(lambda: slots().value))
        return 1

    def session_b(_slot: Slot = None) -> int:
        taken.append(anyio.from_thread.run_sync(lambda: slots().value))
        return 2

    app = FastAPI()

    @app.get("/")
    def both(a: int = Depends(session_a), b: int = Depends(session_b)) -> dict[str, int]:
        return {"sum": a + b}

    with TestClient(app) as client:
        assert client.get("/").json() == {"sum": 3}
        assert client.get("/").json() == {"sum": 3}
    tokens = 40  # anyio's default
    assert taken == [tokens - 2] * 4  # one slot held by the request, never two
