"""The reliability suite: load through example_app while the cluster is switched
over, loses its primary, loses both replicas and lags.

Three kinds of clients run side by side: writers (create, then read back with
their own token; while writes fail, read their last creation again), clients
that only read (no token), and clients that read with a token the replicas had
replayed before the trouble began.

What must hold in every scenario: no acknowledged write is lost, no client
reads stale data after its own write (tokens), failures are 503s with
``Retry-After`` (never a 500), and the app recovers without a restart. While
only the primary is away (switchover, crash), every read that needs no primary
is served by a replica, and a writer whose last write no replica has yet gets
503s, not a read that misses it. The figures go to
``benchmarks/out/reliability.json`` and are summarised in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

import fastapi_rwdb
from fastapi_rwdb import RWDBSettings

from .. import helpers

pytestmark = [pytest.mark.stack, pytest.mark.reliability]

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "out" / "reliability.json"
WRITERS = 6  # create, then read back with their own token (cookie)
READERS = 4  # only read, no token
SETTLED = 2  # read with a token the replicas had replayed before the action
TOKEN_HEADER = "X-RWDB-Pin"
STEADY = ("read-only", "settled")  # the groups that read in a loop
REPLICA_FAILED = ("reason=replica-unreachable", "reason=replica-timeout")


def stack(*args: str) -> str:
    return helpers.stack(*args, timeout=180)  # a switchover can take longer than most


def primary_node() -> str:
    with fastapi_rwdb.get_write_db_context() as s:
        port = s.execute(text("SELECT inet_server_port()")).scalar_one()
    return f"node{int(port) - 15431}"  # stack.sh: node1..3 listen on 15432..15434


def replica_nodes() -> list[str]:
    return [n for n in ("node1", "node2", "node3") if n != primary_node()]


@dataclass
class Read:
    """One read as a client saw it."""

    start: float
    end: float
    status: int  # 0: no response at all
    target: str  # the X-RWDB-Read header: "replica", "primary; reason=..."
    retry_after: bool
    detail: str = ""  # of an error answer

    @property
    def on_replica(self) -> bool:
        return self.status == 200 and self.target == "replica"


@dataclass
class Tally:
    sent: int = 0
    server_errors: int = 0  # 500s, or no answer: never acceptable
    error_samples: list[str] = field(default_factory=list)
    stale: int = 0  # a client did not see a row it had created (or the seeded one)
    acknowledged: list[int] = field(default_factory=list)
    write_outcomes: list[tuple[float, bool]] = field(default_factory=list)
    #: group -> client -> its reads. Groups: "read-only" (no token), "settled" (a token
    #: the replicas had replayed before the action), "own" (right after a write),
    #: "own, writes failing" (the last own write, read after a write failed).
    reads: dict[str, dict[int, list[Read]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )

    def longest_window(self, outcomes: list[tuple[float, bool]]) -> float:
        """Longest time from a first failure to the next success."""
        longest, failing_since = 0.0, None
        for at, ok in sorted(outcomes):
            if not ok and failing_since is None:
                failing_since = at
            elif ok and failing_since is not None:
                longest = max(longest, at - failing_since)
                failing_since = None
        if failing_since is not None:
            longest = max(longest, time.monotonic() - failing_since)
        return round(longest, 2)

    def group(self, name: str) -> list[Read]:
        return [r for client in self.reads[name].values() for r in client]

    def longest_gap(self, name: str) -> float:
        """Longest time any one client of the group went without an answer (a 200):
        between two, or from its first request or to its last."""
        longest = 0.0
        for client in self.reads[name].values():
            if not client:
                continue
            marks = [client[0].start, *(r.end for r in client if r.status == 200), client[-1].end]
            longest = max(longest, *(b - a for a, b in itertools.pairwise(marks)))
        return round(longest, 2)

    def summary(self, name: str) -> dict[str, object]:
        reads = self.group(name)
        return {
            "reads": len(reads),
            "replica": sum(r.on_replica for r in reads),
            "primary": sum(r.status == 200 and not r.on_replica for r in reads),
            "503": sum(r.status == 503 for r in reads),
            "503_without_retry_after": sum(r.status == 503 and not r.retry_after for r in reads),
            "stale_404": sum(r.status == 404 for r in reads),
            "other": sum(r.status not in (200, 404, 503) for r in reads),
            # Only for clients that read steadily: the others read only after a write.
            **({"longest_gap_s": self.longest_gap(name)} if name in STEADY else {}),
        }


async def timed_get(
    client: httpx.AsyncClient, tally: Tally, url: str, headers: dict[str, str] | None = None
) -> Read:
    tally.sent += 1
    start = time.monotonic()
    try:
        response = await client.get(url, headers=headers)
    except httpx.HTTPError as exc:
        tally.server_errors += 1
        tally.error_samples.append(f"GET {url}: {exc!r}")
        return Read(start, time.monotonic(), 0, "", False)
    read = Read(
        start,
        time.monotonic(),
        response.status_code,
        response.headers.get("x-rwdb-read", ""),
        "retry-after" in response.headers,
        "" if response.status_code == 200 else response.text[:200],
    )
    if read.status == 404:
        tally.stale += 1
    elif read.status not in (200, 503):
        tally.server_errors += 1
        tally.error_samples.append(f"GET {url}: {read.status} {response.text[:200]}")
    return read


async def writer_loop(
    client: httpx.AsyncClient, tally: Tally, stop: asyncio.Event, prefix: str, me: int
) -> None:
    """Create a tracker, read it back with the token (cookie) the write handed out.
    While writes fail, read the last tracker created, still with that client's cookie."""
    last: int | None = None
    while not stop.is_set():
        tally.sent += 1
        at = time.monotonic()
        try:
            created = await client.post(
                prefix, json={"name": f"rel-{uuid.uuid4().hex[:8]}", "serial": "REL"}
            )
        except httpx.HTTPError as exc:
            created = None
            tally.error_samples.append(f"POST {prefix}: {exc!r}")
        ok = created is not None and created.status_code == 201
        tally.write_outcomes.append((at, ok))
        if ok:
            assert created is not None
            last = created.json()["id"]
            tally.acknowledged.append(last)
            read = await timed_get(client, tally, f"{prefix}/{last}")
            tally.reads["own"][me].append(read)
        else:
            if created is None or created.status_code != 503:
                tally.server_errors += 1
                if created is not None:
                    tally.error_samples.append(f"POST {prefix}: {created.status_code}")
            if last is not None:
                read = await timed_get(client, tally, f"{prefix}/{last}")
                tally.reads["own, writes failing"][me].append(read)
        await asyncio.sleep(0.02)


async def reader_loop(
    client: httpx.AsyncClient,
    tally: Tally,
    stop: asyncio.Event,
    url: str,
    log: list[Read],
    headers: dict[str, str] | None = None,
) -> None:
    """Read one existing tracker over and over: without a token, or with a token
    (sent as the header, as an API client would) that the replicas have replayed."""
    while not stop.is_set():
        log.append(await timed_get(client, tally, url, headers))
        await asyncio.sleep(0.02)


def reliability_app() -> FastAPI:
    """example_app's routes on a Database of the suite's own: the routing header on,
    to see which side served each read, and tokens that outlive a scenario (a
    crash takes ~30 s; the default RWDB_PIN_SECONDS is 30)."""
    from example_app import main as example

    app = FastAPI(lifespan=example.lifespan)
    fastapi_rwdb.setup(app, RWDBSettings(routing_header=True, pin_seconds=600))  # type: ignore[call-arg]
    app.include_router(example.app.router)
    return app


async def settled_token(client: httpx.AsyncClient, prefix: str) -> tuple[int, str]:
    """A tracker and its token, once a replica serves that token's reads."""
    created = await client.post(prefix, json={"name": "rel-settled", "serial": "REL"})
    assert created.status_code == 201, created.text
    tracker_id, token = created.json()["id"], created.headers[TOKEN_HEADER]
    deadline = time.monotonic() + 30
    while True:
        read = await client.get(f"{prefix}/{tracker_id}", headers={TOKEN_HEADER: token})
        if read.status_code == 200 and read.headers.get("x-rwdb-read") == "replica":
            return tracker_id, token
        assert time.monotonic() < deadline, "no replica replayed the settled write"
        await asyncio.sleep(0.1)


async def under_load(action: Callable[[], None], settle: float = 1.0) -> Tally:
    app = reliability_app()
    tally = Tally()
    stop = asyncio.Event()
    prefixes = ("/trackers", "/async/trackers")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)

        def new_client() -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=transport, base_url="http://rel", timeout=60)

        clients = [new_client() for _ in range(WRITERS + READERS + SETTLED)]
        setup_client = new_client()
        seeded, _ = await settled_token(setup_client, prefixes[0])
        settled = [await settled_token(setup_client, prefixes[i % 2]) for i in range(SETTLED)]
        loops = [writer_loop(clients[i], tally, stop, prefixes[i % 2], i) for i in range(WRITERS)]
        for i in range(READERS):
            me = WRITERS + i
            log = tally.reads["read-only"][me]
            url = f"{prefixes[i % 2]}/{seeded}"
            loops.append(reader_loop(clients[me], tally, stop, url, log))
        for i, (tracker_id, token) in enumerate(settled):
            me = WRITERS + READERS + i
            log = tally.reads["settled"][me]
            url = f"{prefixes[i % 2]}/{tracker_id}"
            loops.append(reader_loop(clients[me], tally, stop, url, log, {TOKEN_HEADER: token}))
        tasks = [asyncio.create_task(loop) for loop in loops]
        await asyncio.sleep(settle)
        await asyncio.to_thread(action)
        await asyncio.sleep(settle)
        # Recovered: writes succeed again (give a crashed cluster time to elect).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            recent = [ok for at, ok in tally.write_outcomes[-WRITERS * 3 :]]
            if recent and all(recent):
                break
            await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
        for c in [*clients, setup_client]:
            await c.aclose()
    return tally


def acknowledged_but_missing(ids: list[int]) -> list[int]:
    with fastapi_rwdb.get_read_db_context(primary=True) as s:
        found = set(
            s.execute(
                text("SELECT id FROM example_trackers WHERE id = ANY(:ids)"), {"ids": ids}
            ).scalars()
        )
    return sorted(set(ids) - found)


def kill_primary_then_restart() -> None:
    victim = primary_node()
    stack("kill-node", victim)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # no primary yet: the write side refuses
            if primary_node() != victim:
                break
        time.sleep(0.5)
    stack("start-node", victim)


def stop_both_replicas_then_restart() -> None:
    replicas = replica_nodes()
    for node in replicas:
        stack("stop-node", node)
    time.sleep(5)
    for node in replicas:
        stack("start-node", node)


def lag_spike() -> None:
    stack("lag", "1s")
    time.sleep(4)
    stack("lag", "0")


def kill_primary_while_replicas_lag() -> None:
    """The last writes before the crash are on no replica yet: their clients' reads
    must wait (503), not miss them. The replicas have received the WAL, so the new
    primary has it all (promotion skips the apply delay); nothing is lost here."""
    stack("lag", f"{LAG_S}s")
    try:
        time.sleep(LAG_S + 1)  # the writers' tokens are now ahead of both replicas
        kill_primary_then_restart()
    finally:
        stack("lag", "0")


LAG_S = 5
SCENARIOS: dict[str, Callable[[], None]] = {
    "switchover": lambda: print(stack("switchover")),
    "primary crash": kill_primary_then_restart,
    f"primary crash, replicas {LAG_S}s behind": kill_primary_while_replicas_lag,
    "both replicas stopped": stop_both_replicas_then_restart,
    "lag spike 1s": lag_spike,
}
#: Where the primary goes away but the replicas stay: reads must not stop.
PRIMARY_OUTAGES = {"switchover", "primary crash", f"primary crash, replicas {LAG_S}s behind"}
RESULTS: dict[str, dict[str, object]] = {}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_scenario_under_load(scenario: str) -> None:
    try:
        tally = await under_load(SCENARIOS[scenario])
    finally:
        stack("up")  # the cluster is whole again for what follows
    missing = acknowledged_but_missing(tally.acknowledged)
    groups = {name: tally.summary(name) for name in sorted(tally.reads)}
    RESULTS[scenario] = {
        "requests": tally.sent,
        "writes": len(tally.write_outcomes),
        "writes_failed": sum(not ok for _, ok in tally.write_outcomes),
        "longest_write_failure_s": tally.longest_window(tally.write_outcomes),
        "writes_acknowledged": len(tally.acknowledged),
        "writes_found": len(tally.acknowledged) - len(missing),
        "stale_reads": tally.stale,
        "server_errors": tally.server_errors,
        "reads": groups,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(RESULTS, indent=2))
    print(scenario, json.dumps(RESULTS[scenario], indent=2))
    for name in sorted(tally.reads):
        why = Counter(r.detail[:120] for r in tally.group(name) if r.status == 503)
        print(f"503 in {name}:", dict(why.most_common(3)))
    assert missing == [], "an acknowledged write is missing"
    assert tally.stale == 0, "a client did not see its own write (or the seeded row)"
    samples = tally.error_samples[:3]
    assert tally.server_errors == 0, f"failures must be 503s with a reason: {samples}"
    assert all(g["503_without_retry_after"] == 0 for g in groups.values())
    assert len(tally.acknowledged) > 0
    if scenario == "both replicas stopped":
        # Issue 20, item 11: the primary is up, so no read is refused, a token's
        # client included: a read the replicas cannot serve is served by the primary,
        # a first statement and, when the statements before it were SELECTs the
        # session compiled (example_app's), a later one whose replica stopped under it.
        for name in sorted(groups):
            failures = [r.detail for r in tally.group(name) if r.status != 200]
            assert failures == [], f"{name}: {failures}"
    if scenario not in PRIMARY_OUTAGES:
        return
    # Reads that need no primary never stop: replicas serve them. The one failure the
    # stack allows: HAProxy closes the sessions of a node that leaves the read port
    # (the promoted one); a read whose transaction had already read there is not
    # moved to another replica (it could go back in time), and goes to the primary
    # only after compiled SELECTs (example_app's), else it is a 503.
    for name in STEADY:
        group = groups[name]
        assert group["replica"] > 0, f"{name}: {group}"
        # The one primary read allowed: a first statement whose replica connection could
        # not be opened or answer (issue 20, items 1 and 11) runs on the primary rather
        # than fail. Any other reason (lag, a token) would mean these reads needed it.
        on_primary = [r.target for r in tally.group(name) if r.target.startswith("primary")]
        assert all(t.endswith(REPLICA_FAILED) for t in on_primary), on_primary
        assert len(on_primary) <= group["reads"] // 100, f"{name}: {group}"
        failures = [r.detail for r in tally.group(name) if r.status != 200]
        assert all("connection was lost" in d for d in failures), failures
        assert len(failures) <= group["reads"] // 100, f"{name}: {group}"
        assert group["longest_gap_s"] < 1.0, f"{name}: {group}"
    writes_failing = groups.get("own, writes failing", {})
    assert writes_failing.get("reads", 0) > 0, "no read was tried while writes failed"
    if scenario.startswith("primary crash, replicas"):
        # The last writes were on no replica: 503 (asserted above to carry Retry-After)
        # until a replica replayed them, then the replicas serve those clients too.
        assert writes_failing["503"] > 0, writes_failing
        assert writes_failing["replica"] > 0, writes_failing
