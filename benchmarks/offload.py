"""Read-your-writes under replica delay (issue 3): stale reads and replica offload per mode.

The replicas apply WAL 200 ms late (``stack.sh lag 200ms``, undone afterwards
whatever happens). Simulated clients, each with its own cookie jar, run the
same seeded script against one app per pinning mode, for the same time:

* 10 % writes (a new row of the client's own);
* right after a write, half the time, a read of that very row;
* other reads: one of the client's older rows, or the list of its latest rows;
* 50-300 ms of think time between requests.

A read of one of the client's own rows that finds nothing, or a list that
lacks the client's latest row, is a stale read: the client does not see its own
write. ``X-RWDB-Read`` (``routing_header=True``) tells who served each read.
Half the clients use the sync routes, half the async ones.

A second run holds the replicas at *different* positions, the topology where a
token cleared by the first replica that has the write breaks read-your-writes:
one replica's WAL replay is paused (``stack.sh pause-replay``, resumed
afterwards whatever happens), the other is current, and the same script runs
again per mode (and with ``RWDB_CONSISTENCY=session``).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import insert, select

import fastapi_rwdb
from fastapi_rwdb import (
    AsyncReadSession,
    AsyncWriteSession,
    Database,
    ReadSession,
    RWDBSettings,
    WriteSession,
)

from .common import SECRET_KEY, items, prepare_table, replica_delay, replica_lag, replica_paused

DELAY = "200ms"
MODES = [
    ("lsn", "LSN tokens", {"pin_mode": "lsn"}),
    ("window_2s", "window 2 s", {"pin_mode": "window", "pin_seconds": 2}),
    ("window_15s", "window 15 s", {"pin_mode": "window", "pin_seconds": 15}),
    ("off", "no pinning", {"pin_mode": "off"}),
]
UNEQUAL_MODES = [
    *MODES[:1],
    ("session", "LSN tokens, session consistency", {"pin_mode": "lsn", "consistency": "session"}),
    *MODES[1:],
]
WRITE_SHARE = 0.10
READ_JUST_WRITTEN = 0.5
THINK = (0.05, 0.30)
LIST_LIMIT = 20


def make_app(**overrides: Any) -> FastAPI:
    settings = RWDBSettings(secret_key=SECRET_KEY, routing_header=True, **overrides)
    app = FastAPI()
    fastapi_rwdb.setup(app, Database(settings))

    def by_id(item_id: int) -> Any:
        return select(items.c.id).where(items.c.id == item_id)

    def latest(client: str) -> Any:
        return (
            select(items.c.id)
            .where(items.c.client == client)
            .order_by(items.c.id.desc())
            .limit(LIST_LIMIT)
        )

    def new_row(client: str) -> Any:
        return insert(items).values(client=client, payload="offload").returning(items.c.id)

    @app.post("/sync/clients/{client}/items")
    def write(client: str, db: WriteSession) -> dict[str, int]:
        new_id = db.execute(new_row(client)).scalar_one()
        db.commit()
        return {"id": new_id}

    @app.get("/sync/items/{item_id}")
    def read(item_id: int, db: ReadSession) -> dict[str, bool]:
        return {"found": db.execute(by_id(item_id)).first() is not None}

    @app.get("/sync/clients/{client}/items")
    def list_(client: str, db: ReadSession) -> list[int]:
        return list(db.execute(latest(client)).scalars())

    @app.post("/async/clients/{client}/items")
    async def write_async(client: str, db: AsyncWriteSession) -> dict[str, int]:
        new_id = (await db.execute(new_row(client))).scalar_one()
        await db.commit()
        return {"id": new_id}

    @app.get("/async/items/{item_id}")
    async def read_async(item_id: int, db: AsyncReadSession) -> dict[str, bool]:
        return {"found": (await db.execute(by_id(item_id))).first() is not None}

    @app.get("/async/clients/{client}/items")
    async def list_async(client: str, db: AsyncReadSession) -> list[int]:
        return list((await db.execute(latest(client))).scalars())

    return app


async def simulate_client(
    app: FastAPI, index: int, run_id: str, seed: int, until: float, tally: Counter[str]
) -> None:
    rng = random.Random(seed * 1000 + index)
    flavour = "sync" if index % 2 == 0 else "async"
    client = f"{run_id}-{index}"
    mine: list[int] = []
    just_wrote = False
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
        await asyncio.sleep(rng.uniform(*THINK))  # clients do not start in lockstep
        while time.monotonic() < until:
            if rng.random() < WRITE_SHARE:
                response = await http.post(f"/{flavour}/clients/{client}/items")
                response.raise_for_status()
                mine.append(response.json()["id"])
                tally["writes"] += 1
                just_wrote = True
            else:
                if just_wrote and rng.random() < READ_JUST_WRITTEN:
                    kind, target = "just_written", mine[-1]
                elif mine and rng.random() < 0.5:
                    kind, target = "older", rng.choice(mine)
                else:
                    kind, target = "list", None
                if target is None:
                    response = await http.get(f"/{flavour}/clients/{client}/items")
                    response.raise_for_status()
                    stale = bool(mine) and mine[-1] not in response.json()
                else:
                    response = await http.get(f"/{flavour}/items/{target}")
                    response.raise_for_status()
                    stale = not response.json()["found"]
                served = response.headers.get("x-rwdb-read", "-")
                if "set-cookie" in response.headers:
                    tally["reads_setting_cookie"] += 1  # uncacheable by a shared cache
                tally["reads"] += 1
                tally[f"reads_{kind}"] += 1
                tally["replica" if served == "replica" else "primary"] += 1
                tally[f"served: {served}"] += 1
                if kind != "list" or mine:
                    tally["own_row_reads"] += 1
                if stale:
                    tally["stale"] += 1
                    tally[f"stale_{kind}"] += 1
                just_wrote = False
            await asyncio.sleep(rng.uniform(*THINK))


async def run_mode(
    overrides: dict[str, Any], clients: int, seconds: float, seed: int
) -> dict[str, Any]:
    app = make_app(**overrides)
    tally: Counter[str] = Counter()
    run_id = uuid.uuid4().hex[:10]
    async with app.router.lifespan_context(app):
        start = time.monotonic()
        until = start + seconds
        await asyncio.gather(
            *(simulate_client(app, i, run_id, seed, until, tally) for i in range(clients))
        )
        elapsed = time.monotonic() - start
    reads = tally["reads"] or 1
    return {
        "requests": tally["reads"] + tally["writes"],
        "seconds": elapsed,
        "replica_share": tally["replica"] / reads,
        "counts": dict(tally),
    }


async def _run(clients: int, seconds: float, seed: int) -> dict[str, Any]:
    await asyncio.to_thread(prepare_table)
    before = await asyncio.to_thread(replica_delay)
    results = {}
    with replica_lag(DELAY):
        during = await asyncio.to_thread(replica_delay)
        for key, label, overrides in MODES:
            results[key] = {"label": label, **await run_mode(overrides, clients, seconds, seed)}
    after = await asyncio.to_thread(replica_delay)
    unequal = {}
    with replica_paused() as node:
        for key, label, overrides in UNEQUAL_MODES:
            unequal[key] = {"label": label, **await run_mode(overrides, clients, seconds, seed)}
    return {
        "unequal": {"paused": node, "modes": unequal},
        "delay": DELAY,
        "replica_delay_seen": {"before": before, "during": during, "after": after},
        "clients": clients,
        "seconds_per_mode": seconds,
        "seed": seed,
        "write_share": WRITE_SHARE,
        "read_just_written": READ_JUST_WRITTEN,
        "think_ms": [THINK[0] * 1000, THINK[1] * 1000],
        "modes": results,
    }


def run(quick: bool = False, seed: int = 7) -> dict[str, Any]:
    clients, seconds = (8, 1.0) if quick else (20, 25.0)
    return asyncio.run(_run(clients, seconds, seed))
