"""fastapi_rwdb against the strongest alternative, not the default one (issue 22).

    .venv/bin/python -m benchmarks.peers --levels 1,8,32
    .venv/bin/python -m benchmarks.peers --levels 1,8 --rtt-ms 2

Beside the overhead benchmark's baseline (the hand-written pattern with the
package's default pool sizes, which churns connections from 8 in flight), two
stronger ones:

- ``tuned``: the same hand-written pattern with every pool keeping as many
  connections as there are requests in flight (at least 10), so it opens none
  under the load measured (the run reports connections opened per 1,000
  requests, after the warm-up);
- ``aa``: advanced-alchemy's read/write routing (pools 10 + 20, pre-ping), as a
  new user would set it up (the optional ``bench`` extra).

Every route runs on every app in bursts, ``rounds`` times, who goes first
rotating; a round's ratios compare the bursts of that round. The headline ratio
is fastapi_rwdb's against whichever of the three baselines had the highest median
throughput on that route; ``control``, a second ``tuned`` app with its own pools,
gives the A/A ratio (the harness's noise floor). ``rwdb_off`` (``RWDB_PIN_MODE=off``)
runs the write routes, so a token-carrying write is compared with an untracked one
in the same rounds.

``--rtt-ms`` puts :mod:`benchmarks.delay` (its own process) between every app and
HAProxy, adding that round-trip time, and measures what it added (``SELECT 1``
through it and around it, alternating).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psycopg

from .apps import AdvancedAlchemy, Baseline, rwdb_app
from .common import OUT_DIR, call, env, node_dsn, prepare_table, spread, wait_replicas_have
from .overhead import (
    ROUTES,
    ConnectCounter,
    Requests,
    baseline_pools,
    burst,
    fresh_token,
    rwdb_pools,
)
from .wire import WireCounter, round_trips

BASELINES = ("baseline", "tuned", "aa")
WRITES = ("sync_write", "async_write")


def _start_proxy(one_way_ms: float) -> tuple[subprocess.Popen[str], int, int]:
    host = env("POSTGRES_SERVER")
    w, r = int(env("POSTGRES_PORT")), int(env("POSTGRES_READ_PORT"))
    proc = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
        [
            sys.executable,
            "-m",
            "benchmarks.delay",
            "--one-way-ms",
            f"{one_way_ms:.4f}",
            f"write={host}:{w}",
            f"read={host}:{r}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ports = dict(proc.stdout.readline().split() for _ in range(2))
    return proc, int(ports["write"]), int(ports["read"])


@contextlib.contextmanager
def delayed(rtt_ms: float, info: dict[str, Any]) -> Iterator[tuple[int, int]]:
    """The write and read ports, through the delay proxy when ``rtt_ms`` > 0.

    The proxy's own hop costs something on top of its delay (about 0.15 ms a round
    trip here: two thread wake-ups), so the delay is set from a first measurement
    and the round-trip time measured again with it; ``info`` gets both."""
    if rtt_ms <= 0:
        yield int(env("POSTGRES_PORT")), int(env("POSTGRES_READ_PORT"))
        return
    direct = int(env("POSTGRES_PORT"))
    one_way = rtt_ms / 2
    proc, w, r = _start_proxy(one_way)
    try:
        first = select1_rtt(direct, w, rounds=6)
        proc.terminate()
        proc.wait(10)
        one_way = max(0.0, one_way + (rtt_ms - first["added"]["median"]) / 2)
        proc, w, r = _start_proxy(one_way)
        info["one_way_ms"] = one_way
        info["rtt"] = select1_rtt(direct, w)
        yield w, r
    finally:
        proc.terminate()
        proc.wait(10)


def select1_rtt(direct: int, proxied: int, rounds: int = 15, per_round: int = 40) -> dict[str, Any]:
    """``SELECT 1`` round trips on one connection around the proxy and one through it,
    alternating by round: medians of the per-round means, in ms."""
    times: dict[str, list[float]] = {"direct": [], "proxied": []}
    with (
        psycopg.connect(node_dsn(direct), prepare_threshold=None, autocommit=True) as a,
        psycopg.connect(node_dsn(proxied), prepare_threshold=None, autocommit=True) as b,
    ):
        for n in range(rounds):
            order = [("direct", a), ("proxied", b)]
            for name, conn in order if n % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                for _ in range(per_round):
                    conn.execute("SELECT 1").fetchone()
                times[name].append((time.perf_counter() - t0) / per_round * 1e3)
    added = [p - d for p, d in zip(times["proxied"], times["direct"], strict=True)]
    return {**{k: spread(v) for k, v in times.items()}, "added": spread(added)}


async def count_trips(w: int, r: int, ids: list[int], per_route: int = 40) -> dict[str, Any]:
    """Round trips per request of the peer apps (the overhead benchmark counts the
    baseline and fastapi_rwdb), through :mod:`benchmarks.wire`."""
    upstream = {"write": (env("POSTGRES_SERVER"), w), "read": (env("POSTGRES_SERVER"), r)}
    out: dict[str, dict[str, float]] = {}
    with WireCounter(upstream) as wire:
        pw, pr = wire.ports["write"], wire.ports["read"]
        aa = AdvancedAlchemy(pw, pr)
        apps = {
            "aa": aa.app(),
            "rwdb": rwdb_app(pw, pr, lag_check_interval=3600)[0],
        }
        async with contextlib.AsyncExitStack() as stack:
            for app in apps.values():
                await stack.enter_async_context(app.router.lifespan_context(app))
            token = await fresh_token(apps["rwdb"])
            for route in ROUTES:
                out[route[0]] = {"aa": float("nan")}
                for name, app in apps.items():
                    if name == "aa" and route[3].startswith("/async") and aa.async_error:
                        continue
                    requests = Requests(route, ids, token)
                    for _ in range(5):
                        await call(app, *requests.next())
                    wire.reset()
                    for _ in range(per_route):
                        response = await call(app, *requests.next())
                        assert response.status == 200, response.body
                    await asyncio.sleep(0.05)
                    out[route[0]][name] = round_trips(wire.counts()) / per_route
    return out


async def run_level(
    w: int, r: int, ids: list[int], level: int, rounds: int, duration: float
) -> dict[str, Any]:
    tuned_size = max(level, 10)
    peers: dict[str, Any] = {
        "baseline": Baseline(w, r),
        "tuned": Baseline(w, r, pool_size=tuned_size),
        "aa": AdvancedAlchemy(w, r),
        "control": Baseline(w, r, pool_size=tuned_size),
    }
    apps = {name: peer.app() for name, peer in peers.items()}
    apps["rwdb"], database = rwdb_app(w, r)
    apps["rwdb_off"], database_off = rwdb_app(w, r, pin_mode="off")
    connects = ConnectCounter()
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
    async with contextlib.AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app.router.lifespan_context(app))
        for name in ("baseline", "tuned", "control"):
            connects.watch(name, baseline_pools(peers[name]))
        connects.watch("aa", peers["aa"].engines())
        connects.watch("rwdb", rwdb_pools(database))
        connects.watch("rwdb_off", rwdb_pools(database_off))
        token = await fresh_token(apps["rwdb"])
        for route in ROUTES:
            names = [
                n
                for n in apps
                if (n != "rwdb_off" or route[0] in WRITES)
                and not (n == "aa" and peers["aa"].async_error and route[3].startswith("/async"))
            ]
            samples[route[0]] = {n: [] for n in names}
            for name in names:  # warm-up: pools filled, code paths compiled
                await burst(apps[name], Requests(route, ids, token), 0.5, level)
        for n in range(rounds):
            for i, route in enumerate(ROUTES):
                names = list(samples[route[0]])
                k = (n + i) % len(names)
                for name in names[k:] + names[:k]:
                    gc.collect()
                    before = connects.counts[name]
                    result = await burst(apps[name], Requests(route, ids, token), duration, level)
                    result["connects"] = connects.counts[name] - before
                    del result["latencies"]
                    samples[route[0]][name].append(result)
    return {
        "level": level,
        "tuned_pool_size": tuned_size,
        "aa_async_error": peers["aa"].async_error,
        "routes": _summarise(samples),
    }


def _summarise(samples: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    routes = {}
    for key, runs in samples.items():
        figures = {
            name: {
                "rps": spread([s["rps"] for s in rs]),
                "cpu_us": spread([s["cpu_us"] for s in rs]),
                "errors": sum(s["errors"] for s in rs),
                "connects_per_1000": sum(s["connects"] for s in rs)
                / max(1, sum(s["n"] for s in rs))
                * 1000,
            }
            for name, rs in runs.items()
        }
        present = [b for b in BASELINES if b in runs]
        strongest = max(present, key=lambda b: figures[b]["rps"]["median"])

        def ratio(a: str, b: str, field: str = "rps", runs: Any = runs) -> dict[str, float]:
            return spread([x[field] / y[field] for x, y in zip(runs[a], runs[b], strict=True)])

        entry = {
            "figures": figures,
            "strongest": strongest,
            "ratio": ratio("rwdb", strongest),
            "cpu_ratio": ratio("rwdb", strongest, "cpu_us"),
            "vs": {b: ratio("rwdb", b) for b in present},
            "control": ratio("control", "tuned"),
        }
        if "rwdb_off" in runs:
            entry["token_vs_off"] = ratio("rwdb", "rwdb_off")
            entry["off_ratio"] = ratio("rwdb_off", strongest)
        routes[key] = entry
    return routes


def render(data: dict[str, Any]) -> str:
    """The run as Markdown tables."""
    lines = []
    rtt = data.get("rtt")
    if rtt:
        lines.append(
            f"Delay proxy: one-way {data['one_way_ms']:.3f} ms; `SELECT 1` "
            f"{rtt['direct']['median']:.3f} ms around it, {rtt['proxied']['median']:.3f} ms "
            f"through it: **+{rtt['added']['median']:.3f} ms** per round trip (IQR "
            f"{rtt['added']['p25']:.3f}-{rtt['added']['p75']:.3f})."
        )
        lines.append("")
    if data.get("trips"):
        lines += ["| route | advanced-alchemy round trips | fastapi_rwdb round trips |"]
        lines += ["| --- | ---: | ---: |"]
        for key, t in data["trips"].items():
            lines.append(f"| {key} | {t['aa']:g} | {t['rwdb']:g} |")
        lines.append("")

    def q(s: dict[str, float]) -> str:
        return f"{s['median']:.3f} ({s['p25']:.3f}-{s['p75']:.3f})"

    for level in data["levels"]:
        if level.get("aa_async_error"):
            lines += [
                "advanced-alchemy's async routing fails on this SQLAlchemy "
                f"(`{level['aa_async_error']}`): async routes compare with the other two.",
                "",
            ]
        lines += [
            f"**{level['level']} in flight** (tuned pools: {level['tuned_pool_size']} per engine)",
            "",
            "| route | req/s: default, tuned, aa, rwdb | strongest | **rwdb / strongest** (IQR) "
            "| A/A (IQR) | rwdb / default, tuned, aa | CPU/req ratio | token / off (IQR) "
            "| conn./1000 req: default, tuned, aa, rwdb | errors |",
            "| --- | --- | --- | --- | --- | --- | ---: | --- | --- | ---: |",
        ]
        for key, e in level["routes"].items():
            f = e["figures"]
            names = ("baseline", "tuned", "aa", "rwdb")
            rps = ", ".join(f"{f[n]['rps']['median']:.0f}" if n in f else "-" for n in names)
            vs = ", ".join(
                f"{e['vs'][b]['median']:.3f}" if b in e["vs"] else "-" for b in BASELINES
            )
            conns = ", ".join(f"{f[n]['connects_per_1000']:.1f}" if n in f else "-" for n in names)
            off = q(e["token_vs_off"]) if "token_vs_off" in e else "-"
            errors = sum(x["errors"] for x in f.values())
            lines.append(
                f"| {key} | {rps} | {e['strongest']} | **{q(e['ratio'])}** | {q(e['control'])} "
                f"| {vs} | {e['cpu_ratio']['median']:.3f} | {off} | {conns} | {errors} |"
            )
        lines.append("")
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    ids = await asyncio.to_thread(prepare_table, 2000)
    await asyncio.to_thread(wait_replicas_have, ids)
    data: dict[str, Any] = {
        "rtt_ms": args.rtt_ms,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_before": os.getloadavg(),
        "levels": [],
    }
    with delayed(args.rtt_ms, data) as (w, r):
        if args.trips:
            data["trips"] = await count_trips(w, r, ids)
        for level in args.levels:
            data["levels"].append(await run_level(w, r, ids, level, args.rounds, args.seconds))
    data["load_after"] = os.getloadavg()
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__)
    parser.add_argument("--levels", default="1,8,32", help="requests in flight, comma-separated")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time to add")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=0.3, help="per burst")
    parser.add_argument("--trips", action="store_true", help="count round trips first")
    parser.add_argument("--tag", default="", help="name of the output file")
    args = parser.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")]
    data = asyncio.run(_main(args))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"rtt{args.rtt_ms:g}-" + "-".join(map(str, args.levels))
    (OUT_DIR / f"peers-{tag}.json").write_text(json.dumps(data, indent=1))
    text = render(data)
    (OUT_DIR / f"peers-{tag}.md").write_text(text)
    print(text)
    print(f"load average {data['load_before'][0]:.2f} before, {data['load_after'][0]:.2f} after")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
