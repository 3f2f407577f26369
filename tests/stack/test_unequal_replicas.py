"""Session consistency where it breaks: two replicas at different positions.

One replica's WAL replay is paused (``scripts/stack.sh pause-replay``), the
other is current, and the read pools hold connections to both. A client must
never read older than its own writes (nor, in session consistency, older than
what it has read), whichever replica each of its requests reaches.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi import BackgroundTasks, FastAPI
from sqlalchemy import text

import fastapi_rwdb
from fastapi_rwdb import (
    AsyncReadSession,
    AsyncWriteSession,
    Database,
    ReadSession,
    RWDBSettings,
    WriteSession,
)

from ..helpers import KEY, NODE_PORTS, client, dsn, replica_nodes, rwdb_app, serve, stack, warm

pytestmark = pytest.mark.stack

WHERE = (
    "SELECT inet_server_port(), pg_is_in_recovery(),"
    " EXISTS (SELECT 1 FROM rwdb_items WHERE name = :n)"
)


def replicas() -> list[str]:
    found = replica_nodes()
    assert len(found) == 2, f"expected two replicas, found {found}"
    return sorted(found)


@pytest.fixture(scope="module")
def paused() -> Iterator[tuple[int, int]]:
    """(paused replica's port, current replica's port), replay paused on the first."""
    behind, current = replicas()
    stack("pause-replay", behind)
    try:
        yield NODE_PORTS[behind], NODE_PORTS[current]
    finally:
        stack("resume-replay", "all")


def make_app(**overrides: Any) -> FastAPI:
    overrides.setdefault("lag_check_interval", 0.1)
    app = rwdb_app(routing_header=True, **overrides)

    @app.post("/notes")
    def create(db: WriteSession) -> dict[str, Any]:
        name = f"u-{uuid.uuid4()}"
        db.execute(text("INSERT INTO rwdb_items (name) VALUES (:n)"), {"n": name})
        db.commit()
        return {"name": name, "token": fastapi_rwdb.current_token()}

    @app.post("/async/notes")
    async def create_async(db: AsyncWriteSession) -> dict[str, Any]:
        name = f"ua-{uuid.uuid4()}"
        await db.execute(text("INSERT INTO rwdb_items (name) VALUES (:n)"), {"n": name})
        await db.commit()
        return {"name": name, "token": fastapi_rwdb.current_token()}

    @app.get("/notes/{name}")
    def read(name: str, db: ReadSession) -> dict[str, Any]:
        port, replica, found = db.execute(text(WHERE), {"n": name}).one()
        return {"port": port, "replica": replica, "found": found}

    @app.get("/async/notes/{name}")
    async def read_async(name: str, db: AsyncReadSession) -> dict[str, Any]:
        port, replica, found = (await db.execute(text(WHERE), {"n": name})).one()
        return {"port": port, "replica": replica, "found": found}

    @app.post("/notes/with-job")
    def create_with_job(db: WriteSession, jobs: BackgroundTasks) -> dict[str, Any]:
        name = f"job-{uuid.uuid4()}"
        db.execute(text("INSERT INTO rwdb_items (name) VALUES (:n)"), {"n": name})
        db.commit()
        jobs.add_task(job_reads, name, fastapi_rwdb.current_token())
        return {"name": name}

    return app


job_results: dict[str, bool] = {}


def job_reads(name: str, token: str | None) -> None:
    with fastapi_rwdb.get_read_db_context(after=token) as db:
        job_results[name] = db.execute(text(WHERE), {"n": name}).one()[2]


@pytest.mark.parametrize("flavour", ["", "/async"])
async def test_own_writes_are_never_missed_with_one_replica_paused(
    paused: tuple[int, int], flavour: str
) -> None:
    behind, current = paused
    app = make_app()
    stale, served_by = 0, []
    async with serve(app):
        await warm(app, f"{flavour}/notes/warm", paused)
        async with client(app) as me:
            for _ in range(12):
                name = (await me.post(f"{flavour}/notes")).json()["name"]
                for _ in range(10):
                    answer = (await me.get(f"{flavour}/notes/{name}")).json()
                    stale += not answer["found"]
                    served_by.append(answer["port"] if answer["replica"] else "primary")
                    # The token stays until every replica has the write.
                    assert me.cookies.get("rwdb_pin"), "cleared while a replica lacks the write"
    assert stale == 0, f"{stale} of 120 own-reads missed the client's write"
    assert behind not in served_by, "the paused replica served a read it could not answer"
    # Reads went to the replica that has the write, not all to the primary.
    assert served_by.count(current) > 0, served_by


async def test_a_plain_client_does_see_the_paused_replica(paused: tuple[int, int]) -> None:
    """The control: without a token, reads do reach the replica that lacks the row,
    so the test above would see stale reads if the routing let them through."""
    app = make_app()
    async with serve(app):
        await warm(app, "/notes/warm", paused)
        async with client(app) as me, client(app) as stranger:
            name = (await me.post("/notes")).json()["name"]
            answers = [(await stranger.get(f"/notes/{name}")).json() for _ in range(10)]
    assert any(not a["found"] and a["port"] == paused[0] for a in answers), answers


async def test_the_token_is_cleared_once_every_replica_has_replayed_it(
    paused: tuple[int, int],
) -> None:
    behind = next(node for node, port in NODE_PORTS.items() if port == paused[0])
    app = make_app()
    async with serve(app), client(app) as me:
        name = (await me.post("/notes")).json()["name"]
        await asyncio.sleep(0.5)  # several replica views
        kept = await me.get(f"/notes/{name}")
        assert kept.headers.get("x-rwdb-pin") is None and me.cookies.get("rwdb_pin")
        await asyncio.to_thread(stack, "resume-replay", behind)
        try:
            cleared = None
            for _ in range(40):
                response = await me.get(f"/notes/{name}")
                if response.headers.get("x-rwdb-pin") == "":
                    cleared = response
                    break
                await asyncio.sleep(0.1)
            assert cleared is not None, "never cleared after every replica caught up"
            assert not me.cookies.get("rwdb_pin")
        finally:
            await asyncio.to_thread(stack, "pause-replay", behind)


@pytest.mark.parametrize("consistency", ["session", "read-your-writes"])
async def test_monotonic_reads_only_in_session_consistency(
    paused: tuple[int, int], consistency: str
) -> None:
    """A stranger writes; the reader sees it on the current replica; must it stay seen?"""
    app = make_app(consistency=consistency)
    flips = 0
    async with serve(app):
        await warm(app, "/notes/warm", paused)
        async with client(app) as reader, client(app) as stranger:
            for _ in range(6):
                name = (await stranger.post("/notes")).json()["name"]
                seen = False
                for _ in range(8):
                    found = (await reader.get(f"/notes/{name}")).json()["found"]
                    flips += seen and not found
                    seen = seen or found
    if consistency == "session":
        assert flips == 0, f"{flips} reads went back in time"
    else:
        # The control: with read-your-writes alone, a stranger's row comes and goes.
        assert flips > 0


@pytest.mark.parametrize("flavour", ["", "/async"])
async def test_the_lag_limit_applies_to_the_replica_behind_each_connection(
    paused: tuple[int, int], flavour: str
) -> None:
    behind, current = paused
    app = make_app(max_replica_lag=0.5)
    stop = threading.Event()

    def keep_writing() -> None:  # gives the primary a WAL history to measure lag against
        with psycopg.connect(dsn(), prepare_threshold=None, autocommit=True) as conn:
            while not stop.wait(0.05):
                conn.execute("INSERT INTO rwdb_items (name) VALUES ('lag-limit filler')")

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        async with serve(app):
            await warm_any(app, flavour)  # the app uses the database: its replica view starts
            await asyncio.sleep(1.2)  # the paused replica is now more than 0.5 s behind
            async with client(app) as c:
                answers = [(await c.get(f"{flavour}/notes/x")).json() for _ in range(30)]
    finally:
        stop.set()
        writer.join()
    ports = [a["port"] if a["replica"] else "primary" for a in answers]
    assert behind not in ports, ports
    assert current in ports, ports


async def warm_any(app: FastAPI, flavour: str) -> None:
    async with client(app) as c:
        await asyncio.gather(*(c.get(f"{flavour}/notes/warm") for _ in range(6)))


async def test_a_background_job_reads_after_the_requests_write(paused: tuple[int, int]) -> None:
    app = make_app()
    job_results.clear()
    async with serve(app):
        await warm(app, "/notes/warm", paused)
        async with client(app) as c:
            names = [(await c.post("/notes/with-job")).json()["name"] for _ in range(10)]
    assert [job_results.get(name) for name in names] == [True] * 10


@pytest.mark.parametrize("flavour", ["", "/async"])
async def test_a_job_given_the_token_never_misses_the_write(
    paused: tuple[int, int], flavour: str
) -> None:
    app = make_app()
    async with serve(app):
        await warm(app, f"{flavour}/notes/warm", paused)
        async with client(app) as c:
            created = [(await c.post(f"{flavour}/notes")).json() for _ in range(5)]
        missed_with, missed_without = 0, 0
        for note in created:
            assert note["token"], "a request that wrote has a token to hand on"
            for after in [note["token"]] * 6 + [None] * 6:
                if flavour:
                    async with fastapi_rwdb.get_async_read_db_context(after=after) as s:
                        found = (await s.execute(text(WHERE), {"n": note["name"]})).one()[2]
                else:
                    with fastapi_rwdb.get_read_db_context(after=after) as s:
                        found = s.execute(text(WHERE), {"n": note["name"]}).one()[2]
                if after is None:
                    missed_without += not found
                else:
                    missed_with += not found
    assert missed_with == 0
    assert missed_without > 0  # the control: without the token a job can miss it


def test_a_token_that_does_not_verify_sends_the_job_to_the_primary() -> None:
    fastapi_rwdb.configure(RWDBSettings(secret_key=KEY))
    with fastapi_rwdb.get_read_db_context(after="2.ff.1.notatoken", wait=0) as s:
        assert s.execute(text("SELECT pg_is_in_recovery()")).scalar_one() is False


@pytest.mark.parametrize("how", ["close", "reset", "invalidate"])
def test_connections_a_routing_check_took_are_given_back(how: str) -> None:
    """Issue 13, bug 4: reset() and invalidate() end a session without close()."""
    import time

    from fastapi_rwdb.routing.request import RequestState, request_state
    from fastapi_rwdb.routing.tokens import Token

    db = Database(RWDBSettings(secret_key=KEY))
    state = RequestState(token=Token(lsn=1, expires=int(time.time()) + 30), database=db)
    token = request_state.set(state)
    try:
        session = db.read_session()
        session.execute(text("SELECT 1"))  # checked the position: an owned connection
        assert state.read_reason == "caught-up"
        pool = db.engines.read.pool
        assert pool.checkedout() == 1  # type: ignore[attr-defined]
        getattr(session, how)()
        assert pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        request_state.reset(token)
        db.dispose_sync()
