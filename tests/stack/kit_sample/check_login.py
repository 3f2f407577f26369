"""Checked first: its module-scoped client ends the app's lifespan when the module ends."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from .app import app


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def test_login_then_me(client: TestClient) -> None:
    name = f"login-{uuid.uuid4()}"
    assert client.post("/login", json={"name": name}).status_code == 200
    response = client.get("/me", headers={"x-user": name})
    assert response.status_code == 200, response.text


def test_health(client: TestClient, session_lifespan_client: TestClient) -> None:
    assert client.get("/health").json() == {"ok": True}
    # The session's client starts its lifespan here; this module's ends under it.
    assert session_lifespan_client.get("/health").json() == {"ok": True}


@pytest.fixture
async def async_client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as c,
    ):
        yield c


async def test_async_read_of_a_fixture_user(
    async_client: httpx.AsyncClient, fixture_user: int
) -> None:
    response = await async_client.get(f"/async/users/{fixture_user}")
    assert response.status_code == 200, response.text
