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
Run it under ``flock /var/tmp/rwdb-tests.lock``: it uses the shared stack. A run
longer than a few minutes takes the lock itself, in parts of at most ``--hold``
seconds (``--lock /var/tmp/rwdb-tests.lock``, and no flock around it).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import fcntl
import gc
import json
import os
import secrets
import time
import tracemalloc
from typing import Any

from .apps import Baseline, rwdb_app
from .common import call, env, prepare_table, replica_paused

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE / 2**20


def malloc_trim() -> None:
    """Give glibc's free heap pages back to the kernel (what RSS then keeps is in use)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def object_counts() -> collections.Counter[str]:
    gc.collect()
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


class Probe:
    """What is looked at besides RSS: after a trim, Python objects by type, tracemalloc."""

    def __init__(self, trim: bool, objects: bool, traced: bool, warm_up: float = 0.2) -> None:
        self.trim, self.objects, self.traced = trim, objects, traced
        self.warm_up = warm_up
        self.trimmed: list[tuple[int, float]] = []
        self.counts: collections.Counter[str] | None = None
        self.snapshot: tracemalloc.Snapshot | None = None
        self.report: dict[str, Any] = {}

    def sample(self, i: int) -> None:
        if self.trim:
            malloc_trim()
            self.trimmed.append((i, rss_mb()))

    def warm(self) -> None:
        if self.objects:
            self.counts = object_counts()
        if self.traced:
            tracemalloc.start(5)
            self.snapshot = tracemalloc.take_snapshot()

    def finish(self) -> None:
        if self.counts is not None:
            grown = object_counts()
            grown.subtract(self.counts)
            self.report["objects_grown"] = [kv for kv in grown.most_common(15) if kv[1] > 0]
        if self.snapshot is not None:
            now = tracemalloc.take_snapshot()
            top = now.compare_to(self.snapshot, "traceback")[:8]
            self.report["traced_grown"] = [
                {"kb": round(d.size_diff / 1024, 1), "where": d.traceback.format()[-6:]}
                for d in top
            ]
            self.report["traced_total_mb"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 2)
        if self.trimmed:
            self.report["rss_after_trim"] = [(n, round(mb, 2)) for n, mb in self.trimmed]
            self.report["slope_after_trim"] = round(slope_per_100k(self.trimmed, self.warm_up), 3)


class StackLock:
    """The machine-wide stack lock, taken by the run itself and let go between parts so
    that a long soak never keeps others off the stack for more than ``hold`` seconds.
    Never let go while a replica is paused. The process (and its memory) lives on
    while it waits for the lock again."""

    def __init__(self, path: str | None, hold: float) -> None:
        self.path, self.hold = path, hold
        self.fd: int | None = None
        self.since = 0.0
        self.waited = 0.0
        self.holds = 0

    def take(self) -> None:
        if self.path is None:
            return
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        started = time.monotonic()
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.since = time.monotonic()
        self.waited += self.since - started
        self.holds += 1

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def maybe_hand_over(self, paused: bool) -> None:
        """Let others have the stack when this hold is over its time (not while paused)."""
        if self.fd is None or paused or time.monotonic() - self.since < self.hold:
            return
        self.release()
        time.sleep(3)  # a waiting run takes it now; this one queues behind it
        self.take()


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


async def drive(
    app: Any,
    requests: int,
    every: int,
    pause: bool,
    probe: Probe | None = None,
    lock: StackLock | None = None,
) -> list[tuple[int, float]]:
    ids = prepare_table(seed_rows=50)
    samples: list[tuple[int, float]] = []
    token: bytes | None = None
    paused: contextlib.ExitStack | None = None
    async with app.router.lifespan_context(app):
        try:
            for i in range(requests):
                if lock is not None and i % 1000 == 0:
                    lock.maybe_hand_over(paused is not None)
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
                    if probe is not None:
                        probe.sample(i)
                if probe is not None and i == int(requests * probe.warm_up):
                    probe.warm()
        finally:
            if paused is not None:
                paused.close()
    samples.append((requests, rss_mb()))
    if probe is not None:
        probe.sample(requests)
        probe.finish()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=["rwdb", "plain"])
    parser.add_argument("requests", type=int)
    parser.add_argument("--every", type=int, default=2000, help="requests between samples")
    parser.add_argument("--pause", action="store_true", help="pause a replica mid-run")
    parser.add_argument("--trim", action="store_true", help="also sample RSS after malloc_trim")
    parser.add_argument("--objects", action="store_true", help="Python objects grown after warm-up")
    parser.add_argument("--traced", action="store_true", help="tracemalloc after warm-up")
    parser.add_argument(
        "--lock",
        metavar="PATH",
        help="take this stack lock itself, in parts (run it WITHOUT flock around it)",
    )
    parser.add_argument(
        "--warm-up", type=float, default=0.2, help="share of the run left out of the slopes"
    )
    parser.add_argument("--hold", type=float, default=420, help="seconds per part of the lock")
    args = parser.parse_args()
    lock = StackLock(args.lock, args.hold)
    probe = Probe(args.trim, args.objects, args.traced, args.warm_up)
    write_port, read_port = int(env("POSTGRES_PORT")), int(env("POSTGRES_READ_PORT"))
    if args.variant == "rwdb":
        app, _ = rwdb_app(write_port, read_port)
    else:
        app = Baseline(write_port, read_port).app()
    lock.take()
    lock.waited = 0.0  # only the waits between parts are left out of the run's time
    started = time.monotonic()
    try:
        samples = asyncio.run(drive(app, args.requests, args.every, args.pause, probe, lock))
    finally:
        lock.release()
    print(
        json.dumps(
            {
                "variant": args.variant,
                "requests": args.requests,
                "seconds": round(time.monotonic() - started - lock.waited, 1),
                "lock_holds": lock.holds,
                "slope_mb_per_100k": round(slope_per_100k(samples, args.warm_up), 3),
                "rss_first_mb": round(samples[0][1], 1),
                "rss_last_mb": round(samples[-1][1], 1),
                "samples": [(n, round(mb, 2)) for n, mb in samples],
                **probe.report,
            }
        )
    )


if __name__ == "__main__":
    main()
