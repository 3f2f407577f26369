"""Replay conflicts, provoked for real: a replica cancels a read whose rows WAL
replay must remove (SQLSTATE 40001, "conflict with recovery").

For the length of this module the replicas run with ``hot_standby_feedback``
off (the primary's VACUUM no longer spares rows a replica query still needs)
and ``max_standby_streaming_delay`` at 100 ms (replay waits that long for a
conflicting query, then cancels it), set through Patroni's dynamic config and
put back as they were afterwards. A read scans a table slowly on a replica;
meanwhile the primary deletes rows of it and vacuums.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from sqlalchemy import func, literal, select, text

import fastapi_rwdb
from fastapi_rwdb import AsyncReadSession, Database, ReadSession, RWDBSettings
from fastapi_rwdb.routing.lsn import parse_lsn

from ..helpers import NODE_PORTS, dsn, node_dsn, served_client

pytestmark = pytest.mark.stack

TABLE = "rwdb_conflict_rows"
ROWS = 200
SLEEP_PER_ROW = 0.01  # a scan takes ~2 s: long enough to be caught by the VACUUM
PATRONI_PORTS = (18008, 18009, 18010)
PROVOKING = {"hot_standby_feedback": "off", "max_standby_streaming_delay": "100ms"}
SCAN = (
    f"SELECT bool_and(pg_is_in_recovery()) AS in_recovery, count(*) AS n FROM {TABLE}"
    " WHERE pg_sleep(:pause) IS NOT NULL"
)
IN_RECOVERY = "SELECT pg_is_in_recovery()"


def patroni(method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """GET or PATCH Patroni's dynamic config through whichever node answers."""
    last: Exception | None = None
    for port in PATRONI_PORTS:
        try:
            response = httpx.request(
                method, f"http://127.0.0.1:{port}/config", json=body, timeout=5
            )
            response.raise_for_status()
            return response.json()  # type: ignore[no-any-return]
        except httpx.HTTPError as exc:
            last = exc
    raise AssertionError(f"no Patroni REST API answered {method} /config: {last}")


def replica_settings(names: list[str]) -> dict[int, tuple[str, ...]]:
    """What each running replica reports for ``names`` (SHOW, on the node itself)."""
    found = {}
    for port in NODE_PORTS.values():
        try:
            with psycopg.connect(node_dsn(port), connect_timeout=2, autocommit=True) as conn:
                if conn.execute("SELECT pg_is_in_recovery()").fetchone() != (True,):
                    continue
                found[port] = tuple(
                    conn.execute("SELECT current_setting(%s)", (n,)).fetchone()[0]  # type: ignore[index]
                    for n in names
                )
        except psycopg.OperationalError:
            continue
    return found


def wait_for_replicas(expected: tuple[str, ...]) -> None:
    """Patroni reloads each node on its next loop; wait until both replicas have it."""
    deadline = time.monotonic() + 60
    while True:
        seen = replica_settings(list(PROVOKING))
        if len(seen) == 2 and all(v == expected for v in seen.values()):
            return
        assert time.monotonic() < deadline, f"replicas never reported {expected}: {seen}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def conflicting_replicas() -> Iterator[None]:
    """Replicas that cancel a conflicting query after 100 ms; restored in the end."""
    with psycopg.connect(dsn(), autocommit=True, prepare_threshold=None) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id int NOT NULL)")
        conn.execute(f"TRUNCATE {TABLE}")
        conn.execute(f"INSERT INTO {TABLE} SELECT generate_series(1, {ROWS})")
    before = patroni("GET").get("postgresql", {}).get("parameters", {})
    shown_before = replica_settings(list(PROVOKING))
    assert len(shown_before) == 2, f"expected two running replicas: {shown_before}"
    restore = {name: before.get(name) for name in PROVOKING}  # None removes the key
    try:
        patroni("PATCH", {"postgresql": {"parameters": PROVOKING}})
        wait_for_replicas(tuple(PROVOKING.values()))
        yield
    finally:
        patroni("PATCH", {"postgresql": {"parameters": restore}})
        wait_for_replicas(next(iter(shown_before.values())))


def remove_rows_and_vacuum() -> int:
    """On the primary: rows a replica scan may still need disappear for good. Returns
    the primary's WAL position right after the rows were deleted."""
    with psycopg.connect(dsn(), autocommit=True, prepare_threshold=None) as conn:
        conn.execute(f"DELETE FROM {TABLE} WHERE id % 2 = 0")
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        conn.execute(f"VACUUM {TABLE}")
        conn.execute(f"INSERT INTO {TABLE} SELECT generate_series(2, {ROWS}, 2)")
    assert row is not None
    lsn = parse_lsn(row[0])
    assert lsn is not None
    return lsn


def make_app(**settings: Any) -> FastAPI:
    app = FastAPI()
    fastapi_rwdb.setup(app, Database(RWDBSettings(routing_header=True, **settings)))
    pause = {"pause": SLEEP_PER_ROW}

    @app.get("/scan")
    def scan(db: ReadSession) -> dict[str, Any]:
        found = dict(db.execute(text(SCAN), pause).mappings().one())
        db.commit()  # a new transaction: where does the session's next read go?
        return {**found, "then": db.execute(text(IN_RECOVERY)).scalar_one()}

    @app.get("/async/scan")
    async def scan_async(db: AsyncReadSession) -> dict[str, Any]:
        found = dict((await db.execute(text(SCAN), pause)).mappings().one())
        await db.commit()
        return {**found, "then": (await db.execute(text(IN_RECOVERY))).scalar_one()}

    @app.get("/scan-in-begin")
    def scan_in_begin(db: ReadSession) -> dict[str, Any]:
        with db.begin():  # the caller owns this transaction: no rollback behind its back
            return dict(db.execute(text(SCAN), pause).mappings().one())

    @app.get("/scan-second")
    def scan_second(db: ReadSession) -> dict[str, Any]:
        db.execute(text("SELECT 1")).scalar_one()  # the transaction has read something
        return dict(db.execute(text(SCAN), pause).mappings().one())

    @app.get("/async/scan-second")
    async def scan_second_async(db: AsyncReadSession) -> dict[str, Any]:
        (await db.execute(text("SELECT 1"))).scalar_one()
        return dict((await db.execute(text(SCAN), pause)).mappings().one())

    # The same, after a SELECT the session compiled: nothing the transaction set up
    # there can be lost by a new transaction on the primary.
    @app.get("/scan-after-select")
    def scan_after_select(db: ReadSession) -> dict[str, Any]:
        db.execute(select(literal(1))).scalar_one()
        found = dict(db.execute(text(SCAN), pause).mappings().one())
        return {**found, "then": db.execute(select(func.pg_is_in_recovery())).scalar_one()}

    @app.get("/async/scan-after-select")
    async def scan_after_select_async(db: AsyncReadSession) -> dict[str, Any]:
        (await db.execute(select(literal(1)))).scalar_one()
        found = dict((await db.execute(text(SCAN), pause)).mappings().one())
        then = (await db.execute(select(func.pg_is_in_recovery()))).scalar_one()
        return {**found, "then": then}

    return app


@pytest.fixture(scope="module")
async def client(conflicting_replicas: None) -> AsyncIterator[httpx.AsyncClient]:
    async with served_client(make_app(), "http://t", raise_app_exceptions=False, timeout=30) as c:
        yield c


async def while_vacuumed(client: httpx.AsyncClient, path: str) -> httpx.Response:
    """``GET path`` while the primary removes and vacuums rows the scan is reading."""
    return (await vacuumed_at(client, path))[0]


async def vacuumed_at(client: httpx.AsyncClient, path: str) -> tuple[httpx.Response, int]:
    """:func:`while_vacuumed`, and the primary's position once the rows were deleted."""
    request = asyncio.create_task(client.get(path))
    # Not before the scan runs on a replica: one that starts after the DELETE has been
    # replayed has a snapshot that never needed the vacuumed rows, and no conflict
    # comes (CI once, after a fixed 0.6 s: the async scan answered from the replica).
    for _ in range(50):
        await asyncio.sleep(0.1)
        if request.done() or await asyncio.to_thread(scan_running):
            break
    deleted_at = await asyncio.to_thread(remove_rows_and_vacuum)
    return await request, deleted_at


def scan_running() -> bool:
    """Whether a replica is running this module's scan."""
    return _on_scans("count(*) FILTER (WHERE state = 'active')") > 0


@pytest.fixture(scope="module")
async def session_client(conflicting_replicas: None) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app(consistency="session")
    async with served_client(app, "http://t", raise_app_exceptions=False, timeout=30) as c:
        yield c


@pytest.mark.parametrize("flavour", ["", "/async"])
async def test_in_session_consistency_a_read_moved_to_the_primary_counts_as_read(
    session_client: httpx.AsyncClient, flavour: str
) -> None:
    """Monotonic reads: the client has read the primary's rows (the deletion
    included), so its token must send its next reads nowhere older than that."""
    # A client new to the app: the token the other flavour's case left would send the
    # scan to the primary whenever the replicas have not replayed it yet (a flake).
    session_client.cookies.clear()
    response, deleted_at = await vacuumed_at(session_client, f"{flavour}/scan")
    assert response.status_code == 200, response.text
    assert response.headers["x-rwdb-read"] == "primary; reason=replay-conflict"
    # On the event loop the key is fetched asynchronously (the signer property would not block).
    signer = await Database(RWDBSettings()).signing_keys.load_async()
    assert signer is not None
    token = signer.load(response.headers["x-rwdb-pin"], max_age=3600)
    assert token is not None and token.lsn >= deleted_at


@pytest.mark.parametrize("flavour", ["", "/async"])
async def test_first_statement_cancelled_by_replay_is_retried_on_the_primary(
    client: httpx.AsyncClient, flavour: str
) -> None:
    response = await while_vacuumed(client, f"{flavour}/scan")
    assert response.status_code == 200, response.text
    assert response.headers["x-rwdb-read"] == "primary; reason=replay-conflict"
    assert response.json()["in_recovery"] is False  # the retry ran on the primary
    assert response.json()["then"] is False  # and the session stays there: never older data


@pytest.mark.parametrize("flavour", ["", "/async"])
async def test_later_statement_cancelled_by_replay_is_a_503_with_retry_after(
    client: httpx.AsyncClient, flavour: str
) -> None:
    """After a text statement (it could have been a SET LOCAL): not moved."""
    response = await while_vacuumed(client, f"{flavour}/scan-second")
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert "replay" in response.json()["detail"]
    assert "127.0.0.1" not in response.text and "543" not in response.text


async def test_first_statement_in_an_explicit_begin_is_a_503(client: httpx.AsyncClient) -> None:
    response = await while_vacuumed(client, "/scan-in-begin")
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"


def terminate_scans() -> int:
    """On each replica: end the backends running this module's scan."""
    return _on_scans("count(pg_terminate_backend(pid))")


def _on_scans(aggregate: str) -> int:
    """``aggregate`` over the backends running this module's scan, on each replica, as
    the superuser (who sees and may end any backend): the sum."""
    total = 0
    for port in replica_settings([]):
        superuser = node_dsn(port, user="postgres", password="postgres_pw")
        with psycopg.connect(superuser, connect_timeout=2, autocommit=True) as conn:
            row = conn.execute(
                f"SELECT {aggregate} FROM pg_stat_activity"
                " WHERE query LIKE %s AND pid <> pg_backend_pid()",
                (f"%FROM {TABLE}%",),
            ).fetchone()
        total += row[0] if row else 0
    return total


def replicas_replayed_all() -> None:
    """Wait until both replicas have replayed everything the primary has written: a
    VACUUM of an earlier test still to replay could cancel the next scan (a replay
    conflict) and move it to the primary, where no replica connection can be lost."""
    with psycopg.connect(dsn(), autocommit=True, prepare_threshold=None) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    needed = parse_lsn(row[0])
    assert needed is not None
    deadline = time.monotonic() + 30
    while True:
        replayed = []
        for port in replica_settings([]):
            with psycopg.connect(node_dsn(port), connect_timeout=2, autocommit=True) as conn:
                seen = conn.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()
            replayed.append(parse_lsn(seen[0]) if seen else None)
        if len(replayed) == 2 and all(r is not None and r >= needed for r in replayed):
            return
        assert time.monotonic() < deadline, f"replicas never replayed {row[0]}: {replayed}"
        time.sleep(0.1)


async def while_terminated(client: httpx.AsyncClient, path: str) -> httpx.Response:
    """``GET path`` while the replica connection serving it is closed under it (as
    HAProxy does to a node that leaves the read port)."""
    await asyncio.to_thread(replicas_replayed_all)
    request = asyncio.create_task(client.get(path))
    ended = 0
    for _ in range(30):  # once the scan runs (about 0.1 s on a quiet machine, ~2 s long)
        await asyncio.sleep(0.1)
        ended = await asyncio.to_thread(terminate_scans)
        if ended or request.done():
            break
    if ended != 1 and request.done():
        response = request.result()
        raise AssertionError(f"no scan to end; answered {response.headers.get('x-rwdb-read')}")
    assert ended == 1
    return await request


@pytest.mark.parametrize("flavour", ["", "/async"])
async def test_first_statement_whose_replica_connection_is_lost_runs_again_on_a_replica(
    client: httpx.AsyncClient, flavour: str
) -> None:
    response = await while_terminated(client, f"{flavour}/scan")
    assert response.status_code == 200, response.text
    assert response.headers["x-rwdb-read"] == "replica"
    assert response.json()["in_recovery"] is True


async def test_later_statement_whose_replica_connection_is_lost_is_a_503(
    client: httpx.AsyncClient,
) -> None:
    """After a text statement: not moved."""
    response = await while_terminated(client, "/scan-second")
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"


@pytest.mark.parametrize("flavour", ["", "/async"])
@pytest.mark.parametrize(
    ("fault", "reason"),
    [("vacuumed", "replay-conflict"), ("terminated", "replica-unreachable")],
)
async def test_later_statement_failed_by_its_replica_after_compiled_selects_moves(
    client: httpx.AsyncClient, flavour: str, fault: str, reason: str
) -> None:
    """After SELECTs the session compiled, a later statement the replica cancelled or
    lost runs again on the primary, as a first one does, and the session stays there."""
    during = while_vacuumed if fault == "vacuumed" else while_terminated
    response = await during(client, f"{flavour}/scan-after-select")
    assert response.status_code == 200, response.text
    assert response.headers["x-rwdb-read"] == f"primary; reason={reason}"
    assert response.json()["in_recovery"] is False
    assert response.json()["then"] is False


@pytest.mark.parametrize("flavour", ["", "/async"])
async def test_without_a_conflict_the_scan_stays_on_a_replica(
    client: httpx.AsyncClient, flavour: str
) -> None:
    """The control: the same read, nothing vacuumed, is served by a replica."""
    response = await client.get(f"{flavour}/scan")
    assert response.status_code == 200
    assert response.headers["x-rwdb-read"] == "replica"
    assert response.json()["in_recovery"] is True
    assert response.json()["then"] is True
