"""Checked after check_login.py, whose module-scoped client ended the app's lifespan."""

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


def test_sync_read_of_a_fixture_user(client: TestClient, fixture_user: int) -> None:
    # The module's client starts the app's lifespan again (check_login's ended it): the
    # case that made the kit read the real read URL, silently.
    response = client.get(f"/users/{fixture_user}")
    assert response.status_code == 200, response.text


def test_created_through_the_api_is_read_back(client: TestClient) -> None:
    created = client.post("/users", json={"name": f"api-{uuid.uuid4()}"}).json()
    assert client.get(f"/users/{created['id']}").status_code == 200


def test_fixture_user_through_a_function_scoped_client(fixture_user: int) -> None:
    with TestClient(app) as c:  # its own lifespan, started and ended inside the test
        response = c.get(f"/users/{fixture_user}")
    assert response.status_code == 200, response.text


def test_fixture_user_through_a_session_client_without_lifespan(
    session_client: TestClient, fixture_user: int
) -> None:
    response = session_client.get(f"/users/{fixture_user}")
    assert response.status_code == 200, response.text


def test_fixture_user_through_a_session_client_with_lifespan(
    session_lifespan_client: TestClient, fixture_user: int
) -> None:
    response = session_lifespan_client.get(f"/users/{fixture_user}")
    assert response.status_code == 200, response.text


def test_an_earlier_tests_token_still_reads_the_primary(
    client: TestClient, fixture_user: int
) -> None:
    # The client's token is from test_created_through_the_api_is_read_back; rows were
    # written since. Replicas that lag have not replayed it, so this read goes to the
    # primary and finds the user: a stale replica per test would have caught up with
    # the token by now and answered 404.
    response = client.get(f"/users/{fixture_user}")
    assert response.status_code == 200, response.text
