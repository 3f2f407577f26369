"""What fastapi_rwdb costs over the hand-written two-engine pattern (issue 7).

Both apps (see :mod:`benchmarks.apps`) live in one process and are driven in
process (:func:`common.call`: no sockets, no HTTP parser, no client library,
so nothing but the apps differs). Each round runs every route on both apps, back
to back, for a fixed time with a fixed number of requests in flight, and the
order of the two apps flips every round. A round's ratio compares the two
halves of that round, so slow drift of a shared, noisy machine cancels out.

Before the timing, a counting proxy (:mod:`benchmarks.wire`) sits in front of
HAProxy and counts the round trips and the statements each route costs on the
wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import time
from collections import Counter
from typing import Any

from sqlalchemy import event
from sqlalchemy.pool import Pool

from fastapi_rwdb import Database

from .apps import Baseline, rwdb_app
from .common import call, env, percentile, prepare_table, spread, wait_replicas_have
from .wire import WireCounter, round_trips

#: Requests in flight of the load part. 4 stays below the write pool's 5 core
#: connections; 8 needs overflow connections; 32 is about what a worker's 40 sync
#: threads hold under load, more than the write pool's 15 connections.
CONCURRENCY = (4, 8, 32)
#: The apps of the load part: the baseline, fastapi_rwdb, and a second, independent
#: baseline (own engines and pools) whose ratio to the first is the harness's noise floor.
LOAD_APPS = ("baseline", "rwdb", "control")

# (key, label, method, path template, sends the token)
ROUTES = [
    ("sync_read", "sync read", "GET", "/sync/items/{id}", False),
    ("async_read", "async read", "GET", "/async/items/{id}", False),
    ("sync_write", "sync write", "POST", "/sync/items", False),
    ("async_write", "async write", "POST", "/async/items", False),
    ("sync_read_token", "sync read + token", "GET", "/sync/items/{id}", True),
    ("async_read_token", "async read + token", "GET", "/async/items/{id}", True),
]
COUNT_ONLY = [("sync_write_text", "sync write, text SQL", "POST", "/sync/items-text", False)]


class Requests:
    """Endless request arguments for one route: the read ids cycle through the seed rows."""

    def __init__(self, route: tuple[Any, ...], ids: list[int], token: str) -> None:
        _, _, self.method, self.template, with_token = route
        self.headers = [(b"x-rwdb-pin", token.encode())] if with_token else []
        self._ids = itertools.cycle(ids)
        self._has_id = "{id}" in self.template

    def next(self) -> tuple[str, str, list[tuple[bytes, bytes]]]:
        path = self.template.format(id=next(self._ids)) if self._has_id else self.template
        return self.method, path, self.headers


async def burst(app: Any, requests: Requests, duration: float, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    cleared = 0  # responses that cleared the token: a replica had the client's write
    errors = 0
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal cleared, errors
        while time.perf_counter() < deadline:
            method, path, headers = requests.next()
            t0 = time.perf_counter()
            response = await call(app, method, path, headers)
            latencies.append(time.perf_counter() - t0)
            if response.status != 200:
                errors += 1
            if response.header(b"x-rwdb-pin") == b"":
                cleared += 1

    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {
        "n": len(latencies),
        "rps": len(latencies) / elapsed,
        "cpu_us": cpu / max(1, len(latencies)) * 1e6,
        "latencies": latencies,
        "cleared": cleared,
        "errors": errors,
    }


async def fresh_token(app: Any) -> str:
    """A real token, from a real write, once the replicas have that write."""
    response = await call(app, "POST", "/sync/items")
    assert response.status == 200, response.body
    token = (response.header(b"x-rwdb-pin") or b"").decode()
    assert token, "a write must hand out a token"
    new_id = int(response.body.decode().split(":")[1].rstrip("}"))
    await asyncio.to_thread(wait_replicas_have, [new_id])
    return token


# ------------------------------------------------------------------ round trips


async def count_round_trips(ids: list[int], per_route: int) -> dict[str, Any]:
    upstream = {
        "write": (env("POSTGRES_SERVER"), int(env("POSTGRES_PORT"))),
        "read": (env("POSTGRES_SERVER"), int(env("POSTGRES_READ_PORT"))),
    }
    results: dict[str, dict[str, Any]] = {}
    with WireCounter(upstream) as wire:
        w, r = wire.ports["write"], wire.ports["read"]
        baseline = Baseline(w, r)
        base_app = baseline.app()
        # The replica view's look at pg_stat_replication (once a second by default)
        # goes through the write port too: it would be counted against whatever
        # route is being measured. Once an hour, it stays out of the count.
        rw_app, _ = rwdb_app(w, r, routing_header=True, lag_check_interval=3600)
        async with (
            base_app.router.lifespan_context(base_app),
            rw_app.router.lifespan_context(rw_app),
        ):
            token = await fresh_token(rw_app)
            for route in ROUTES + COUNT_ONLY:
                key = route[0]
                results[key] = {"label": route[1]}
                for variant, app in (("baseline", base_app), ("rwdb", rw_app)):
                    requests = Requests(route, ids, token)
                    for _ in range(5):  # fill the pools
                        await call(app, *requests.next())
                    wire.reset()
                    read_headers: Counter[str] = Counter()
                    for _ in range(per_route):
                        response = await call(app, *requests.next())
                        assert response.status == 200, response.body
                        read_headers[(response.header(b"x-rwdb-read") or b"-").decode()] += 1
                    await asyncio.sleep(0.05)  # let the proxy count the last bytes
                    counts = wire.counts()
                    results[key][variant] = {
                        "round_trips": round_trips(counts) / per_route,
                        "queries": counts["Q"] / per_route,
                        "syncs": counts["S"] / per_route,
                        "flushes": counts["H"] / per_route,
                        "connects": counts["startup"] / per_route,
                        "statements": counts["statement"] / per_route,
                        "routed": dict(read_headers),
                    }
    return {"requests_per_route": per_route, "routes": results}


# ---------------------------------------------------------------------- timing


class ConnectCounter:
    """Counts the connections each app's pools open (TCP, then SCRAM through HAProxy
    and PgBouncer): pool churn, which a warm pool should not have."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def watch(self, name: str, pools: list[Pool]) -> None:
        def connected(dbapi_connection: Any, record: Any) -> None:
            self.counts[name] += 1

        for pool in pools:
            event.listen(pool, "connect", connected)


def baseline_pools(baseline: Baseline) -> list[Pool]:
    return [
        baseline.write_engine.pool,
        baseline.read_engine.pool,
        baseline.async_write_engine.sync_engine.pool,
        baseline.async_read_engine.sync_engine.pool,
    ]


def rwdb_pools(database: Database) -> list[Pool]:
    """Every pool a request may use (not the replica view's own connection)."""
    return [
        database.engines.write.pool,
        database.engines.read.pool,
        database.async_engines.write.sync_engine.pool,
        database.async_engines.read.sync_engine.pool,
        database.primary_read_engine.pool,
        database.async_primary_read_engine.sync_engine.pool,
    ]


async def time_routes(
    ids: list[int], rounds: int, duration: float, concurrency: int
) -> dict[str, Any]:
    w, r = int(env("POSTGRES_PORT")), int(env("POSTGRES_READ_PORT"))
    baselines = {"baseline": Baseline(w, r), "control": Baseline(w, r)}
    apps = {name: b.app() for name, b in baselines.items()}
    apps["rwdb"], database = rwdb_app(w, r)
    connects = ConnectCounter()
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        route[0]: {name: [] for name in LOAD_APPS} for route in ROUTES
    }
    async with contextlib.AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app.router.lifespan_context(app))
        for name, b in baselines.items():
            connects.watch(name, baseline_pools(b))
        connects.watch("rwdb", rwdb_pools(database))
        token = await fresh_token(apps["rwdb"])
        for route in ROUTES:  # warm-up: pools filled, code paths compiled
            for name in LOAD_APPS:
                await burst(
                    apps[name], Requests(route, ids, token), min(duration, 0.5), concurrency
                )
        for n in range(rounds):
            for i, route in enumerate(ROUTES):
                # Who goes first rotates, so no app always follows the same one.
                k = (n + i) % len(LOAD_APPS)
                for name in LOAD_APPS[k:] + LOAD_APPS[:k]:
                    gc.collect()
                    before = connects.counts[name]
                    result = await burst(
                        apps[name], Requests(route, ids, token), duration, concurrency
                    )
                    result["connects"] = connects.counts[name] - before
                    samples[route[0]][name].append(result)
    return _summarise(samples, rounds, duration, concurrency)


def _summarise(
    samples: dict[str, dict[str, list[dict[str, Any]]]],
    rounds: int,
    duration: float,
    concurrency: int,
) -> dict[str, Any]:
    routes = {}
    for key, label, *_ in ROUTES:
        base = samples[key]["baseline"]

        def ratios(
            runs: list[dict[str, Any]], field: str, base: list[dict[str, Any]] = base
        ) -> Any:
            return spread([a[field] / b[field] for a, b in zip(runs, base, strict=True)])

        pooled = {
            name: [x for s in runs for x in s["latencies"]] for name, runs in samples[key].items()
        }
        figures = {}
        for name, runs in samples[key].items():
            lat = pooled[name]
            requests = sum(s["n"] for s in runs)
            figures[name] = {
                "rps": spread([s["rps"] for s in runs]),
                "cpu_us": spread([s["cpu_us"] for s in runs]),
                "p50_ms": percentile(lat, 50) * 1e3,
                "p99_ms": percentile(lat, 99) * 1e3,
                "requests": requests,
                "errors": sum(s["errors"] for s in runs),
                "cleared": sum(s["cleared"] for s in runs),
                "connects_per_1000": sum(s["connects"] for s in runs) / max(1, requests) * 1000,
            }
        rw, control = samples[key]["rwdb"], samples[key]["control"]
        routes[key] = {
            "label": label,
            **figures,
            "throughput_ratio": ratios(rw, "rps"),
            "control_ratio": ratios(control, "rps"),
            "cpu_ratio": ratios(rw, "cpu_us"),
            "p50_ratio": figures["rwdb"]["p50_ms"] / figures["baseline"]["p50_ms"],
            "p99_ratio": figures["rwdb"]["p99_ms"] / figures["baseline"]["p99_ms"],
        }
    return {
        "rounds": rounds,
        "seconds_per_burst": duration,
        "concurrency": concurrency,
        "routes": routes,
    }


# ------------------------------------------------- one client, requests interleaved


async def interleaved_routes(ids: list[int], seconds: float, block: int) -> dict[str, Any]:
    """One request at a time, three apps taking turns request by request: the
    baseline, fastapi_rwdb, and ``control``, a second baseline with its own engines
    and pools, whose ratio to the baseline is this harness's noise floor (A/A test).
    """
    w, r = int(env("POSTGRES_PORT")), int(env("POSTGRES_READ_PORT"))
    baselines = [Baseline(w, r), Baseline(w, r)]
    apps = {"baseline": baselines[0].app(), "rwdb": rwdb_app(w, r)[0]}
    apps["control"] = baselines[1].app()
    routes = await _interleave(apps, ROUTES, ids, seconds, block)
    for r in routes.values():
        ratios = r.pop("ratios")
        r.update(
            throughput_ratio=ratios["rwdb"]["throughput"],
            cpu_ratio=ratios["rwdb"]["cpu"],
            p50_ratio=ratios["rwdb"]["p50"],
            p99_ratio=ratios["rwdb"]["p99"],
            control_ratio=ratios["control"]["throughput"],
            control_p50_ratio=ratios["control"]["p50"],
            cleared=r["cleared"].get("rwdb", 0),
        )
    return {"seconds_per_route": seconds, "block": block, "routes": routes}


#: What a write costs in each pinning mode: the package without read-your-writes
#: (off), tokens without the WAL position (window), and the default (lsn).
PIN_MODES = ("off", "window", "lsn")


async def write_cost_by_mode(ids: list[int], seconds: float, block: int) -> dict[str, Any]:
    """The write routes, interleaved as above, on fastapi_rwdb in each pinning mode."""
    w, r = int(env("POSTGRES_PORT")), int(env("POSTGRES_READ_PORT"))
    apps = {"baseline": Baseline(w, r).app()}
    for mode in PIN_MODES:
        apps[mode] = rwdb_app(w, r, pin_mode=mode)[0]
    apps["control"] = Baseline(w, r).app()
    writes = [route for route in ROUTES if route[0] in ("sync_write", "async_write")]
    routes = await _interleave(apps, writes, ids, seconds, block)
    return {"seconds_per_route": seconds, "block": block, "modes": PIN_MODES, "routes": routes}


async def _interleave(
    apps: dict[str, Any],
    routes: list[tuple[Any, ...]],
    ids: list[int],
    seconds: float,
    block: int,
) -> dict[str, Any]:
    """Run ``routes`` on ``apps`` (the first is the baseline), one request at a time,
    taking turns request by request.

    Neighbouring requests of the apps are milliseconds apart, so whatever else
    the machine does hits them all alike. With one request in flight the process
    does nothing else meanwhile, so the process CPU time spent in a request is
    that request's own. Ratios to the baseline are taken per block of ``block``
    turns; the figures are medians over blocks.
    """
    names = list(apps)
    base_name, others = names[0], names[1:]
    results: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app.router.lifespan_context(app))
        token = await fresh_token(apps["rwdb" if "rwdb" in apps else "lsn"])
        for route in routes:
            requests = {name: Requests(route, ids, token) for name in names}
            for name in names:  # warm-up
                for _ in range(20):
                    await call(apps[name], *requests[name].next())
            wall: dict[str, list[float]] = {name: [] for name in names}
            cpu: dict[str, list[float]] = {name: [] for name in names}
            tput: dict[str, list[float]] = {name: [] for name in others}
            cpu_blocks: dict[str, list[float]] = {name: [] for name in others}
            cleared: Counter[str] = Counter()
            errors = turns = 0
            gc.collect()
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline or turns % block:
                k = turns % len(names)  # rotate who goes first
                for name in names[k:] + names[:k]:
                    args = requests[name].next()
                    t0, c0 = time.perf_counter(), time.process_time()
                    response = await call(apps[name], *args)
                    cpu[name].append(time.process_time() - c0)
                    wall[name].append(time.perf_counter() - t0)
                    errors += response.status != 200
                    if response.header(b"x-rwdb-pin") == b"":
                        cleared[name] += 1
                turns += 1
                if turns % block == 0:
                    base_wall = sum(wall[base_name][-block:])
                    base_cpu = sum(cpu[base_name][-block:])
                    for name in others:
                        tput[name].append(base_wall / sum(wall[name][-block:]))
                        cpu_blocks[name].append(sum(cpu[name][-block:]) / base_cpu)
            figures = {
                name: {
                    "rps": len(wall[name]) / sum(wall[name]),
                    "p50_ms": percentile(wall[name], 50) * 1e3,
                    "p99_ms": percentile(wall[name], 99) * 1e3,
                    "cpu_us": sum(cpu[name]) / len(cpu[name]) * 1e6,
                    "requests": len(wall[name]),
                }
                for name in names
            }
            base_fig = figures[base_name]
            results[route[0]] = {
                "label": route[1],
                **figures,
                "ratios": {
                    name: {
                        "throughput": spread(tput[name]),
                        "cpu": spread(cpu_blocks[name]),
                        "p50": figures[name]["p50_ms"] / base_fig["p50_ms"],
                        "p99": figures[name]["p99_ms"] / base_fig["p99_ms"],
                    }
                    for name in others
                },
                "cleared": dict(cleared),
                "errors": errors,
            }
    return results


def raw_commit_cost(rounds: int, per_round: int = 40) -> dict[str, Any]:
    """What the LSN statement costs the server, with psycopg alone (no SQLAlchemy, no
    package code): an INSERT and its COMMIT, against the same with the WAL position
    read in the COMMIT's message, alternating, through HAProxy and PgBouncer."""
    import psycopg

    from .common import TABLE, dsn

    insert = f"INSERT INTO {TABLE} (client, payload) VALUES ('raw', 'x') RETURNING id"
    with psycopg.connect(dsn(), prepare_threshold=None) as conn:

        def plain() -> None:
            conn.execute(insert).fetchone()
            conn.commit()

        def with_lsn() -> None:
            conn.execute(insert).fetchone()
            cursor = conn.cursor()
            cursor.execute("COMMIT; SELECT pg_current_wal_lsn()::text")
            cursor.nextset()
            cursor.fetchone()
            cursor.close()
            conn.commit()  # nothing left to commit: sends nothing

        times: dict[str, list[float]] = {"commit": [], "commit_lsn": []}
        for n in range(rounds):
            order = [("commit", plain), ("commit_lsn", with_lsn)]
            for name, step in order if n % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                for _ in range(per_round):
                    step()
                times[name].append((time.perf_counter() - t0) / per_round * 1e3)
    return {name: spread(values) for name, values in times.items()}


async def _run(quick: bool) -> dict[str, Any]:
    ids = await asyncio.to_thread(prepare_table, 200 if quick else 2000)
    await asyncio.to_thread(wait_replicas_have, ids)
    counted = await count_round_trips(ids, per_route=10 if quick else 40)
    one_client = await interleaved_routes(ids, *((0.6, 10) if quick else (20.0, 40)))
    by_mode = await write_cost_by_mode(ids, *((0.6, 10) if quick else (20.0, 40)))
    by_mode["raw_commit_ms"] = await asyncio.to_thread(raw_commit_cost, 4 if quick else 30)
    rounds, duration = (2, 0.08) if quick else (12, 0.3)
    levels = CONCURRENCY[1:] if quick else CONCURRENCY  # a smoke run: 8 and 32 only
    load = [await time_routes(ids, rounds, duration, c) for c in levels]
    return {"one_client": one_client, "by_mode": by_mode, "load": load, "wire": counted}


def run(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(_run(quick))
