"""Grey faults, measured: fastapi_rwdb next to the hand-written pattern, in the same run.

Both apps serve the same routes, each from its own uvicorn process, with README's
documented settings (the hand-written one with the same pools, as
:class:`benchmarks.apps.Baseline` writes them). Clients loop on each app's sync
and async routes; a fault (a frozen PgBouncer, a stalled PostgreSQL, a slow
path) is held for a while; what a client saw is counted by when its request
*started*: before the fault, while it lasts, and after.

The reliability suite (tests/stack/test_grey_reliability.py) runs the scenarios,
asserts the package's targets and writes ``benchmarks/out/grey.json``; ``python
-m benchmarks.grey`` prints that file as the table of docs/reliability.md.
"""

import asyncio
import contextlib
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
from fastapi import FastAPI
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from .apps import Baseline, rwdb_app
from .common import ROOT, dsn, env, items, load, prepare_table, wait_replicas_have

APPS = ("fastapi_rwdb", "hand-written")
READS = ("/sync/items/{id}", "/async/items/{id}")
WRITES = ("/sync/keyed/{key}", "/async/keyed/{key}")
SEED_ROWS = 200


# ------------------------------------------------------------------ the two apps


def _keyed_routes(app: FastAPI, write: Any, async_write: Any) -> FastAPI:
    """A write whose row says which request made it: a write run twice shows."""

    @app.post("/sync/keyed/{key}")
    def sync_keyed(key: str, db: write) -> dict[str, Any]:  # type: ignore[valid-type]
        new_id = db.execute(
            insert(items).values(client="grey", payload=key).returning(items.c.id)
        ).scalar_one()
        db.commit()
        return {"id": new_id}

    @app.post("/async/keyed/{key}")
    async def async_keyed(key: str, db: async_write) -> dict[str, Any]:  # type: ignore[valid-type]
        result = await db.execute(
            insert(items).values(client="grey", payload=key).returning(items.c.id)
        )
        await db.commit()
        return {"id": result.scalar_one()}

    return app


def _ports() -> tuple[int, int]:
    return int(env("POSTGRES_PORT")), int(env("POSTGRES_READ_PORT"))


def package_app() -> FastAPI:
    """uvicorn factory: fastapi_rwdb with its documented defaults (the routing header on,
    to count reads moved to the primary)."""
    import fastapi_rwdb

    app, _ = rwdb_app(*_ports(), routing_header=True)
    return _keyed_routes(app, fastapi_rwdb.WriteSession, fastapi_rwdb.AsyncWriteSession)


def handwritten_app() -> FastAPI:
    """uvicorn factory: the hand-written pattern, pools as fastapi_rwdb's defaults."""
    from typing import Annotated

    from fastapi import Depends

    baseline = Baseline(*_ports())
    app = baseline.app()

    def get_write_db() -> Iterator[Session]:
        with baseline.WriteSessionLocal() as session:
            yield session

    async def get_async_write_db() -> Any:
        async with baseline.AsyncWriteSessionLocal() as session:
            yield session

    return _keyed_routes(
        app,
        Annotated[Session, Depends(get_write_db)],
        Annotated[AsyncSession, Depends(get_async_write_db)],
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served(factory: str, probe: str) -> Iterator[str]:
    """``benchmarks.grey:<factory>`` served by uvicorn in its own process; its base URL."""
    port = _free_port()
    server = subprocess.Popen(  # noqa: S603 - fixed arguments
        [sys.executable, "-m", "uvicorn", "--factory", f"benchmarks.grey:{factory}",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--no-access-log"],
        cwd=ROOT,
        env=os.environ.copy(),
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + probe, timeout=5).status_code == 200:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{factory} did not start (exit code {server.poll()})")
            time.sleep(0.2)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# ------------------------------------------------------------------ load and counting


@dataclass(slots=True)
class Call:
    start: float
    end: float
    status: int  # 0: no answer (a client-side error)
    primary: bool = False  # a read the package moved to the primary
    key: str = ""  # a write's key
    error: str = ""  # status 0: what the client met instead of an answer
    read: str = ""  # the package's X-RWDB-Read: where the read went, and why


@dataclass
class Run:
    calls: dict[tuple[str, str], list[Call]] = field(default_factory=dict)
    fault: tuple[float, float] = (0.0, 0.0)
    before: tuple[float, float] = (0.0, 0.0)


async def _client(
    base: str, route: str, log: list[Call], stop: asyncio.Event, ids: list[int]
) -> None:
    """One user: its own keep-alive connection, as a browser or a service instance has.

    Not one ``httpx.AsyncClient`` shared by every user: its pool looks at each of its
    connections for every request it sends, so with a crowd of users the load
    generator, not the apps, set the pace (docs/reliability.md, "Grey faults, measured")."""
    async with httpx.AsyncClient(timeout=120) as http:
        await _loop(http, base, route, log, stop, ids)


async def _loop(
    http: httpx.AsyncClient, base: str, route: str, log: list[Call], stop: asyncio.Event,
    ids: list[int],
) -> None:  # fmt: skip
    is_write = "{key}" in route
    while not stop.is_set():
        key = uuid.uuid4().hex if is_write else ""
        path = route.format(key=key, id=random.choice(ids))
        start = time.monotonic()
        try:
            r = await (http.post(base + path) if is_write else http.get(base + path))
            status, read = r.status_code, r.headers.get("x-rwdb-read", "")
        except httpx.HTTPError as exc:
            status, read, error = 0, "", f"{type(exc).__name__}: {exc}"[:200]
        else:
            error = ""
        primary = read.startswith("primary")
        log.append(Call(start, time.monotonic(), status, primary, key, error, read))
        await asyncio.sleep(0.005)


async def _load(
    bases: dict[str, str], routes: tuple[str, ...], clients: int, fault: Callable[[], Any],
    *, warm: float, before: float, hold: float, after: float, ids: list[int],
) -> Run:  # fmt: skip
    run = Run()
    stop = asyncio.Event()
    tasks = []
    for app, base in bases.items():
        for route in routes:
            log = run.calls.setdefault((app, route), [])
            tasks += [
                asyncio.create_task(_client(base, route, log, stop, ids)) for _ in range(clients)
            ]
    await asyncio.sleep(warm)  # pools filled, the connect storm over
    t0 = time.monotonic()
    await asyncio.sleep(before)
    cm: AbstractContextManager[Any] = fault()
    await asyncio.to_thread(cm.__enter__)
    t1 = time.monotonic()
    try:
        await asyncio.sleep(hold)
    finally:
        t2 = time.monotonic()
        await asyncio.to_thread(cm.__exit__, None, None, None)
    await asyncio.sleep(after)
    stop.set()
    await asyncio.gather(*tasks)
    run.before, run.fault = (t0, t1), (t1, t2)
    return run


def summarise(run: Run) -> dict[str, dict[str, Any]]:
    """Per app and route: what started while the fault lasted, against before it."""
    out: dict[str, dict[str, Any]] = {}
    for (app, route), calls in run.calls.items():
        during = [c for c in calls if run.fault[0] <= c.start < run.fault[1]]
        before = [c for c in calls if run.before[0] <= c.start < run.before[1]]
        ok_rate = sum(c.status == 200 for c in during) / (run.fault[1] - run.fault[0])
        before_rate = sum(c.status == 200 for c in before) / (run.before[1] - run.before[0])
        failed = [c for c in during if c.status != 200]
        out.setdefault(app, {})[route] = {
            "started": len(during),
            "failed": len(failed),
            "statuses": sorted({c.status for c in failed}),
            "client_errors": sorted({c.error for c in failed if c.error}),
            "moved_to_primary": sum(c.primary for c in during),
            "longest_s": round(max((c.end - c.start for c in during), default=0.0), 3),
            # Where the slowest read went (X-RWDB-Read): a "primary; reason=..." read had
            # met the fault first.
            "longest_read": max(during, key=lambda c: c.end - c.start).read if during else "",
            "throughput_vs_before": round(ok_rate / before_rate, 3) if before_rate else None,
            "acknowledged": [c.key for c in calls if c.key and c.status == 200],
        }
    return out


def run_scenario(
    fault: Callable[[], Any], *, writes: bool = False, clients: int = 6, hold: float = 18.0,
    before: float = 5.0, after: float = 3.0, warm: float = 2.0, routes: tuple[str, ...] = (),
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Both apps served, ``clients`` per app and route, ``fault()`` held ``hold`` s."""
    ids = prepare_table(SEED_ROWS)  # the table too, which a write scenario run alone needs
    wait_replicas_have(ids)  # the probe reads one, on a replica
    routes = routes or (WRITES if writes else READS)
    probe = READS[0].format(id=ids[0])
    with served("package_app", probe) as ours, served("handwritten_app", probe) as theirs:
        run = asyncio.run(
            _load({APPS[0]: ours, APPS[1]: theirs}, routes, clients, fault,
                  warm=warm, before=before, hold=hold, after=after, ids=ids)
        )  # fmt: skip
    return summarise(run)


def written_twice_or_lost(acknowledged: list[str]) -> tuple[list[str], list[str]]:
    """Of writes keyed by request: those found more than once, those acknowledged and
    not found (asked of the primary)."""
    with psycopg.connect(dsn(), prepare_threshold=None) as conn:
        twice = [r[0] for r in conn.execute(
            f"SELECT payload FROM {items.name} WHERE client = 'grey'"
            " GROUP BY payload HAVING count(*) > 1"
        )]  # fmt: skip
        found = {r[0] for r in conn.execute(
            f"SELECT payload FROM {items.name} WHERE payload = ANY(%s)",
            (acknowledged,),
        )}  # fmt: skip
    return twice, sorted(set(acknowledged) - found)


# ------------------------------------------------------------------ the table


def table(results: dict[str, Any]) -> str:
    """docs/reliability.md's table from ``benchmarks/out/grey.json``."""
    rows = [
        "| scenario | route | app | started while faulty | failed | moved to primary "
        "| longest (s) | throughput vs before |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario, per_app in results.get("scenarios", {}).items():
        for app in APPS:
            for route, r in per_app.get(app, {}).items():
                ratio = r["throughput_vs_before"]
                kind = f"{route.split('/')[1]} {'write' if '{key}' in route else 'read'}"
                rows.append(
                    f"| {scenario} | `{kind}`"
                    f" | {app} | {r['started']} | {r['failed']} | {r['moved_to_primary']}"
                    f" | {r['longest_s']:.2f} | {'-' if ratio is None else f'{ratio:.2f}'} |"
                )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(load("grey") or {}))
