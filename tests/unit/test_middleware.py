"""The middleware on a stub ASGI app: which token wins, what the response says.
No database: these run in milliseconds (``pytest -m "not stack"``)."""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from fastapi_rwdb import Database, RWDBSettings
from fastapi_rwdb.routing.request import RequestState, request_state
from fastapi_rwdb.routing.tokens import Token, TokenSigner
from fastapi_rwdb.web.middleware import ReadYourWritesMiddleware

from ..forgery import wrong_signature

KEY = "middleware-key-0123456789abcdef"
signer = TokenSigner(KEY.encode())


def token(lsn: int, expires_in: int = 20) -> str:
    return signer.dump(Token(lsn=lsn, expires=int(time.time()) + expires_in))


class Stub:
    """An app that records the state it was given and may commit or fail."""

    def __init__(self, commit_lsn: int | None = None, fail: bool = False) -> None:
        self.commit_lsn, self.fail = commit_lsn, fail
        self.seen: RequestState | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = request_state.get()
        assert state is not None
        self.seen = state
        if self.commit_lsn is not None:
            state.note_commit(self.commit_lsn)
        if self.fail:
            raise RuntimeError("after the commit")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def client(app: Any, **settings: Any) -> httpx.AsyncClient:
    database = Database(RWDBSettings(secret_key=KEY, password="x", **settings))
    wrapped = ReadYourWritesMiddleware(app, database=database)
    transport = httpx.ASGITransport(app=wrapped, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://t")


async def incoming(headers: list[tuple[str, str]]) -> Token | None:
    stub = Stub()
    async with client(stub) as c:
        await c.get("/", headers=headers)
    assert stub.seen is not None
    return stub.seen.token


async def test_the_newest_token_wins_wherever_it_stands() -> None:
    old, new = token(100), token(200)
    for headers in (
        [("x-rwdb-pin", old), ("cookie", f"rwdb_pin={new}")],
        [("cookie", f"rwdb_pin={new}"), ("x-rwdb-pin", old)],
        [("cookie", f"rwdb_pin={old}; rwdb_pin={new}")],
        [("x-rwdb-pin", f"{old}, {new}")],
    ):
        found = await incoming(headers)
        assert found is not None and found.lsn == 200, headers


async def test_empty_and_invalid_values_are_ignored_not_obeyed() -> None:
    good = token(300)
    for headers in (
        [("x-rwdb-pin", ""), ("cookie", f"rwdb_pin={good}")],
        [("cookie", f"rwdb_pin=junk; rwdb_pin={good}")],
        [("x-rwdb-pin", wrong_signature(token(10**9))), ("cookie", f"rwdb_pin={good}")],
        [("x-rwdb-pin", "junk"), ("x-rwdb-pin", good)],
    ):
        found = await incoming(headers)
        assert found is not None and found.lsn == 300, headers


async def test_a_newer_cookie_is_not_cleared_because_an_older_header_came_too() -> None:
    old, new = token(100), token(200)
    async with client(Stub()) as c:
        response = await c.get("/", headers={"x-rwdb-pin": old, "cookie": f"rwdb_pin={new}"})
    assert "set-cookie" not in response.headers


async def test_a_commit_older_than_the_clients_token_keeps_the_newer_position() -> None:
    async with client(Stub(commit_lsn=50)) as c:
        response = await c.post("/", headers={"x-rwdb-pin": token(500)})
    issued = signer.load(response.headers["x-rwdb-pin"], max_age=30)
    assert issued is not None and issued.lsn == 500


async def test_a_commit_followed_by_an_unhandled_error_still_reaches_the_client() -> None:
    async with client(Stub(commit_lsn=777, fail=True)) as c:
        response = await c.post("/")
    assert response.status_code == 500
    issued = signer.load(response.headers["x-rwdb-pin"], max_age=30)
    assert issued is not None and issued.lsn == 777
    assert "rwdb_pin=" in response.headers["set-cookie"]


async def test_an_error_without_a_commit_is_left_to_the_server() -> None:
    stub = Stub(fail=True)
    database = Database(RWDBSettings(secret_key=KEY, password="x"))
    wrapped = ReadYourWritesMiddleware(stub, database=database)
    with pytest.raises(RuntimeError):
        await wrapped({"type": "http", "method": "GET", "path": "/", "headers": []}, _nothing, _no)


async def _nothing() -> dict[str, Any]:
    return {"type": "http.request", "body": b""}


async def _no(message: Any) -> None:
    raise AssertionError("nothing may be sent for an error without a commit")


async def test_a_forged_token_is_logged_once_with_a_hint(caplog: pytest.LogCaptureFixture) -> None:
    forged = wrong_signature(token(1))
    with caplog.at_level(logging.WARNING, logger="fastapi_rwdb"):
        async with client(Stub()) as c:
            for _ in range(3):
                await c.get("/", headers={"x-rwdb-pin": forged})
            await c.get("/", headers={"x-rwdb-pin": signer.dump(Token(1, 1))})  # just expired
    messages = [r.getMessage() for r in caplog.records if "signature" in r.getMessage()]
    assert len(messages) == 1
    assert "RWDB_SECRET_KEY" in messages[0]


async def test_session_consistency_issues_a_token_only_when_the_position_moves() -> None:
    class Reader(Stub):
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            state = request_state.get()
            assert state is not None
            state.note_seen(int(scope["path"].strip("/")))
            await super().__call__(scope, receive, send)

    async with client(Reader(), consistency="session") as c:
        first = await c.get("/400")
        assert signer.load(first.headers["x-rwdb-pin"], max_age=30).lsn == 400  # type: ignore[union-attr]
        same = await c.get("/400")
        older = await c.get("/300")
        newer = await c.get("/450")
    assert "set-cookie" not in same.headers and "set-cookie" not in older.headers
    assert signer.load(newer.headers["x-rwdb-pin"], max_age=30).lsn == 450  # type: ignore[union-attr]


async def test_read_your_writes_mode_keeps_a_token_while_no_replica_view_says_otherwise() -> None:
    async with client(Stub()) as c:
        response = await c.get("/", headers={"x-rwdb-pin": token(1)})
    assert "set-cookie" not in response.headers  # no view of the replicas: keep it
