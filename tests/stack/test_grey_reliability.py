"""The reliability suite, grey faults: a path that stops answering without closing
anything, a stalled server, a slow one, more clients than the read pool holds.

Each scenario is measured on fastapi_rwdb with its documented settings and, in
the same run, on the hand-written pattern (benchmarks/grey.py); the package's
targets are asserted, each run checks that the fault bit (the package's requests met it),
and the hand-written pattern is measured beside it for comparison. Figures go to
``benchmarks/out/grey.json`` and docs/reliability.md's table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest

from benchmarks import grey
from benchmarks.common import environment, load, replica_nodes, save
from fastapi_rwdb import RWDBSettings

from .faults import frozen_bouncer, slowed_bouncer, stalled_postgres

pytestmark = [pytest.mark.stack, pytest.mark.reliability]

HOLD = 18.0  # seconds each fault lasts (issue 20's measurement)
DEFAULTS = RWDBSettings(secret_key="x" * 32)  # type: ignore[call-arg]
# The connections the read pool keeps (its overflow comes and goes): 10 by default.
READ_POOL = DEFAULTS.pool_size * DEFAULTS.read_pool_multiplier


def _primary() -> str:
    return next(n for n in ("node1", "node2", "node3") if n not in replica_nodes())


Fault = Callable[[], AbstractContextManager[Any]]
CROWD = f"replica PgBouncer frozen, {3 * READ_POOL} clients a route (3x the read pool)"
READ_SCENARIOS: dict[str, tuple[Fault, int]] = {
    "replica PgBouncer frozen": (lambda: frozen_bouncer(replica_nodes()[0], at_most=60), 6),
    "replica PostgreSQL stalled": (lambda: stalled_postgres(replica_nodes()[0], at_most=60), 6),
    "replica slow (PgBouncer stopped half the time)": (
        lambda: slowed_bouncer(replica_nodes()[0], at_most=60),
        6,
    ),
    CROWD: (
        lambda: frozen_bouncer(replica_nodes()[0], at_most=60),
        3 * READ_POOL,
    ),
}


def _acknowledged(result: dict[str, Any]) -> list[str]:
    """The keys of every acknowledged write, taken out of ``result`` (not for the table)."""
    return [key for per in result.values() for r in per.values() for key in r.pop("acknowledged")]


def _record(scenario: str, result: dict[str, Any]) -> None:
    saved = load("grey") or {}
    saved.setdefault("scenarios", {})[scenario] = result
    saved["environment"] = environment()
    save("grey", saved)


@pytest.mark.grey  # on demand: see docs/reliability.md, "Grey faults, measured"
@pytest.mark.parametrize("scenario", list(READ_SCENARIOS))
def test_reads_under_a_grey_fault(scenario: str) -> None:
    fault, clients = READ_SCENARIOS[scenario]
    result = grey.run_scenario(fault, clients=clients, hold=HOLD, warm=6.0 if clients > 6 else 2.0)
    _acknowledged(result)
    _record(scenario, result)

    limit = DEFAULTS.read_timeout + 1.0
    for route, r in result[grey.APPS[0]].items():
        assert r["started"] > 0, (route, r)
        assert r["failed"] == 0, (route, r)
        assert r["longest_s"] <= limit, (route, r)
        assert r["throughput_vs_before"] >= 0.8, (route, r)
        if "slow" in scenario:
            assert r["moved_to_primary"] == 0, (route, r)  # slow is not sick
    if "stalled" in scenario:
        # HAProxy's check (Patroni cannot ask its PostgreSQL) takes the node out in
        # about 2 s and shuts its sessions: a read there waits that long.
        longest = max(r["longest_s"] for per in result.values() for r in per.values())
        assert longest >= 1.5, result
    elif "slow" in scenario:
        longest = max(r["longest_s"] for r in result[grey.APPS[1]].values())
        assert longest >= 0.1, result[grey.APPS[1]]  # the slowness bit
    else:
        # The fault bit: the package's reads met the frozen path (a first read there
        # runs again on the primary). The hand-written pattern's connections may all
        # have reached the other replica (HAProxy alternates connections between the
        # two apps' pools as they open): its figures are a comparison, not a control.
        assert sum(r["moved_to_primary"] for r in result[grey.APPS[0]].values()) > 0, result


def test_more_sync_clients_than_worker_threads_and_connections() -> None:
    """90 clients on a sync route: more than anyio's 40 worker threads and than the 30
    connections the read pool may open. The hand-written pattern stops: every thread
    waits for a connection, every connection waits for a thread to validate its
    endpoint's return value, until pool_timeout (30 s) fails the waiters. fastapi_rwdb's
    sync sessions wait for a slot on the event loop instead (web/thread_slots.py)."""
    clients = 3 * (DEFAULTS.pool_size + DEFAULTS.max_overflow) * DEFAULTS.read_pool_multiplier
    result = grey.run_scenario(
        contextlib.nullcontext, clients=clients, hold=10.0, warm=6.0, routes=grey.READS[:1]
    )
    _acknowledged(result)
    _record(f"no fault, {clients} clients on the sync route", result)
    ours = result[grey.APPS[0]][grey.READS[0]]
    assert ours["failed"] == 0 and ours["started"] >= 500, ours
    theirs = result[grey.APPS[1]][grey.READS[0]]
    assert theirs["started"] < ours["started"] / 5, theirs  # the control: it stalled


def test_writes_while_the_primary_pgbouncer_is_frozen() -> None:
    primary = _primary()
    result = grey.run_scenario(lambda: frozen_bouncer(primary, at_most=60), writes=True, hold=HOLD)
    acknowledged = _acknowledged(result)
    _record("primary PgBouncer frozen (writes)", result)

    twice, lost = grey.written_twice_or_lost(acknowledged)
    assert twice == [] and lost == [], (twice, lost)
    for route, r in result[grey.APPS[0]].items():
        # Every write answered within the write deadline: 503 (outcome unknown) or done.
        assert r["longest_s"] <= DEFAULTS.write_timeout + 1.0, (route, r)
        assert set(r["statuses"]) <= {503}, (route, r)
    # The fault bit: a write met the frozen path and waited for its deadline.
    assert max(r["longest_s"] for r in result[grey.APPS[0]].values()) >= 4.0, result
