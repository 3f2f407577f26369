"""Memory over a long run (issue 20, item 9): one process, one app, many requests
driven in-process (no sockets), the resident set size sampled as it goes.

    python -m benchmarks.soak rwdb 300000      # fastapi_rwdb's routes
    python -m benchmarks.soak plain 300000     # the same load on plain sessions

Each run prints one JSON line: the samples (requests done, RSS in MB) and the
slope after warm-up in MB per 100,000 requests. The mix, per ten requests: one
write (a new token), four reads carrying the client's token, two carrying a
different forged token each, three plain reads; sync and async routes in turn.
With ``--pause``, one replica's replay is paused for the middle fifth of the
run (the caller must hold the stack lock; replay is resumed whatever happens).
Run it under ``flock /var/tmp/rwdb-tests.lock``: it uses the shared stack.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import time
from typing import Any

from .apps import Baseline, rwdb_app
from .common import call, env, prepare_table, replica_paused

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE / 2**20


def slope_per_100k(samples: list[tuple[int, float]], warm_up: float = 0.2) -> float:
    """Least-squares slope of RSS over requests, after the first ``warm_up`` share."""
    start = samples[-1][0] * warm_up
    kept = [(n, mb) for n, mb in samples if n >= start]
    if len(kept) < 3:
        raise ValueError("too few samples after warm-up for a slope")
    mean_n = sum(n for n, _ in kept) / len(kept)
    mean_mb = sum(mb for _, mb in kept) / len(kept)
    num = sum((n - mean_n) * (mb - mean_mb) for n, mb in kept)
    den = sum((n - mean_n) ** 2 for n, _ in kept)
    return num / den * 100_000


def forged(i: int) -> bytes:
    return f"2.{i:x}.{int(time.time()) + 20}.{secrets.token_urlsafe(16)[:22]}".encode()


async def drive(app: Any, requests: int, every: int, pause: bool) -> list[tuple[int, float]]:
    ids = prepare_table(seed_rows=50)
    samples: list[tuple[int, float]] = []
    token: bytes | None = None
    paused: contextlib.ExitStack | None = None
    async with app.router.lifespan_context(app):
        try:
            for i in range(requests):
                if pause and i == requests * 2 // 5:
                    paused = contextlib.ExitStack()
                    paused.enter_context(replica_paused())
                elif paused is not None and i == requests * 3 // 5:
                    paused.close()
                    paused = None
                kind = "sync" if i % 2 else "async"
                step = i % 10
                headers: list[tuple[bytes, bytes]] = []
                if step == 0:
                    answer = await call(app, "POST", f"/{kind}/items")
                    token = answer.header(b"x-rwdb-pin") or token
                else:
                    if step <= 4 and token is not None:
                        headers = [(b"x-rwdb-pin", token)]
                    elif step <= 6:
                        headers = [(b"x-rwdb-pin", forged(i))]
                    answer = await call(
                        app, "GET", f"/{kind}/items/{ids[i % len(ids)]}", headers=headers
                    )
                if answer.status != 200:
                    raise RuntimeError(f"request {i} answered {answer.status}: {answer.body!r}")
                if i % every == 0:
                    samples.append((i, rss_mb()))
        finally:
            if paused is not None:
                paused.close()
    samples.append((requests, rss_mb()))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=["rwdb", "plain"])
    parser.add_argument("requests", type=int)
    parser.add_argument("--every", type=int, default=2000, help="requests between samples")
    parser.add_argument("--pause", action="store_true", help="pause a replica mid-run")
    args = parser.parse_args()
    write_port, read_port = int(env("POSTGRES_PORT")), int(env("POSTGRES_READ_PORT"))
    if args.variant == "rwdb":
        app, _ = rwdb_app(write_port, read_port)
    else:
        app = Baseline(write_port, read_port).app()
    started = time.monotonic()
    samples = asyncio.run(drive(app, args.requests, args.every, args.pause))
    print(
        json.dumps(
            {
                "variant": args.variant,
                "requests": args.requests,
                "seconds": round(time.monotonic() - started, 1),
                "slope_mb_per_100k": round(slope_per_100k(samples), 3),
                "rss_first_mb": round(samples[0][1], 1),
                "rss_last_mb": round(samples[-1][1], 1),
                "samples": [(n, round(mb, 2)) for n, mb in samples],
            }
        )
    )


if __name__ == "__main__":
    main()
