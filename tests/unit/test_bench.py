"""The bench's bookkeeping (routing/bench.py), the per-connection record of which
replica is behind it (engine/servers.py), and the routing step it adds, on an
injected clock, without a database."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from fastapi_rwdb import RWDBSettings
from fastapi_rwdb.engine import servers
from fastapi_rwdb.routing.bench import ReplicaBench
from fastapi_rwdb.routing.rules import Primary, Route, Seen, next_replica_step


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_benched_replica_is_passed_over_for_the_bench_time_then_accepted_again() -> None:
    clock = Clock()
    bench = ReplicaBench(10.0, clock)
    assert not bench.is_benched("node2") and not bench.any_benched()
    assert bench.bench("node2") is True
    assert bench.is_benched("node2") and not bench.is_benched("node3")
    assert bench.any_benched()
    clock.now += 9.9
    assert bench.is_benched("node2")
    assert bench.seconds_left() == {"node2": pytest.approx(0.1)}
    clock.now += 0.1
    assert not bench.is_benched("node2"), "still benched after the bench time"
    assert not bench.any_benched()
    assert bench.seconds_left() == {}


def test_benched_again_while_benched_extends_the_time_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    bench = ReplicaBench(10.0, clock)
    with caplog.at_level(logging.WARNING, logger="fastapi_rwdb"):
        assert bench.bench("node2") is True
        clock.now += 5
        assert bench.bench("node2") is False  # a second silence from the same replica
    assert len(caplog.records) == 1
    assert "node2" in caplog.text and "RWDB_REPLICA_BENCH_SECONDS" in caplog.text
    clock.now += 9
    assert bench.is_benched("node2"), "the second silence did not extend the bench"


def test_a_bench_time_of_zero_benches_nothing() -> None:
    bench = ReplicaBench(0.0, Clock())
    assert not bench.enabled
    assert bench.bench("node2") is False
    assert not bench.is_benched("node2") and bench.seconds_left() == {}


def test_the_gauge_lists_every_replica_reached_benched_or_not() -> None:
    clock = Clock()
    bench = ReplicaBench(10.0, clock)
    bench.saw("node3")
    bench.bench("node2")
    assert bench.states() == {"node2": True, "node3": False}
    clock.now += 10
    assert bench.states() == {"node2": False, "node3": False}  # 0, not gone


class Record:
    """What engine/servers.py reads of SQLAlchemy's pool record (public attributes)."""

    def __init__(self, connection: Any = "connection") -> None:
        self.info: dict[str, Any] = {}
        self.record_info: dict[str, Any] = {}
        self.dbapi_connection = connection


@pytest.fixture
def answer(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """What the identity query answers (the one round trip, without a server)."""
    said: list[str | None] = ["node2"]
    monkeypatch.setattr(servers, "fetch_outside_transaction", lambda *_a, **_k: said[0])
    return said


def _admit(record: Record, bench: ReplicaBench, answer: list[str | None], name: str | None) -> bool:
    answer[0] = name
    return servers.admit(object(), record, bench, 1.0)


def test_a_connection_knows_its_replica_and_a_deadline_on_it_benches_that_replica(
    answer: list[str | None],
) -> None:
    bench = ReplicaBench(10.0, Clock())
    record = Record()
    assert _admit(record, bench, answer, "node2") is True
    assert servers.replica_of(record.info) == "node2"
    assert not servers.benched(record.info)
    servers.timed_out(record.info)
    assert bench.is_benched("node2")
    assert servers.benched(record.info) and servers.passed_over(record)
    other = Record()
    assert _admit(other, bench, answer, "node3") is True and not servers.passed_over(other)
    assert _admit(Record(), bench, answer, "node2") is False, "a new connection to it was admitted"


def test_a_server_the_app_role_cannot_name_is_named_by_address_all_the_same(
    answer: list[str | None],
) -> None:
    assert "inet_server_addr()" in servers.IDENTITY_SQL
    assert "pg_stat_wal_receiver" in servers.IDENTITY_SQL
    bench = ReplicaBench(10.0, Clock())
    record = Record()
    _admit(record, bench, answer, None)  # no answer a name can be made of
    assert servers.replica_of(record.info) == "unknown"


def test_a_connection_of_no_known_replica_benches_nothing() -> None:
    info: dict[str, Any] = {}
    servers.timed_out(info)  # a write connection, or one opened with the bench off
    assert not servers.benched(info) and servers.replica_of(info) is None
    assert not servers.passed_over(Record())
    assert not servers.passed_over(Record(connection=None))


def test_an_empty_record_is_passed_over_only_while_a_replica_is_benched(
    answer: list[str | None],
) -> None:
    clock = Clock()
    bench = ReplicaBench(10.0, clock)
    record = Record()
    _admit(record, bench, answer, "node3")
    record.info.clear()  # SQLAlchemy clears it when the connection is discarded
    record.dbapi_connection = None
    assert not servers.passed_over(record)
    bench.bench("node2")
    assert servers.passed_over(record), "reopened while a replica is benched"
    clock.now += 10
    assert not servers.passed_over(record)


def test_a_read_whose_every_new_connection_reached_a_benched_replica_goes_to_the_primary() -> None:
    route = Route("replica", "lsn-check", min_lsn=100, if_behind="replica-behind")
    benched = [Seen(lost=True, unreachable=True, benched=True)]
    assert next_replica_step(route, benched, idle=0, wait=0, waited=None) == Primary(
        "replica-benched"
    )
    refused = [Seen(lost=True, unreachable=True)]
    assert next_replica_step(route, refused, idle=0, wait=0, waited=None) == Primary(
        "replica-unreachable"
    )


def test_the_bench_time_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_PASSWORD", "x")
    assert RWDBSettings().replica_bench_seconds == 30.0
    monkeypatch.setenv("RWDB_REPLICA_BENCH_SECONDS", "0")
    assert RWDBSettings().replica_bench_seconds == 0
