"""The gate in front of sync session dependencies (web/thread_slots.py)."""

import asyncio
import gc
from collections.abc import Iterator

import anyio
import anyio.from_thread
import anyio.to_thread
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from fastapi_rwdb.web.thread_slots import Gate, Slot, Ticket, gate, held, thread_slot


def test_one_slot_fewer_than_worker_threads_per_event_loop() -> None:
    async def gates() -> tuple[Gate, Gate, int]:
        tokens = int(anyio.to_thread.current_default_thread_limiter().total_tokens)
        return gate(), gate(), tokens

    first, again, tokens = anyio.run(gates)
    assert first is again  # one gate per loop
    assert first.size == first.free == tokens - 1
    other, _, _ = anyio.run(gates)
    assert other is not first  # another loop, another gate


def test_a_waiter_gets_the_slot_a_worker_thread_gives_back() -> None:
    async def main() -> list[str]:
        g = Gate(asyncio.get_running_loop(), 1)
        events: list[str] = []
        await g.take()  # the only slot
        assert g.free == 0

        async def second() -> None:
            await g.take()
            events.append("second in")

        task = asyncio.create_task(second())
        await asyncio.sleep(0.01)
        assert events == []  # waits: no slot
        await asyncio.to_thread(g.give)  # given back from a worker thread
        await asyncio.wait_for(task, 1)
        assert g.free == 0  # handed over, not freed
        g.give()
        assert g.free == 1
        return events

    assert asyncio.run(main()) == ["second in"]


def test_a_cancelled_waiter_loses_no_slot() -> None:
    async def main() -> int:
        g = Gate(asyncio.get_running_loop(), 1)
        await g.take()
        waiter = asyncio.create_task(g.take())
        await asyncio.sleep(0.01)
        waiter.cancel()  # a client gone while it waited
        await asyncio.gather(waiter, return_exceptions=True)
        g.give()
        return g.free

    assert asyncio.run(main()) == 1

    async def handed_as_cancelled() -> int:
        g = Gate(asyncio.get_running_loop(), 1)
        await g.take()
        waiter = asyncio.create_task(g.take())
        await asyncio.sleep(0.01)
        g.give()  # handed to the waiter on the next loop turn ...
        waiter.cancel()  # ... which is cancelled first
        await asyncio.gather(waiter, return_exceptions=True)
        await asyncio.sleep(0.01)
        return g.free

    assert asyncio.run(handed_as_cancelled()) == 1


def test_a_ticket_is_given_back_once_by_its_last_holder_or_when_collected() -> None:
    async def main() -> list[int]:
        g = Gate(asyncio.get_running_loop(), 2)
        seen = []
        await g.take()
        ticket = Ticket(g)
        with held(ticket):
            with held(ticket):
                seen.append(g.free)
            seen.append(g.free)  # one session of two closed: still held
        seen.append(g.free)
        del ticket
        gc.collect()
        seen.append(g.free)  # given back once
        await g.take()
        unused = Ticket(g)  # a request that ended before its session dependency ran
        seen.append(g.free)
        del unused
        seen.append(g.free)
        return seen

    assert asyncio.run(main()) == [1, 1, 2, 2, 1, 2]


def test_a_ticket_from_the_dependency_holds_a_slot_of_its_loop() -> None:
    async def main() -> tuple[int, int, int]:
        ticket = await thread_slot()
        assert isinstance(ticket, Ticket)
        during = gate().free
        with held(ticket):
            pass
        with held(None):  # called outside FastAPI: no slot, nothing to give back
            pass
        return gate().size, during, gate().free

    size, during, after = anyio.run(main)
    assert (during, after) == (size - 1, size)


def test_a_request_takes_one_slot_however_many_sync_sessions_it_opens() -> None:
    taken: list[int] = []

    def session_a(_slot: Slot = None) -> Iterator[int]:
        with held(_slot):
            taken.append(anyio.from_thread.run_sync(lambda: gate().free))
            yield 1

    def session_b(_slot: Slot = None) -> Iterator[int]:
        with held(_slot):
            taken.append(anyio.from_thread.run_sync(lambda: gate().free))
            yield 2

    app = FastAPI()

    @app.get("/")
    def both(a: int = Depends(session_a), b: int = Depends(session_b)) -> dict[str, int]:
        taken.append(anyio.from_thread.run_sync(lambda: gate().free))
        return {"sum": a + b}

    @app.get("/free")
    async def free() -> dict[str, int]:
        return {"free": gate().free}

    with TestClient(app) as client:
        assert client.get("/").json() == {"sum": 3}
        assert client.get("/").json() == {"sum": 3}
        tokens = 40  # anyio's default
        assert taken == [tokens - 2] * 6  # one slot held by the request, never two
        assert client.get("/free").json() == {"free": tokens - 1}  # and given back
