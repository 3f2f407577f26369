"""Whatever a client puts in the token cookie or header, the answer is a normal
response served as if no token had been sent: never a 500, never a hang."""

from __future__ import annotations

import random
import time

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

import fastapi_rwdb
from fastapi_rwdb import Database, ReadSession, RWDBSettings
from fastapi_rwdb.routing.tokens import Token, TokenSigner

from ..forgery import wrong_signature

pytestmark = pytest.mark.stack

KEY = "fuzz-secret-key-0123456789abcdef"


def candidates(rng: random.Random) -> list[bytes]:
    ours = TokenSigner(KEY.encode())
    now = int(time.time())
    fixed = [
        ours.dump(Token(10**12, now - 1)).encode(),  # expired
        ours.dump(Token(10**12, now + 10**6)).encode(),  # far future
        TokenSigner(b"another-app-key-0123456789").dump(Token(1, now + 10)).encode(),
        wrong_signature(ours.dump(Token(1, now + 10))).encode(),
        b"1." + b"f" * 10_000 + b".1.x",  # huge
        b"\x00" * 64,
        b"=" * 300,
        b'"' * 3,
        b";",
    ]
    printable = bytes(range(0x20, 0x7F)).replace(b";", b"")
    randoms = [bytes(rng.choice(printable) for _ in range(rng.randint(1, 400))) for _ in range(150)]
    binary = [
        bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randint(1, 200))) for _ in range(50)
    ]
    return fixed + randoms + binary


async def test_fuzzed_tokens_are_ignored() -> None:
    app = FastAPI()
    fastapi_rwdb.setup(app, Database(RWDBSettings(secret_key=KEY, routing_header=True)))

    @app.get("/read")
    def read(db: ReadSession) -> dict[str, bool]:
        return {"replica": db.execute(text("SELECT pg_is_in_recovery()")).scalar_one()}

    rng = random.Random(20261122)
    statuses: dict[int, int] = {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://f", timeout=10) as c:
            for value in candidates(rng):
                for headers in ({"cookie": b"rwdb_pin=" + value}, {"x-rwdb-pin": value}):
                    response = await c.get("/read", headers=headers)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    assert response.headers["x-rwdb-read"] == "replica", value[:80]
                    assert "set-cookie" not in response.headers
    assert statuses == {200: 2 * len(candidates(random.Random(20261122)))}
