"""The middleware's own cost per request, with no database.

An in-process loop calls an ASGI app directly (see :func:`common.call`) with and
without :class:`ReadYourWritesMiddleware` in front of it, and with a valid token
in the header or the cookie. The variants alternate within each round; each
round's cost is the variant's time per request minus the bare app's in that
same round, and the figures are medians over the rounds.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from fastapi import FastAPI

from fastapi_rwdb import Database, RWDBSettings
from fastapi_rwdb.routing.tokens import Token
from fastapi_rwdb.web.middleware import ReadYourWritesMiddleware

from .common import SECRET_KEY, call, spread


async def trivial_asgi(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


def trivial_fastapi() -> FastAPI:
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    return app


def variants() -> tuple[dict[str, Any], list[tuple[str, str, Any, list[tuple[bytes, bytes]]]]]:
    # A long pin lifetime, so the token stays valid for the whole run (a token that
    # expires is ignored, and that path costs something else).
    settings = RWDBSettings(secret_key=SECRET_KEY, password="unused", pin_seconds=3600)
    database = Database(settings)  # never connects: nothing here opens a session
    token = database.signer.dump(Token(lsn=0x5_0000_0000, expires=int(time.time()) + 3000))
    assert database.signer.load(token, max_age=settings.pin_seconds) is not None
    header = [(b"x-rwdb-pin", token.encode())]
    cookie = [(b"cookie", f"_ga=GA1.2.3; session=abc; rwdb_pin={token}".encode())]
    fa_bare = trivial_fastapi()
    fa_mw = trivial_fastapi()
    fa_mw.add_middleware(ReadYourWritesMiddleware, database=database)
    mw = ReadYourWritesMiddleware(trivial_asgi, database=database)
    # (group, variant, app, headers); the first of each group is its baseline.
    cases = [
        ("asgi", "bare endpoint", trivial_asgi, []),
        ("asgi", "+ middleware, no token", mw, []),
        ("asgi", "+ middleware, token in header", mw, header),
        ("asgi", "+ middleware, token in cookie", mw, cookie),
        ("fastapi", "FastAPI route", fa_bare, []),
        ("fastapi", "+ middleware, no token", fa_mw, []),
        ("fastapi", "+ middleware, token in header", fa_mw, header),
    ]
    return {"token_length": len(token)}, cases


async def _time(app: Any, headers: list[tuple[bytes, bytes]], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        await call(app, "GET", "/", headers)
    return (time.perf_counter() - t0) / n * 1e6


async def _run(rounds: int, n: int) -> dict[str, Any]:
    info, cases = variants()
    for _, _, app, headers in cases:  # warm-up (FastAPI builds its middleware stack lazily)
        await _time(app, headers, 200)
    samples: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    deltas: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    gc.collect()
    for r in range(rounds):
        order = list(range(len(cases)))
        if r % 2:
            order.reverse()  # alternate the order of the variants between rounds
        this_round = {}
        for i in order:
            _, _, app, headers = cases[i]
            this_round[i] = await _time(app, headers, n)
        for i, (group, _, _, _) in enumerate(cases):
            base = next(j for j, c in enumerate(cases) if c[0] == group)
            samples[i].append(this_round[i])
            deltas[i].append(this_round[i] - this_round[base])
    rows = []
    for i, (group, name, _, _) in enumerate(cases):
        base = next(j for j, c in enumerate(cases) if c[0] == group)
        us = spread(samples[i])
        rows.append(
            {
                "group": group,
                "variant": name,
                "us_per_request": us,
                "cost_us": spread(deltas[i]),
                "ratio": us["median"] / spread(samples[base])["median"],
            }
        )
    return {"rounds": rounds, "requests_per_round": n, "rows": rows, **info}


def run(quick: bool = False) -> dict[str, Any]:
    rounds, n = (3, 500) if quick else (15, 4000)
    return asyncio.run(_run(rounds, n))
