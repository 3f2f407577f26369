"""``give_token`` (and so ``rwdb.seed(client)``) with whichever HTTP library the client
is built on: httpx, or httpx2, which Starlette's TestClient prefers (issue 21, item 4)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from types import ModuleType
from typing import Any

import httpx
import httpx2
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fastapi_rwdb import Database, RWDBSettings
from fastapi_rwdb.testing import give_token

from ..helpers import KEY

LIBRARIES = [httpx, httpx2]


def database(**overrides: Any) -> Database:
    return Database(RWDBSettings(secret_key=KEY, password="x", **overrides))


def echo(library: ModuleType) -> Any:
    """A transport answering with the cookie and token header the request carried."""

    def handle(request: Any) -> Any:
        return library.Response(
            200,
            json={
                "cookie": request.headers.get("cookie"),
                "header": request.headers.get("x-rwdb-pin"),
            },
        )

    return library.MockTransport(handle)


@pytest.mark.parametrize("library", LIBRARIES, ids=lambda m: m.__name__)
def test_a_sync_client_sends_the_token_as_the_apps_cookie(library: ModuleType) -> None:
    with library.Client(transport=echo(library), base_url="http://testserver") as client:
        give_token(client, "tok-1", database())
        sent = client.get("/trackers").json()
    assert sent == {"cookie": "rwdb_pin=tok-1", "header": None}


@pytest.mark.parametrize("library", LIBRARIES, ids=lambda m: m.__name__)
def test_an_async_client_too_and_the_header_when_the_cookie_is_secure_over_http(
    library: ModuleType,
) -> None:
    async def run() -> Any:
        transport = echo(library)
        async with library.AsyncClient(transport=transport, base_url="http://t") as client:
            give_token(client, "tok-2", database(cookie_secure=True))
            return (await client.get("/trackers")).json()

    # A Secure cookie is not sent over plain HTTP, so the header carries the token.
    assert asyncio.run(run()) == {"cookie": None, "header": "tok-2"}


@pytest.mark.parametrize("library", LIBRARIES, ids=lambda m: m.__name__)
def test_the_apps_own_later_cookie_replaces_the_one_given(library: ModuleType) -> None:
    def handle(request: Any) -> Any:
        return library.Response(200, headers={"set-cookie": "rwdb_pin=from-app; Path=/"})

    transport = library.MockTransport(handle)
    with library.Client(transport=transport, base_url="http://testserver") as client:
        give_token(client, "tok-3", database())
        client.post("/trackers")
        assert [c.value for c in client.cookies.jar] == ["from-app"]


def test_starlettes_test_client_whatever_it_is_built_on() -> None:
    client = TestClient(FastAPI())
    base = {type(client).__mro__[1].__module__.split(".")[0]}
    assert base <= {"httpx", "httpx2"}
    give_token(client, "tok-4", database())
    assert client.cookies.get("rwdb_pin") == "tok-4"


def test_any_other_client_is_refused_with_what_it_needs() -> None:
    with pytest.raises(TypeError, match=r"httpx or httpx2 client.*got object"):
        give_token(object(), "tok", database())


def test_the_kit_imports_and_hands_tokens_over_without_a_deprecation_warning() -> None:
    # A fresh interpreter: in this one everything is imported already. The client is
    # built first: what Starlette's own import or TestClient warns about (old Starlette
    # on a newer anyio, at the lowest versions CI installs) is not the package's doing.
    script = (
        "import warnings\n"
        "from fastapi import FastAPI\n"
        "from fastapi.testclient import TestClient\n"
        "client = TestClient(FastAPI())\n"
        "warnings.simplefilter('error')\n"
        "import fastapi_rwdb, fastapi_rwdb.testing as kit\n"
        "db = fastapi_rwdb.Database(fastapi_rwdb.RWDBSettings(secret_key='k' * 32, password='x'))\n"
        "kit.give_token(client, 'tok', db)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
