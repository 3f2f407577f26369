"""The reliability suite: load through example_app while the cluster is switched
over, loses its primary, loses both replicas and lags.

What must hold in every scenario: no acknowledged write is lost, no client
reads stale data after its own write (tokens), failures are 503s with a reason
(never a 500), and the app recovers without a restart. The figures go to
``benchmarks/out/reliability.json`` and are summarised in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

import fastapi_rwdb

pytestmark = [pytest.mark.stack, pytest.mark.reliability]

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "scripts" / "stack.sh"
OUT = ROOT / "benchmarks" / "out" / "reliability.json"
CLIENTS = 6


def stack(*args: str) -> str:
    done = subprocess.run(
        ["bash", str(STACK), *args], check=True, capture_output=True, text=True, timeout=180
    )
    return done.stdout


def primary_node() -> str:
    with fastapi_rwdb.get_write_db_context() as s:
        port = s.execute(text("SELECT inet_server_port()")).scalar_one()
    return f"node{int(port) - 15431}"  # stack.sh: node1..3 listen on 15432..15434


def replica_nodes() -> list[str]:
    return [n for n in ("node1", "node2", "node3") if n != primary_node()]


@dataclass
class Tally:
    sent: int = 0
    failed: int = 0
    server_errors: int = 0  # 500s: never acceptable
    error_samples: list[str] = field(default_factory=list)
    stale: int = 0
    acknowledged: list[int] = field(default_factory=list)
    write_outcomes: list[tuple[float, bool]] = field(default_factory=list)
    read_outcomes: list[tuple[float, bool]] = field(default_factory=list)

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


async def client_loop(
    client: httpx.AsyncClient, tally: Tally, stop: asyncio.Event, prefix: str
) -> None:
    while not stop.is_set():
        tally.sent += 1
        at = time.monotonic()
        try:
            created = await client.post(
                prefix, json={"name": f"rel-{uuid.uuid4().hex[:8]}", "serial": "REL"}
            )
        except httpx.HTTPError:
            created = None
        ok = created is not None and created.status_code == 201
        tally.write_outcomes.append((at, ok))
        if not ok:
            tally.failed += 1
            tally.server_errors += (
                created is not None and created.status_code >= 500 and (created.status_code != 503)
            )
            await asyncio.sleep(0.05)
            continue
        assert created is not None
        tracker_id = created.json()["id"]
        tally.acknowledged.append(tracker_id)
        tally.sent += 1
        at = time.monotonic()
        read = await client.get(f"{prefix}/{tracker_id}")  # with this client's token
        tally.read_outcomes.append((at, read.status_code == 200))
        if read.status_code == 404:
            tally.stale += 1
        elif read.status_code != 200:
            tally.failed += 1
            tally.server_errors += read.status_code >= 500 and read.status_code != 503
        await asyncio.sleep(0.02)


async def under_load(action: Callable[[], None], settle: float = 1.0) -> Tally:
    from example_app.main import app

    tally = Tally()
    stop = asyncio.Event()
    async with app.router.lifespan_context(app):
        clients = [
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                base_url="http://rel",
                timeout=60,
            )
            for _ in range(CLIENTS)
        ]
        loops = [
            asyncio.create_task(
                client_loop(c, tally, stop, ("/trackers", "/async/trackers")[i % 2])
            )
            for i, c in enumerate(clients)
        ]
        await asyncio.sleep(settle)
        await asyncio.to_thread(action)
        await asyncio.sleep(settle)
        # Recovered: writes succeed again (give a crashed cluster time to elect).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            recent = [ok for at, ok in tally.write_outcomes[-CLIENTS * 3 :]]
            if recent and all(recent):
                break
            await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*loops)
        for c in clients:
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


SCENARIOS: dict[str, Callable[[], None]] = {
    "switchover": lambda: print(stack("switchover")),
    "primary crash": kill_primary_then_restart,
    "both replicas stopped": stop_both_replicas_then_restart,
    "lag spike 1s": lag_spike,
}
RESULTS: dict[str, dict[str, object]] = {}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_scenario_under_load(scenario: str) -> None:
    tally = await under_load(SCENARIOS[scenario])
    missing = acknowledged_but_missing(tally.acknowledged)
    RESULTS[scenario] = {
        "requests": tally.sent,
        "failed": tally.failed,
        "longest_write_failure_s": tally.longest_window(tally.write_outcomes),
        "longest_read_failure_s": tally.longest_window(tally.read_outcomes),
        "writes_acknowledged": len(tally.acknowledged),
        "writes_found": len(tally.acknowledged) - len(missing),
        "stale_reads": tally.stale,
        "server_errors": tally.server_errors,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(RESULTS, indent=2))
    print(scenario, RESULTS[scenario])
    assert missing == [], "an acknowledged write is missing"
    assert tally.stale == 0, "a client did not see its own write"
    samples = tally.error_samples[:3]
    assert tally.server_errors == 0, f"failures must be 503s with a reason: {samples}"
    assert len(tally.acknowledged) > 0
    stack("up")  # the cluster is whole again for what follows
