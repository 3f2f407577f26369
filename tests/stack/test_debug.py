"""The built-in debug routes and the Prometheus metrics, against the real stack."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from sqlalchemy import text

import fastapi_rwdb
from fastapi_rwdb import (
    AsyncWriteSession,
    ReadSession,
    RWDBSettings,
    get_read_db_context,
)
from fastapi_rwdb.observe import metrics

from ..helpers import TEST_DB, add_writes, client, node_dsn, rwdb_app, served_client

pytestmark = pytest.mark.stack

PASSWORD = os.environ["POSTGRES_PASSWORD"]
DEBUG_TOKEN = "debug-token-5f0c2a9e7d"
SPLIT, POOLS = "/debug/read-write-split", "/debug/pool-stats"
LSN = re.compile(r"^[0-9A-F]{1,8}/[0-9A-F]{1,8}$")


class Holds:
    """Lets a test keep a request's session open while it looks at the pools."""

    def __init__(self) -> None:
        self.async_held, self.async_release = asyncio.Event(), asyncio.Event()
        self.sync_held, self.sync_release = threading.Event(), threading.Event()

    def release(self) -> None:
        self.async_release.set()
        self.sync_release.set()


def make_app(holds: Holds | None = None, **overrides: Any) -> FastAPI:
    values: dict[str, Any] = {"debug_routes": True, "pool_size": 3, "max_overflow": 2}
    app = rwdb_app(**{**values, **overrides})
    holds = holds or Holds()
    add_writes(app)

    @app.get("/notes")
    def read(db: ReadSession) -> dict[str, int]:
        return {"count": db.execute(text("SELECT count(*) FROM rwdb_items")).scalar_one()}

    @app.get("/hold/async")
    async def hold_async(db: AsyncWriteSession) -> dict[str, bool]:
        await db.execute(text("SELECT 1"))  # the session now holds a connection
        holds.async_held.set()
        await asyncio.wait_for(holds.async_release.wait(), 10)
        return {"held": True}

    @app.get("/hold/sync")
    def hold_sync(db: ReadSession) -> dict[str, bool]:
        db.execute(text("SELECT 1"))
        holds.sync_held.set()
        assert holds.sync_release.wait(10)
        return {"held": True}

    return app


@pytest.fixture
async def app() -> AsyncIterator[FastAPI]:
    application = make_app()
    async with application.router.lifespan_context(application):
        yield application


def node_facts(port: int) -> tuple[bool, int]:
    """(in recovery, port) asked of one PostgreSQL node directly, bypassing HAProxy."""
    with psycopg.connect(node_dsn(port)) as conn:
        row = conn.execute("SELECT pg_is_in_recovery(), inet_server_port()").fetchone()
    assert row is not None
    return row[0], row[1]


def lsn_int(value: str) -> int:
    high, low = value.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- off by default, prefix, protection -------------------------------------------------


async def test_routes_do_not_exist_unless_enabled() -> None:
    app = make_app(debug_routes=False)
    async with served_client(app) as c:
        for path in (SPLIT, POOLS):
            assert (await c.get(path)).status_code == 404
    assert not any(r.path.startswith("/debug") for r in app.routes if hasattr(r, "path"))
    assert RWDBSettings.model_fields["debug_routes"].default is False


async def test_prefix_is_configurable() -> None:
    app = make_app(debug_prefix="/ops/db")
    async with served_client(app) as c:
        assert (await c.get("/ops/db/pool-stats")).status_code == 200
        assert (await c.get("/ops/db/read-write-split")).status_code == 200
        assert (await c.get(POOLS)).status_code == 404


async def test_token_is_required_when_set() -> None:
    app = make_app(debug_token=DEBUG_TOKEN)
    refused = [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {DEBUG_TOKEN}x"},
        {"Authorization": f"Bearer {DEBUG_TOKEN[:-1]}"},
        {"Authorization": f"Basic {DEBUG_TOKEN}"},
        {"Authorization": DEBUG_TOKEN},
        {"Authorization": "Bearer"},
        {"X-Debug-Token": DEBUG_TOKEN},
    ]
    async with served_client(app) as c:
        for path in (SPLIT, POOLS):
            bodies = set()
            for headers in refused:
                response = await c.get(path, headers=headers)
                assert response.status_code == 401, headers
                assert response.headers["www-authenticate"] == "Bearer"
                assert DEBUG_TOKEN not in response.text
                bodies.add(response.content)
            assert bodies == {b'{"detail":"unauthorized"}'}, "no hint which part was wrong"
            for scheme in ("Bearer", "bearer"):
                granted = await c.get(path, headers={"Authorization": f"{scheme} {DEBUG_TOKEN}"})
                assert granted.status_code == 200


async def test_unprotected_routes_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fastapi_rwdb")
    make_app()
    unprotected = [r for r in caplog.records if "without RWDB_DEBUG_TOKEN" in r.getMessage()]
    assert len(unprotected) == 1 and unprotected[0].levelno == logging.WARNING
    caplog.clear()
    make_app(debug_token=DEBUG_TOKEN)
    make_app(debug_routes=False)
    assert not any("RWDB_DEBUG_TOKEN" in r.getMessage() for r in caplog.records)


# -- read-write split -------------------------------------------------------------------


async def test_split_reports_primary_and_replica_for_both_pairs(app: FastAPI) -> None:
    async with client(app) as c:
        response = await c.get(SPLIT)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["status"] == "ok" and body["problems"] == []
    assert set(body) == {"status", "problems", "sync", "async", "replicas", "caller", "note"}
    primary_port = find_primary_port()
    for pair, driver in (("sync", "psycopg"), ("async", "asyncpg")):
        report = body[pair]
        assert report["driver"] == driver
        write, read = report["write"], report["read"]
        assert write == {
            "endpoint": f"127.0.0.1:5432/{TEST_DB}",
            "expected": "primary",
            "reached": "primary",
            "as_expected": True,
            "server_addr": "127.0.0.1",
            "server_port": primary_port,
            "in_recovery": False,
            "current_lsn": write["current_lsn"],
        }
        assert LSN.match(write["current_lsn"])
        assert set(read) == {
            "endpoint",
            "expected",
            "reached",
            "as_expected",
            "server_addr",
            "server_port",
            "in_recovery",
            "replay_lsn",
            "replay_lag",
        }
        assert read["endpoint"] == f"127.0.0.1:5433/{TEST_DB}"
        assert (read["expected"], read["reached"], read["as_expected"]) == (
            "replica",
            "replica",
            True,
        )
        assert read["in_recovery"] is True and read["server_addr"] == "127.0.0.1"
        assert read["server_port"] != primary_port
        # The port reported is the PostgreSQL node's own (PgBouncer is transparent).
        assert node_facts(read["server_port"]) == (True, read["server_port"])
        assert LSN.match(read["replay_lsn"])
        lag = read["replay_lag"]
        assert set(lag) == {"bytes", "seconds_since_last_replayed_transaction"}
        assert lag["bytes"] == max(0, lsn_int(write["current_lsn"]) - lsn_int(read["replay_lsn"]))
        age = lag["seconds_since_last_replayed_transaction"]
        assert age is None or age >= 0


def find_primary_port() -> int:
    in_recovery, port = node_facts(5432)  # HAProxy's write port: PgBouncer -> the primary
    assert in_recovery is False
    assert node_facts(port) == (False, port)
    return port


async def test_read_port_reaching_a_primary_is_a_problem() -> None:
    app = make_app(read_port=5432)
    async with served_client(app) as c:
        response = await c.get(SPLIT)
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "problem"
    assert len(body["problems"]) == 2
    for pair, problem in zip(("sync", "async"), body["problems"], strict=True):
        assert problem.startswith(f"{pair} (")
        assert f"the read port (127.0.0.1:5432/{TEST_DB}) reached a primary (127.0.0.1:" in problem
        assert "check HAProxy's /replica health check" in problem
        read = body[pair]["read"]
        assert (read["reached"], read["as_expected"], read["in_recovery"]) == (
            "primary",
            False,
            False,
        )
        assert "replay_lag" not in read and read["replay_lsn"] is None
        assert body[pair]["write"]["as_expected"] is True


async def test_write_port_reaching_a_replica_is_a_problem() -> None:
    app = make_app(write_port=5433)
    async with served_client(app) as c:
        body = (response := await c.get(SPLIT)).json()
    assert response.status_code == 503
    assert len(body["problems"]) == 2
    for pair, problem in zip(("sync", "async"), body["problems"], strict=True):
        assert f"the write port (127.0.0.1:5433/{TEST_DB}) reached a replica" in problem
        assert "check HAProxy's /primary health check" in problem
        assert body[pair]["write"]["reached"] == "replica"
        assert body[pair]["write"]["current_lsn"] is None
        assert body[pair]["read"]["as_expected"] is True
        assert body[pair]["read"]["replay_lag"]["bytes"] is None  # no primary to compare


async def test_unreachable_read_side_is_explained_without_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    port = closed_port()
    read_url = f"postgresql://rwdb_app:{PASSWORD}@127.0.0.1:{port}/{TEST_DB}"
    app = make_app(read_url=read_url, connect_retries=0)
    async with served_client(app) as c:
        assert (await c.post("/notes")).status_code == 200  # the write side works
        response = await c.get(SPLIT)
    assert response.status_code == 503
    body = response.json()
    endpoint = f"127.0.0.1:{port}/{TEST_DB}"
    assert [p.split(":")[0] for p in body["problems"]] == ["sync (psycopg)", "async (asyncpg)"]
    for pair, problem in zip(("sync", "async"), body["problems"], strict=True):
        assert f"cannot connect to the read side ({endpoint}): " in problem
        read = body[pair]["read"]
        assert read["reached"] is None and read["as_expected"] is False
        assert read["endpoint"] == endpoint
        assert re.match(r"^\w+(Error|Exception): \S", read["error"]), read["error"]
        assert read["error"] in problem
    assert "OperationalError" in body["sync"]["read"]["error"]
    assert body["sync"]["write"]["as_expected"] is True
    assert body["caller"]["token"] is True and body["caller"]["replica_has_lsn"] == []
    assert "this check could not reach a replica" in body["caller"]["explanation"]
    assert PASSWORD not in response.text and PASSWORD not in str(response.headers)
    assert PASSWORD not in caplog.text


async def test_wrong_password_is_reported_but_never_shown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-password-8d1e3b"
    app = make_app(password=wrong)
    async with served_client(app) as c:
        split = await c.get(SPLIT)
        pools = await c.get(POOLS)
    assert split.status_code == 503 and pools.status_code == 200
    body = split.json()
    assert len(body["problems"]) == 4
    for pair in ("sync", "async"):
        for side in ("write", "read"):
            assert "authentication failed" in body[pair][side]["error"]
    for text_ in (split.text, str(split.headers), pools.text, caplog.text):
        assert wrong not in text_ and PASSWORD not in text_


async def test_no_password_in_any_output(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    apps = [
        make_app(),
        make_app(read_port=5432),
        make_app(write_url=f"postgresql://rwdb_app:{PASSWORD}@127.0.0.1:5432/{TEST_DB}"),
    ]
    for application in apps:
        async with application.router.lifespan_context(application), client(application) as c:
            await c.post("/notes")
            for path in (SPLIT, POOLS):
                response = await c.get(path)
                seen += [response.text, str(response.headers)]
    assert len(seen) == 12 and all(seen)
    assert not [s for s in seen if PASSWORD in s]
    assert caplog.records and PASSWORD not in caplog.text


# -- the caller's pin ---------------------------------------------------------------------


async def test_caller_without_a_token(app: FastAPI) -> None:
    async with client(app) as c:
        caller = (await c.get(SPLIT)).json()["caller"]
    assert caller == {
        "pin_mode": "lsn",
        "in_request": True,
        "token": False,
        "token_lsn": None,
        "token_expires_in_seconds": None,
        "replica_has_lsn": None,
        "read_route": {"target": "replica", "reason": "default", "min_lsn": None},
        "explanation": "no valid read-your-writes token was sent: your reads go to a replica",
    }


async def test_caller_after_a_write_shows_the_token_and_keeps_it(app: FastAPI) -> None:
    async with client(app) as c:
        written = await c.post("/notes")
        token = written.headers["x-rwdb-pin"]
        token_lsn = int(token.split(".")[1], 16)
        response = await c.get(SPLIT, headers={"X-RWDB-Pin": token})
    assert response.status_code == 200
    # The check changes nothing: the client keeps its token.
    assert "set-cookie" not in response.headers and "x-rwdb-pin" not in response.headers
    body = response.json()
    caller = body["caller"]
    assert caller["token"] is True
    assert lsn_int(caller["token_lsn"]) == token_lsn
    assert 0 < caller["token_expires_in_seconds"] <= 30
    assert caller["read_route"] == {
        "target": "replica",
        "reason": "lsn-check",
        "min_lsn": caller["token_lsn"],
    }
    checks = caller["replica_has_lsn"]
    assert [c["pair"] for c in checks] == ["sync", "async"]
    for check in checks:
        read = body[check["pair"]]["read"]
        assert check["server"] == f"127.0.0.1:{read['server_port']}"
        assert check["replayed"] is (lsn_int(read["replay_lsn"]) >= token_lsn)
    assert caller["token_lsn"] in caller["explanation"]


async def test_pinned_caller_does_not_redirect_the_check() -> None:
    """In window mode a token sends every read of the client to the primary; the
    check must still look at the replicas, and say where the client's reads go."""
    app = make_app(pin_mode="window", routing_header=True)
    async with served_client(app) as c:
        await c.post("/notes")
        assert c.cookies.get("rwdb_pin")
        pinned = await c.get("/notes")
        assert pinned.headers["x-rwdb-read"] == "primary; reason=pinned"
        response = await c.get(SPLIT)
    assert response.status_code == 200
    body = response.json()
    for pair in ("sync", "async"):
        assert body[pair]["read"]["reached"] == "replica"
    caller = body["caller"]
    assert caller["pin_mode"] == "window" and caller["token"] is True
    assert caller["token_lsn"] is None and caller["replica_has_lsn"] is None
    assert caller["read_route"] == {"target": "primary", "reason": "pinned", "min_lsn": None}
    assert "primary serves your reads" in caller["explanation"]


# -- pools ------------------------------------------------------------------------------


POOL_KEYS = {
    "built",
    "endpoint",
    "size",
    "max_overflow",
    "checked_in",
    "checked_out",
    "overflow",
    "open",
    "usage",
}


async def test_pool_stats_before_use_build_nothing(app: FastAPI) -> None:
    async with client(app) as c:
        body = (await c.get(POOLS)).json()
    database = fastapi_rwdb.get_database()
    assert not database.is_built("engines") and not database.is_built("async_engines")
    expected_sizes = {"write": (3, 2), "read": (6, 4)}
    for pair in ("sync", "async"):
        for side in ("write", "read"):
            stats = body[pair][side]
            assert set(stats) == POOL_KEYS
            assert stats["built"] is False
            assert (stats["size"], stats["max_overflow"]) == expected_sizes[side]
            assert stats["checked_out"] == stats["checked_in"] == stats["open"] == 0
            # Pools not built yet are left out of the metrics as well.
            labels = {"pair": pair, "side": side}
            assert REGISTRY.get_sample_value("rwdb_pool_size", labels) is None


async def test_pool_stats_follow_sessions_held_by_requests() -> None:
    holds = Holds()
    app = make_app(holds)
    async with served_client(app) as c:
        async_request = asyncio.create_task(c.get("/hold/async"))
        sync_request = asyncio.create_task(c.get("/hold/sync"))
        try:
            await asyncio.wait_for(holds.async_held.wait(), 10)
            assert await asyncio.to_thread(holds.sync_held.wait, 10)
            during = (await c.get(POOLS)).json()
        finally:
            holds.release()
        assert (await async_request).status_code == 200
        assert (await sync_request).status_code == 200
        after = (await c.get(POOLS)).json()

    held_async, held_sync = during["async"]["write"], during["sync"]["read"]
    assert held_async["built"] and held_async["checked_out"] == 1
    assert held_async["usage"] == round(1 / (3 + 2), 3)
    assert held_sync["built"] and held_sync["checked_out"] == 1
    assert held_sync["usage"] == round(1 / (6 + 4), 3)
    assert held_async["open"] == held_async["checked_in"] + held_async["checked_out"]
    for pair, side in (("async", "write"), ("sync", "read")):
        stats = after[pair][side]
        assert stats["checked_out"] == 0 and stats["checked_in"] >= 1
        assert stats["open"] == stats["checked_in"] and stats["usage"] == 0.0
        assert stats["overflow"] == 0


# -- metrics ------------------------------------------------------------------------------


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_metrics_count_routes_tokens_and_pools(app: FastAPI) -> None:
    routed_default = ("rwdb_reads_routed_total", {"target": "replica", "reason": "default"})
    before = {
        "default": sample(routed_default[0], **routed_default[1]),
        "issued": sample("rwdb_tokens_total", event="issued"),
        "rejected": sample("rwdb_tokens_total", event="rejected"),
        "cleared": sample("rwdb_tokens_total", event="cleared"),
    }
    async with client(app) as c:
        for _ in range(3):
            assert (await c.get("/notes")).status_code == 200
        assert sample(routed_default[0], **routed_default[1]) == before["default"] + 3

        await c.get("/notes", headers={"X-RWDB-Pin": "1.ff.99.forged"})
        assert sample("rwdb_tokens_total", event="rejected") == before["rejected"] + 1
        # A rejected token counts as none: a plain replica read.
        assert sample(routed_default[0], **routed_default[1]) == before["default"] + 4

        await c.post("/notes")
        assert sample("rwdb_tokens_total", event="issued") == before["issued"] + 1
        # Replicas on localhost replay within milliseconds; read until one has it.
        for _ in range(50):
            read = await c.get("/notes")
            if read.headers.get("x-rwdb-pin") == "":
                break
            await asyncio.sleep(0.1)
        assert sample("rwdb_tokens_total", event="cleared") == before["cleared"] + 1
        assert sample("rwdb_reads_routed_total", target="replica", reason="caught-up") >= 1

    with get_read_db_context() as db:  # outside a request: no request state at all
        db.execute(text("SELECT 1"))
    assert sample(routed_default[0], **routed_default[1]) == before["default"] + 5

    # A sync session builds the psycopg engines only: their three pools are reported,
    # the asyncpg ones once an async session has been asked for.
    db = fastapi_rwdb.get_database()
    assert not db.is_built("async_engines")
    assert REGISTRY.get_sample_value("rwdb_pool_size", {"pair": "async", "side": "write"}) is None
    async with db.async_read_session() as session:
        await session.execute(text("SELECT 1"))
    for pair in ("sync", "async"):
        for side, size in (("write", 3), ("read", 6), ("primary_read", 3)):
            labels = {"pair": pair, "side": side}
            assert REGISTRY.get_sample_value("rwdb_pool_size", labels) == size
            assert REGISTRY.get_sample_value("rwdb_pool_checked_out", labels) == 0
            assert REGISTRY.get_sample_value("rwdb_pool_overflow", labels) == 0


async def test_metrics_are_a_no_op_when_disabled(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "ENABLED", False)
    name, labels = "rwdb_reads_routed_total", {"target": "replica", "reason": "default"}
    before = (sample(name, **labels), sample("rwdb_tokens_total", event="issued"))
    async with client(app) as c:
        await c.get("/notes")
        await c.post("/notes")
    assert (sample(name, **labels), sample("rwdb_tokens_total", event="issued")) == before


async def test_split_report_and_metrics_list_every_replica_the_primary_streams_to(
    app: FastAPI,
) -> None:
    async with client(app) as c:
        body = (await c.get(SPLIT)).json()
    replicas = body["replicas"]["list"]
    assert len(replicas) == 2, body["replicas"]
    for replica in replicas:
        assert replica["state"] == "streaming"
        assert replica["lag_bytes"] is not None and replica["lag_bytes"] >= 0
        assert replica["lag_seconds"] is not None
    # The gauges come from the app's own background view (it starts on first use).
    names = [replica["name"] for replica in replicas]
    for _ in range(50):
        values = [
            REGISTRY.get_sample_value(gauge, {"replica": name})
            for gauge in ("rwdb_replica_lag_bytes", "rwdb_replica_lag_seconds")
            for name in names
        ]
        if None not in values:
            break
        await asyncio.sleep(0.1)
    assert None not in values
