"""Read-your-writes against the real stack, with the replicas held back by `lag 1s`."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import psycopg
import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from sqlalchemy import event, text

import fastapi_rwdb
from fastapi_rwdb import (
    AsyncReadSession,
    AsyncWriteSession,
    ReadSession,
    WriteSession,
)
from fastapi_rwdb.audit import TEARDOWN_AFTER_RESPONSE

from ..helpers import (
    NODE_PORTS,
    add_writes,
    client,
    node_dsn,
    replica_nodes,
    replicas_lagging,
    rwdb_app,
)
from ..models import Item

pytestmark = pytest.mark.stack

TOKEN_HEADER = "X-RWDB-Pin"
# A replica reports its replay position at least every wal_receiver_status_interval (1 s
# on the stack; sooner only when new WAL arrives), and make_app's view looks every 0.1 s.
VIEW_DELAY = 1.5


@pytest.fixture(scope="module")
def lagging_replicas() -> Iterator[float]:
    """Replicas apply each commit one second late, so a fresh write is surely missing there."""
    with replicas_lagging("1s"):
        yield 1.0


def make_app(**overrides: object) -> FastAPI:
    # A quick replica view, so that "every replica has it" is known soon after it is true.
    overrides.setdefault("lag_check_interval", 0.1)
    app = rwdb_app(routing_header=True, **overrides)
    add_writes(app)

    @app.post("/notes/rolled-back")
    def rolled_back(db: WriteSession) -> dict[str, str]:
        db.execute(text("INSERT INTO rwdb_items (name) VALUES ('rolled back')"))
        db.rollback()
        return {}

    @app.post("/notes/read-only-commit")
    def read_only_commit(db: WriteSession) -> dict[str, int]:
        value = db.execute(text("SELECT 1")).scalar_one()
        db.commit()
        return {"value": value}

    @app.post("/notes/then-read")
    def write_then_read(w: WriteSession, r: ReadSession) -> dict[str, object]:
        name = f"same-{uuid.uuid4()}"
        w.execute(text("INSERT INTO rwdb_items (name) VALUES (:n)"), {"n": name})
        w.commit()
        return {"found": find(r, name)}

    @app.post("/async/notes/then-read")
    async def write_then_read_async(w: AsyncWriteSession, r: AsyncReadSession) -> dict[str, object]:
        name = f"asame-{uuid.uuid4()}"
        await w.execute(text("INSERT INTO rwdb_items (name) VALUES (:n)"), {"n": name})
        await w.commit()
        row = await r.execute(text("SELECT 1 FROM rwdb_items WHERE name = :n"), {"n": name})
        return {"found": row.first() is not None}

    @app.post("/notes/fail-after-commit")
    def fail_after_commit(db: WriteSession) -> dict[str, str]:
        db.execute(text("INSERT INTO rwdb_items (name) VALUES ('then failed')"))
        db.commit()
        raise HTTPException(409, "conflict after the write")

    @app.get("/notes/{name}")
    def read(name: str, db: ReadSession) -> dict[str, object]:
        return {"found": find(db, name)}

    @app.get("/async/notes/{name}")
    async def read_async(name: str, db: AsyncReadSession) -> dict[str, object]:
        row = await db.execute(text("SELECT 1 FROM rwdb_items WHERE name = :n"), {"n": name})
        return {"found": row.first() is not None}

    @app.get("/stream/{name}")
    def stream(name: str, db: ReadSession) -> StreamingResponse:
        found = find(db, name)
        return StreamingResponse(iter([b"found" if found else b"missing"]))

    return app


async def replicas_have(name: str, timeout: float = 10.0) -> None:
    """Wait until both replicas show the row (checked on each node directly)."""
    deadline = time.monotonic() + timeout
    for port in await asyncio.to_thread(replica_ports):
        while True:
            with psycopg.connect(node_dsn(port), prepare_threshold=None) as conn:
                row = conn.execute("SELECT 1 FROM rwdb_items WHERE name = %s", (name,)).fetchone()
            if row is not None:
                break
            assert time.monotonic() < deadline, f"the replica on {port} never got {name}"
            await asyncio.sleep(0.05)


def replica_ports() -> set[int]:
    """The PostgreSQL ports of the nodes in recovery."""
    ports = {NODE_PORTS[node] for node in replica_nodes()}
    assert len(ports) == 2, f"expected two replicas, found {ports}"
    return ports


def find(db: ReadSession, name: str) -> bool:
    row = db.execute(text("SELECT 1 FROM rwdb_items WHERE name = :n"), {"n": name}).first()
    return row is not None


@pytest.fixture(scope="module")
async def app() -> AsyncIterator[FastAPI]:
    application = make_app()
    async with application.router.lifespan_context(application):
        yield application


@pytest.mark.parametrize("flavour", ["", "/async"])
async def test_100_writes_read_back_at_once_only_with_the_token(
    app: FastAPI, lagging_replicas: float, flavour: str
) -> None:
    seen_with, missed_without = 0, 0
    async with client(app) as me, client(app) as stranger:
        for _ in range(100):
            me.cookies.clear()
            created = await me.post(f"{flavour}/notes")
            assert created.status_code == 200
            name = created.json()["name"]
            assert me.cookies.get("rwdb_pin"), "a write must hand out a token"
            mine = await me.get(f"{flavour}/notes/{name}")
            theirs = await stranger.get(f"{flavour}/notes/{name}")
            seen_with += mine.json()["found"]
            missed_without += not theirs.json()["found"]
            assert mine.headers["x-rwdb-read"] == "primary; reason=replica-behind"
            assert theirs.headers["x-rwdb-read"] == "replica"
        assert seen_with == 100, "a client must always see its own write"
        # Proves the reads without a token really went to lagging replicas.
        assert missed_without == 100

        await replicas_have(name)
        await asyncio.sleep(VIEW_DELAY)
        again = await me.get(f"{flavour}/notes/{name}")
        assert again.json()["found"] is True
        assert again.headers["x-rwdb-read"] == "replica"
        assert "rwdb_pin" not in me.cookies, "once every replica has it the token is cleared"
        assert again.headers[TOKEN_HEADER] == ""


@pytest.mark.parametrize("flavour", ["", "/async"])
async def test_caught_up_check_costs_no_statement_of_its_own(app: FastAPI, flavour: str) -> None:
    """The checkout ping already read the replay position on the connection."""
    async with client(app) as c:
        await c.get(f"{flavour}/notes/warm-up")  # a pooled, no longer fresh, read connection
        name = (await c.post(f"{flavour}/notes")).json()["name"]
        await replicas_have(name)  # the module's lag fixture may still be holding them back
        await asyncio.sleep(VIEW_DELAY)
        db = fastapi_rwdb.get_database()
        engine = db.engines.read if not flavour else db.async_engines.read.sync_engine
        statements: list[str] = []
        listener = lambda *args: statements.append(args[2])  # noqa: E731
        event.listen(engine, "before_cursor_execute", listener)
        try:
            found = await c.get(f"{flavour}/notes/{name}")
        finally:
            event.remove(engine, "before_cursor_execute", listener)
    assert found.headers["x-rwdb-read"] == "replica" and found.json()["found"] is True
    assert found.headers[TOKEN_HEADER] == ""  # served by a replica that had it: cleared
    assert len(statements) == 1 and "pg_last_wal_replay_lsn" not in statements[0]


async def test_token_header_works_for_api_clients(app: FastAPI, lagging_replicas: float) -> None:
    async with client(app) as c:
        created = await c.post("/notes")
        token = created.headers[TOKEN_HEADER]
        c.cookies.clear()
        found = await c.get(f"/notes/{created.json()['name']}", headers={TOKEN_HEADER: token})
        assert found.json()["found"] is True
        assert found.headers["x-rwdb-read"].startswith("primary")


@pytest.mark.parametrize("path", ["/notes/then-read", "/async/notes/then-read"])
async def test_read_after_write_in_the_same_request(
    app: FastAPI, lagging_replicas: float, path: str
) -> None:
    async with client(app) as c:
        for _ in range(10):
            response = await c.post(path)
            assert response.json() == {"found": True}
            assert response.headers["x-rwdb-read"] == "primary; reason=wrote-in-request"


async def test_no_token_without_a_committed_write(app: FastAPI) -> None:
    async with client(app) as c:
        for path in ("/notes/rolled-back", "/notes/read-only-commit"):
            response = await c.post(path)
            assert response.status_code == 200
            assert "set-cookie" not in response.headers
            assert TOKEN_HEADER not in response.headers


async def test_cookie_attributes(app: FastAPI) -> None:
    async with client(app) as c:
        response = await c.post("/notes")
    cookie = response.headers["set-cookie"]
    name_value, *attributes = [part.strip() for part in cookie.split(";")]
    assert name_value.startswith("rwdb_pin=") and len(name_value) > 20
    assert set(attributes) == {"Max-Age=30", "Path=/", "HttpOnly", "SameSite=Lax"}


async def test_secure_cookie_and_custom_names() -> None:
    app = make_app(cookie_secure=True, cookie_name="pin", token_header="X-Pin", pin_seconds=5)
    async with app.router.lifespan_context(app), client(app) as c:
        response = await c.post("/notes")
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("pin=") and "Secure" in cookie and "Max-Age=5" in cookie
    assert response.headers["x-pin"] == cookie.split(";")[0].removeprefix("pin=")


async def test_error_after_commit_still_carries_the_token(
    app: FastAPI, lagging_replicas: float
) -> None:
    async with client(app) as c:
        response = await c.post("/notes/fail-after-commit")
    assert response.status_code == 409
    assert "rwdb_pin=" in response.headers["set-cookie"]


async def test_streaming_response_reads_through_the_token(
    app: FastAPI, lagging_replicas: float
) -> None:
    async with client(app) as c:
        name = (await c.post("/notes")).json()["name"]
        assert (await c.get(f"/stream/{name}")).content == b"found"


@pytest.mark.parametrize(
    "bad",
    [
        "garbage",
        "1.ffffffffff.9999999999.forged",
        "x" * 5000,
        "\u00ff\u00fe\u00e9;;==",
    ],
)
async def test_forged_or_garbled_tokens_are_ignored(app: FastAPI, bad: str) -> None:
    async with client(app) as c:
        raw = bad.encode("latin-1")
        for headers in ({"cookie": b"rwdb_pin=" + raw}, {TOKEN_HEADER: raw}):
            response = await c.get("/notes/nothing-here", headers=headers)
            assert response.status_code == 200
            assert response.headers["x-rwdb-read"] == "replica"


async def test_tampered_lsn_is_ignored(app: FastAPI) -> None:
    async with client(app) as c:
        token = (await c.post("/notes")).headers[TOKEN_HEADER]
        version, _lsn, expires, sig = token.split(".")
        forged = ".".join([version, "ffffffffff", expires, sig])
        c.cookies.clear()
        response = await c.get("/notes/x", headers={TOKEN_HEADER: forged})
    assert response.headers["x-rwdb-read"] == "replica"


async def test_time_window_mode_pins_without_checking(lagging_replicas: float) -> None:
    app = make_app(pin_mode="window", pin_seconds=2)
    async with app.router.lifespan_context(app), client(app) as c:
        name = (await c.post("/notes")).json()["name"]
        pinned = await c.get(f"/notes/{name}")
        assert pinned.json()["found"] is True
        assert pinned.headers["x-rwdb-read"] == "primary; reason=pinned"
        cookie_max_age = "Max-Age=2"
        assert cookie_max_age in (await c.post("/notes")).headers["set-cookie"]
        time.sleep(2.1)
        c.cookies.clear()  # what the browser does when Max-Age runs out
        assert (await c.get(f"/notes/{name}")).headers["x-rwdb-read"] == "replica"


async def test_wait_for_replica_instead_of_primary(lagging_replicas: float) -> None:
    app = make_app(pin_wait_ms=2000)
    async with app.router.lifespan_context(app), client(app) as c:
        name = (await c.post("/notes")).json()["name"]
        waited = await c.get(f"/notes/{name}")
        assert waited.json()["found"] is True
        assert waited.headers["x-rwdb-read"] == "replica"


@pytest.fixture(scope="module")
def deferred_table() -> Iterator[None]:
    ddl = (
        "CREATE TABLE IF NOT EXISTS rwdb_deferred (k int,"
        " CONSTRAINT rwdb_deferred_k UNIQUE (k) DEFERRABLE INITIALLY DEFERRED)"
    )
    with fastapi_rwdb.get_write_db_context() as s:
        s.execute(text(ddl))
    yield


@pytest.mark.parametrize("orm_write", [False, True])
async def test_commit_that_fails_at_commit_time_is_an_error_and_issues_no_token(
    deferred_table: None, orm_write: bool
) -> None:
    """A deferred constraint fails at COMMIT: the one-message commit must raise."""
    app = rwdb_app()
    key = int(time.time() * 1000) % 2_000_000_000

    @app.post("/twice")
    def twice(db: WriteSession) -> dict[str, str]:
        db.execute(text("INSERT INTO rwdb_deferred VALUES (:k), (:k)"), {"k": key})
        if orm_write:
            db.add(Item(name="with the deferred pair"))
        db.commit()
        return {"never": "reached"}

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            response = await c.post("/twice")
    assert response.status_code == 500
    assert "set-cookie" not in response.headers
    with fastapi_rwdb.get_read_db_context(primary=True) as s:
        count = s.execute(text("SELECT count(*) FROM rwdb_deferred WHERE k = :k"), {"k": key})
        assert count.scalar_one() == 0


async def test_savepoint_commit_issues_no_token_before_the_real_commit() -> None:
    seen: dict[str, object] = {}
    sub = rwdb_app()

    @sub.post("/nested")
    def nested(db: WriteSession) -> dict[str, bool]:
        from fastapi_rwdb.routing.request import request_state

        with db.begin_nested():
            db.execute(text("INSERT INTO rwdb_items (name) VALUES ('in a savepoint')"))
        state = request_state.get()
        seen["after_savepoint"] = state is not None and state.commit_lsn
        db.commit()
        seen["after_commit"] = state is not None and state.commit_lsn
        return {"ok": True}

    async with sub.router.lifespan_context(sub), client(sub) as c:
        response = await c.post("/nested")
    assert response.status_code == 200
    assert seen["after_savepoint"] is None
    assert isinstance(seen["after_commit"], int) and seen["after_commit"] > 0
    assert "rwdb_pin=" in response.headers["set-cookie"]


@pytest.mark.parametrize("flavour", ["", "/async"])
async def test_caught_up_check_without_the_checkout_ping(flavour: str) -> None:
    """With RWDB_POOL_PRE_PING off, the session asks for the replay position itself."""
    app = make_app(pool_pre_ping=False)
    async with app.router.lifespan_context(app), client(app) as c:
        await c.get(f"{flavour}/notes/warm-up")
        name = (await c.post(f"{flavour}/notes")).json()["name"]
        await replicas_have(name)
        await asyncio.sleep(VIEW_DELAY)
        found = await c.get(f"{flavour}/notes/{name}")
    assert found.json()["found"] is True
    assert found.headers["x-rwdb-read"] == "replica"
    assert found.headers[TOKEN_HEADER] == ""  # every replica had it: token cleared


def late_commit_app() -> FastAPI:
    """Routes that commit where the client can no longer be given a token."""
    app = make_app()

    @app.post("/late/crash")
    def crash(db: WriteSession) -> None:
        db.execute(text("INSERT INTO rwdb_items (name) VALUES ('then crashed')"))
        db.commit()
        raise RuntimeError("an unhandled error after the commit")

    @app.post("/late/stream")
    def stream_commit(db: WriteSession) -> StreamingResponse:
        def body() -> Iterator[bytes]:
            yield b"writing..."
            db.execute(text("INSERT INTO rwdb_items (name) VALUES ('in a stream')"))
            db.commit()
            yield b"done"

        return StreamingResponse(body())

    @app.post("/async/late/stream")
    async def stream_commit_async(db: AsyncWriteSession) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"writing..."
            await db.execute(text("INSERT INTO rwdb_items (name) VALUES ('in a stream')"))
            await db.commit()
            yield b"done"

        return StreamingResponse(body())

    def commit_in_teardown(db: WriteSession) -> Iterator[None]:
        yield
        db.execute(text("INSERT INTO rwdb_items (name) VALUES ('in a teardown')"))
        db.commit()

    @app.post("/late/teardown", dependencies=[Depends(commit_in_teardown)])
    def teardown() -> dict[str, bool]:
        return {"ok": True}

    return app


async def test_a_commit_then_an_unhandled_error_still_hands_out_the_token(
    lagging_replicas: float,
) -> None:
    app = late_commit_app()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as c,
    ):
        response = await c.post("/late/crash")
        assert response.status_code == 500
        assert "rwdb_pin=" in response.headers["set-cookie"]
        assert response.headers[TOKEN_HEADER]
        # The client's next read goes where the committed row is.
        read = await c.get("/notes/then%20crashed")
        assert read.json()["found"] is True
        assert read.headers["x-rwdb-read"].startswith("primary")


@pytest.mark.parametrize("path", ["/late/stream", "/async/late/stream", "/late/teardown"])
async def test_a_commit_after_the_response_started_is_logged_with_the_route(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    # The warning is rate-limited per route and process: start from a clean slate.
    monkeypatch.setattr(fastapi_rwdb.routing.request, "_late_warned", {})
    app = late_commit_app()
    with caplog.at_level(logging.WARNING, logger="fastapi_rwdb"):
        async with app.router.lifespan_context(app), client(app) as c:
            response = await c.post(path)
    assert response.status_code == 200
    warnings = [r.getMessage() for r in caplog.records if "after its response" in r.getMessage()]
    if path == "/late/teardown" and not TEARDOWN_AFTER_RESPONSE:
        # FastAPI before 0.118 ran the teardown before the response: in time for a token.
        assert "rwdb_pin=" in response.headers["set-cookie"] and warnings == []
        return
    assert "set-cookie" not in response.headers  # too late for a token ...
    assert len(warnings) == 1 and f"POST {path}" in warnings[0]  # ... but never silently
