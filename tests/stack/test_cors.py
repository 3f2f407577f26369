"""The CORS configuration of docs/quick-start.md, run as written, against the real stack.

A browser page on another origin must be able to send its preflight, write,
keep the cookie and read the token header of the response.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from fastapi_rwdb import ReadSession

from ..helpers import add_writes, served_client

pytestmark = pytest.mark.stack

QUICK_START = Path(__file__).resolve().parents[2] / "docs" / "quick-start.md"
ORIGIN = "https://app.example.com"


def documented_cors_app() -> FastAPI:
    """The app the quick start's CORS section builds, with two routes added."""
    section = QUICK_START.read_text().split("## Browser apps on another origin (CORS)", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the quick start's CORS section has no code block"
    namespace: dict[str, Any] = {}
    exec(code[1], namespace)  # noqa: S102 - our own documentation
    app: FastAPI = namespace["app"]

    add_writes(app)

    @app.get("/notes/{name}")
    def read(name: str, db: ReadSession) -> dict[str, bool]:
        row = db.execute(text("SELECT 1 FROM rwdb_items WHERE name = :n"), {"n": name})
        return {"found": row.first() is not None}

    return app


def exposed(response: httpx.Response) -> set[str]:
    value = response.headers.get("access-control-expose-headers", "")
    return {name.strip().lower() for name in value.split(",") if name.strip()}


async def test_a_cross_origin_page_can_write_keep_the_cookie_and_read_the_token() -> None:
    app = documented_cors_app()
    async with served_client(app, "https://api.example.com") as c:
        preflight = await c.options(
            "/notes",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, x-rwdb-pin",
            },
        )
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert preflight.headers["access-control-allow-credentials"] == "true"
        allowed = preflight.headers["access-control-allow-headers"].lower()
        assert "x-rwdb-pin" in allowed

        written = await c.post("/notes", headers={"Origin": ORIGIN})
        assert written.status_code == 200
        assert written.headers["access-control-allow-origin"] == ORIGIN
        assert written.headers["access-control-allow-credentials"] == "true"
        assert {"x-rwdb-pin", "x-rwdb-read"} <= exposed(written)
        token = written.headers["x-rwdb-pin"]
        assert token
        cookie = written.headers["set-cookie"]
        assert cookie.startswith(f"rwdb_pin={token};") and "HttpOnly" in cookie

        # Another site's page cannot send the Lax cookie: it sends the header back.
        c.cookies.clear()
        name = written.json()["name"]
        read = await c.get(f"/notes/{name}", headers={"Origin": ORIGIN, "X-RWDB-Pin": token})
        assert read.json() == {"found": True}
        assert read.headers["access-control-allow-origin"] == ORIGIN


async def test_an_origin_not_listed_gets_no_cors_headers() -> None:
    app = documented_cors_app()
    async with served_client(app, "https://api.example.com") as c:
        preflight = await c.options(
            "/notes",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code == 400
        assert "access-control-allow-origin" not in preflight.headers
