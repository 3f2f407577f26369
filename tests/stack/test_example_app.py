"""example_app against the real stack: every route, the cookie, and the worker script.

Reads go through the client's cookie, as a browser's would, so they hold even
while someone else's test holds the replicas back (``stack.sh lag``).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from sqlmodel import col, select

import fastapi_rwdb
from example_app import main as example
from example_app.models import DailySummary, Location
from fastapi_rwdb import get_read_db_context
from fastapi_rwdb.engine import asyncpg_connection
from fastapi_rwdb.orm import writes as tracking

from ..helpers import client, replicas_lagging

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
async def app() -> AsyncIterator[FastAPI]:
    # Other test modules install their own process-wide Database: serve the app with
    # the one its setup() made, and hand the previous one back afterwards.
    with fastapi_rwdb.using(example.database):
        async with example.app.router.lifespan_context(example.app):
            yield example.app


def unique(prefix: str) -> str:
    return f"{prefix} {uuid.uuid4().hex[:12]}"


async def create(c: httpx.AsyncClient, name: str, path: str = "/trackers") -> dict[str, Any]:
    response = await c.post(path, json={"name": name, "serial": "TRK-" + name[-6:]})
    assert response.status_code == 201, response.text
    assert c.cookies.get("rwdb_pin"), "a write hands out the read-your-writes cookie"
    body: dict[str, Any] = response.json()
    return body


async def test_create_then_read_back_list_and_search(app: FastAPI) -> None:
    async with client(app) as c:
        name = unique("van")
        tracker = await create(c, name)
        assert tracker["name"] == name and isinstance(tracker["id"], int)

        got = await c.get(f"/trackers/{tracker['id']}")
        assert got.status_code == 200
        assert got.json() == {**tracker, "latest_locations": []}

        listed = await c.get("/trackers", params={"limit": 500, "skip": 0})
        assert listed.status_code == 200
        ids = [t["id"] for t in listed.json()]
        assert ids == sorted(ids, reverse=True), "newest first"
        assert tracker["id"] in ids

        found = await c.get("/trackers/search", params={"q": name.upper()})
        assert [t["id"] for t in found.json()] == [tracker["id"]]


async def test_search_takes_wildcards_literally(app: FastAPI) -> None:
    async with client(app) as c:
        tag = uuid.uuid4().hex[:12]
        await create(c, f"truck {tag}x")
        assert (await c.get("/trackers/search", params={"q": f"{tag}_"})).json() == []
        assert (await c.get("/trackers/search", params={"q": f"{tag}%"})).json() == []
        assert len((await c.get("/trackers/search", params={"q": f"{tag}x"})).json()) == 1
        assert (await c.get("/trackers/search", params={"q": ""})).status_code == 422


async def test_update_and_delete(app: FastAPI) -> None:
    async with client(app) as c:
        tracker = await create(c, unique("bike"))
        tid = tracker["id"]
        renamed = unique("bike renamed")
        patched = await c.patch(f"/trackers/{tid}", json={"name": renamed})
        assert patched.status_code == 200
        assert patched.json() == {**tracker, "name": renamed}  # serial untouched
        assert (await c.get(f"/trackers/{tid}")).json()["name"] == renamed

        assert (await c.delete(f"/trackers/{tid}")).status_code == 204
        assert (await c.get(f"/trackers/{tid}")).status_code == 404
        assert (await c.delete(f"/trackers/{tid}")).status_code == 404
        assert (await c.patch(f"/trackers/{tid}", json={"name": "x"})).status_code == 404


@pytest.mark.parametrize("flavour", ["", "/async"])
async def test_location_write_answers_with_what_it_wrote(app: FastAPI, flavour: str) -> None:
    async with client(app) as c:
        tracker = await create(c, unique("boat"), f"{flavour}/trackers")
        tid = tracker["id"]
        first = await c.post(
            f"{flavour}/trackers/{tid}/locations",
            json={"latitude": 52.52, "longitude": 13.405, "recorded_at": "2024-05-01T08:00:00Z"},
        )
        assert first.status_code == 201, first.text
        second = await c.post(
            f"{flavour}/trackers/{tid}/locations", json={"latitude": -33.9, "longitude": 151.2}
        )
        assert second.status_code == 201
        detail = second.json()
        assert detail["id"] == tid and detail["name"] == tracker["name"]
        points = [(p["latitude"], p["longitude"]) for p in detail["latest_locations"]]
        assert points == [(-33.9, 151.2), (52.52, 13.405)], "newest first, the new one included"

        # And read back later, through a read session and the cookie.
        again = await c.get(f"{flavour}/trackers/{tid}")
        assert again.json() == detail
        if not flavour:
            history = await c.get(f"/trackers/{tid}/locations", params={"limit": 1})
            assert [p["latitude"] for p in history.json()] == [-33.9]


async def test_async_list_and_not_found(app: FastAPI) -> None:
    async with client(app) as c:
        tracker = await create(c, unique("drone"), "/async/trackers")
        listed = await c.get("/async/trackers", params={"limit": 500})
        assert listed.status_code == 200
        assert tracker["id"] in [t["id"] for t in listed.json()]
        assert (await c.get("/async/trackers/0")).status_code == 404
        missing = await c.post("/async/trackers/0/locations", json={"latitude": 1, "longitude": 1})
        assert missing.status_code == 404
        assert tracker["id"] > 0


async def test_bad_input_and_unknown_trackers(app: FastAPI) -> None:
    async with client(app) as c:
        assert (await c.get("/trackers/0")).status_code == 404
        assert (await c.get("/trackers/0/locations")).status_code == 404
        point = {"latitude": 10, "longitude": 10}
        assert (await c.post("/trackers/0/locations", json=point)).status_code == 404
        tid = (await create(c, unique("kite")))["id"]
        bad = {"latitude": 91, "longitude": 0}
        assert (await c.post(f"/trackers/{tid}/locations", json=bad)).status_code == 422
        assert (await c.post("/trackers", json={"name": "", "serial": "x"})).status_code == 422


async def test_health_is_served_by_a_replica(app: FastAPI) -> None:
    async with client(app) as c:
        response = await c.get("/health/database")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "served_by": "replica"}


def utc_hour(moment: datetime) -> int:
    return moment.astimezone(UTC).hour


def run_worker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "example_app.worker", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def processed(location_id: int) -> bool:
    # The worker's write, checked at once: on the primary.
    with get_read_db_context(primary=True) as db:
        return bool(db.scalars(select(Location.processed).where(Location.id == location_id)).one())


async def test_worker_folds_new_points_into_daily_summaries(app: FastAPI) -> None:
    async with client(app) as c:
        tid = (await create(c, unique("tram")))["id"]
        for hour in (6, 9, 7):
            point = {
                "latitude": 48.1,
                "longitude": 11.5,
                "recorded_at": f"2024-06-0{hour}T0{hour}:30:00Z",
            }
            assert (await c.post(f"/trackers/{tid}/locations", json=point)).status_code == 201
        point = {"latitude": 48.2, "longitude": 11.6, "recorded_at": "2024-06-06T23:59:00+00:00"}
        assert (await c.post(f"/trackers/{tid}/locations", json=point)).status_code == 201
    with get_read_db_context(primary=True) as db:
        ids = list(db.scalars(select(Location.id).where(Location.tracker_id == tid)))
    assert len(ids) == 4

    # The worker scans a replica, which may not have the points yet if the stack is
    # lagging on purpose: run it again until they are in (another worker running at
    # the same time may also claim them; either way they get summarised once).
    for _ in range(10):
        result = run_worker("--batch-size", "2")
        assert result.returncode == 0, result.stderr
        assert re.search(
            r"^worker: \d+ batch\(es\), \d+ new point\(s\) read from a replica, \d+ claimed",
            result.stdout,
            re.MULTILINE,
        ), result.stdout
        if all(processed(i) for i in ids):
            break
        await asyncio.sleep(0.5)
    else:
        pytest.fail(f"the worker never processed the points:\n{result.stdout}")

    with get_read_db_context(primary=True) as db:
        rows = db.scalars(
            select(DailySummary)
            .where(DailySummary.tracker_id == tid)
            .order_by(col(DailySummary.day))
        ).all()
        summary = [
            (str(r.day), r.locations, utc_hour(r.first_seen), utc_hour(r.last_seen)) for r in rows
        ]
    assert summary == [
        ("2024-06-06", 2, 6, 23),
        ("2024-06-07", 1, 7, 7),
        ("2024-06-09", 1, 9, 9),
    ]

    # A second run finds nothing new for this tracker and does not count it twice.
    assert run_worker().returncode == 0
    with get_read_db_context(primary=True) as db:
        total = sum(
            db.scalars(select(DailySummary.locations).where(DailySummary.tracker_id == tid))
        )
    assert total == 4


def test_worker_rejects_bad_arguments() -> None:
    result = run_worker("--batch-size", "0")
    assert result.returncode == 2
    assert "--batch-size must be at least 1" in result.stderr


async def test_a_commit_whose_position_cannot_be_read_still_succeeds(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the installed asyncpg cannot read the position in the COMMIT's message
    (engine/asyncpg_connection.py's probe said no), the LSN is read after COMMIT,
    and the connection can die in between (a switchover): the write stands, so the
    answer is a 201 and the client is pinned to the primary. (In one message, as
    psycopg's always and asyncpg's normally are, a lost connection is a failed
    commit as far as the client knows.)"""

    def connection_lost(conn: object) -> int:
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(asyncpg_connection, "_commit_with_copy", False)
    monkeypatch.setattr(tracking, "current_lsn", connection_lost)
    async with client(app) as c:
        for path in ("/async/trackers",):
            created = await create(c, unique("ferry"), path)
            assert c.cookies["rwdb_pin"].split(".")[1] == f"{tracking.UNKNOWN_LSN:x}"
            assert (await c.get(f"{path}/{created['id']}")).status_code == 200


async def test_the_summary_job_started_by_a_write_sees_that_write_on_lagging_replicas(
    app: FastAPI,
) -> None:
    """add_location hands its token to the fold job (BackgroundTasks): the job's scan,
    on replicas a second behind, must wait for the very point, or use the primary."""
    with replicas_lagging():
        async with client(app) as c:
            tid = (await create(c, unique("ferry")))["id"]
            ids = []
            for hour in (10, 11, 12):
                point = {
                    "latitude": 1.0,
                    "longitude": 2.0,
                    "recorded_at": f"2024-07-01T{hour}:00:00Z",
                }
                added = await c.post(f"/trackers/{tid}/locations", json=point)
                assert added.status_code == 201
                ids.append(added.json()["latest_locations"][0]["id"])
        # ASGITransport returns once the background job has run, too.
        assert [processed(i) for i in ids] == [True, True, True]
