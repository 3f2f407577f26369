"""Checked after check_login.py, whose client ended the app's lifespan."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from .app import app


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def test_created_through_the_api_is_read_back(client: TestClient) -> None:
    created = client.post("/users", json={"name": f"api-{uuid.uuid4()}"}).json()
    assert client.get(f"/users/{created['id']}").status_code == 200


def test_sync_read_of_a_fixture_user(client: TestClient, fixture_user: int) -> None:
    response = client.get(f"/users/{fixture_user}")
    assert response.status_code == 200, response.text


def test_fixture_user_through_a_function_scoped_client(fixture_user: int) -> None:
    with TestClient(app) as c:  # its own lifespan, started and ended inside the test
        response = c.get(f"/users/{fixture_user}")
    assert response.status_code == 200, response.text
