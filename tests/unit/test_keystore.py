"""The token key while the database's copy is out of reach: no database here, the
write URL points at a closed port (refused at once). The stored key itself is
tested on the stack (tests/stack/test_token_key.py)."""

from __future__ import annotations

import logging
import time

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from fastapi_rwdb import Database, RWDBSettings
from fastapi_rwdb.engine.keystore import SigningKeys
from fastapi_rwdb.routing.request import RequestState, request_state
from fastapi_rwdb.routing.tokens import Token, TokenSigner, derive_key, load_unverified
from fastapi_rwdb.web.middleware import ReadYourWritesMiddleware

NOW = 1_700_000_000.0
CLOSED = "postgresql://app:pw@127.0.0.1:1/appdb"
OTHER = TokenSigner(b"another process's stored key 0123456789")


def unreachable() -> Database:
    return Database(RWDBSettings(write_url=CLOSED, read_url=CLOSED, connect_timeout=1))


def test_a_token_taken_at_its_word_is_still_checked_for_shape_and_expiry() -> None:
    good = OTHER.dump(Token(lsn=42, expires=int(NOW) + 20))
    assert load_unverified(good, max_age=30, now=NOW) == Token(42, int(NOW) + 20)
    expired = OTHER.dump(Token(lsn=42, expires=int(NOW) - 1))
    assert load_unverified(expired, max_age=30, now=NOW) is None
    assert load_unverified(expired, max_age=30, now=NOW, check_expiry=False) is not None
    too_far = OTHER.dump(Token(lsn=42, expires=int(NOW) + 3600))
    for raw in (too_far, "", None, "junk", good[:-1], "3" + good[1:], good + "x" * 200):
        assert load_unverified(raw, max_age=30, now=NOW) is None, raw


def test_a_set_secret_key_is_known_at_once_without_the_database() -> None:
    keys = SigningKeys(RWDBSettings(write_url=CLOSED, read_url=CLOSED, secret_key="k" * 20))
    signer = keys.current()
    assert signer is not None
    raw = signer.dump(Token(1, int(time.time()) + 10))
    assert TokenSigner(b"k" * 20).load(raw, max_age=30) is not None


async def test_the_event_loop_never_waits_for_the_key() -> None:
    keys = unreachable().signing_keys
    started = time.monotonic()
    assert keys.known() is None  # on the loop: no blocking attempt at all
    assert time.monotonic() - started < 0.05
    assert await keys.load_async() is None  # the asynchronous attempt fails, quietly
    assert keys.current() is None and not keys.may_retry()  # and waits a second


def test_a_worker_thread_fetches_the_key_and_falls_back_to_the_derived_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="fastapi_rwdb")
    database = unreachable()
    raw = database.token_for(7)
    derived = TokenSigner(derive_key("app", "appdb", "pw"))
    assert derived.load(raw, max_age=database.settings.pin_seconds) is not None
    assert "password guesses" in caplog.text and "pw" not in caplog.text.replace("password", "")


class Committing:
    def __init__(self) -> None:
        self.seen: RequestState | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.seen = state = request_state.get()
        assert state is not None
        state.note_commit(99)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def test_while_the_key_is_unknown_tokens_are_honoured_and_writes_get_one() -> None:
    """The database is out of reach: the client's token, signed by a process that
    knew the key, still pins it; the write's answer still carries a token, signed
    with the derived key that every process also verifies with."""
    database = unreachable()
    app = Committing()
    wrapped = ReadYourWritesMiddleware(app, database=database)
    transport = httpx.ASGITransport(app=wrapped)
    theirs = OTHER.dump(Token(lsn=50, expires=int(time.time()) + 20))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        answer = await c.post("/", headers={"X-RWDB-Pin": theirs})
    assert answer.status_code == 200
    assert app.seen is not None and app.seen.token is not None and app.seen.token.lsn == 50
    issued = answer.headers["x-rwdb-pin"]
    derived = TokenSigner(derive_key("app", "appdb", "pw"))
    assert derived.load(issued, max_age=database.settings.pin_seconds) == Token(
        99, int(issued.split(".")[2])
    )
