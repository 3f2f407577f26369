"""The body of ``GET {prefix}/read-write-split``: which server each side of both
engine pairs reaches, every replica the primary streams to, and where the
caller's own reads would go and why. Only reads; changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from ..database import Database
from ..engine.sqlstates import describe_error
from ..routing.lsn import format_lsn
from ..routing.replicas import view_replicas
from ..routing.request import RequestState, request_state
from ..routing.rules import Route, choose_read_route
from ..settings import RWDBSettings, Side

Role = Literal["primary", "replica"]

#: One round trip per side. ``pg_current_wal_lsn()`` fails on a replica, hence the
#: CASE (both functions are volatile, so PostgreSQL never folds it early).
FACTS_SQL = text(
    "SELECT host(inet_server_addr()) AS addr, inet_server_port() AS port,"
    " pg_is_in_recovery() AS in_recovery,"
    " CASE WHEN pg_is_in_recovery() THEN NULL"
    "  ELSE (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8 END AS current_lsn,"
    " (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8 AS replay_lsn,"
    " EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8 AS replay_age"
)


@dataclass(frozen=True, slots=True)
class _Facts:
    addr: str | None
    port: int | None
    in_recovery: bool
    current_lsn: int | None
    replay_lsn: int | None
    replay_age: float | None

    @classmethod
    def of(cls, row: Sequence[Any]) -> _Facts:
        addr, port, in_recovery, current_lsn, replay_lsn, replay_age = row
        return cls(addr, port, in_recovery, current_lsn, replay_lsn, replay_age)

    @property
    def role(self) -> Role:
        return "replica" if self.in_recovery else "primary"

    @property
    def server(self) -> str:
        return f"{self.addr}:{self.port}"


Probe = _Facts | BaseException


def _probe_sync(database: Database) -> tuple[Probe, Probe]:
    """(write, read) facts of the psycopg pair; runs in a worker thread.

    The read side is asked first: the primary's position, read afterwards, can
    only make the lag look larger, never hide it.
    """
    read: Probe
    write: Probe
    try:
        # Straight on the read engine: a read session could be sent to the primary
        # by the caller's own read-your-writes token.
        with database.engines.read.connect() as conn:
            read = _Facts.of(conn.execute(FACTS_SQL).one())
    except Exception as exc:
        read = exc
    try:
        with database.write_session() as session:
            write = _Facts.of(session.connection().execute(FACTS_SQL).one())
    except Exception as exc:
        write = exc
    return write, read


async def _probe_async(database: Database) -> tuple[Probe, Probe]:
    """(write, read) facts of the asyncpg pair."""
    read: Probe
    write: Probe
    try:
        async with database.async_engines.read.connect() as conn:
            read = _Facts.of((await conn.execute(FACTS_SQL)).one())
    except Exception as exc:
        read = exc
    try:
        async with database.async_write_session() as session:
            conn = await session.connection()
            write = _Facts.of((await conn.execute(FACTS_SQL)).one())
    except Exception as exc:
        write = exc
    return write, read


async def check_read_write_split(database: Database) -> dict[str, Any]:
    """The body of ``GET {prefix}/read-write-split``; ``status`` is "ok" or "problem"."""
    settings = database.settings
    state = request_state.get()  # read before any probe: the probes never change it
    route = choose_read_route(state, settings.pin_mode, database.health)
    problems: list[str] = []
    pairs: dict[str, Any] = {}
    replay: list[tuple[str, _Facts]] = []
    sync_probes = await run_in_threadpool(_probe_sync, database)
    async_probes = await _probe_async(database)
    for name, driver, (write, read) in (
        ("sync", "psycopg", sync_probes),
        ("async", "asyncpg", async_probes),
    ):
        label = f"{name} ({driver})"
        pairs[name] = {
            "driver": driver,
            "write": _side_report(settings, "write", write, label, problems),
            "read": _side_report(settings, "read", read, label, problems),
        }
        if isinstance(read, _Facts):
            replay.append((name, read))
            if read.in_recovery:
                primary_lsn = write.current_lsn if isinstance(write, _Facts) else None
                pairs[name]["read"]["replay_lag"] = _lag(read, primary_lsn)
    return {
        "status": "problem" if problems else "ok",
        "problems": problems,
        **pairs,
        "replicas": await _replicas_report(database, problems),
        "caller": _caller_report(state, route, settings, replay),
        "note": (
            "Each new connection through the read port may reach another replica; "
            "this shows the ones this check got."
        ),
    }


async def _replicas_report(database: Database, problems: list[str]) -> dict[str, Any]:
    """Every replica the primary streams to, as the primary sees it right now.

    Only reported: the app's own view (what its routing uses) is left alone, so
    this check changes nothing for the caller, its token included.
    """
    health = database.health
    benched = {name: round(left, 1) for name, left in health.bench.seconds_left().items()}
    try:
        primary_lsn, rows = await view_replicas(database.monitor_engine)
    except Exception as exc:
        return {"error": describe_error(exc, database.settings), "benched": benched}
    expected = health.expected_replicas
    streaming = [row for row in rows if row[1] == "streaming"]
    if expected is not None and len(streaming) < expected:
        problems.append(
            f"the primary streams to {len(streaming)} replica(s), RWDB_REPLICAS says "
            f"{expected}: tokens are kept until they expire"
        )
    return {
        "primary_lsn": format_lsn(primary_lsn),
        "expected": expected,
        "most_seen_streaming": health.most_replicas_seen,
        # Replicas passed over after no answer within the read deadline, and for how
        # many more seconds (RWDB_REPLICA_BENCH_SECONDS): this process's own view.
        "benched": benched,
        "list": [
            {
                "name": name,
                "state": state,
                "replay_lsn": format_lsn(replay),
                "lag_bytes": None if replay is None else max(0, primary_lsn - replay),
                # At least this far behind, from the app's recent looks at the
                # primary (resolution: RWDB_LAG_CHECK_INTERVAL; 0 when it has them all).
                "lag_seconds": None if replay is None else round(health.lag_seconds_of(replay), 3),
            }
            for name, state, replay in sorted(rows)
        ],
    }


def _side_report(
    settings: RWDBSettings, side: Side, probe: Probe, label: str, problems: list[str]
) -> dict[str, Any]:
    expected: Role = "primary" if side == "write" else "replica"
    report: dict[str, Any] = {"endpoint": settings.endpoint(side), "expected": expected}
    if isinstance(probe, BaseException):
        message = describe_error(probe, settings)
        problems.append(
            f"{label}: cannot connect to the {side} side ({report['endpoint']}): {message}"
        )
        return {**report, "reached": None, "as_expected": False, "error": message}
    report.update(
        reached=probe.role,
        as_expected=probe.role == expected,
        server_addr=probe.addr,
        server_port=probe.port,
        in_recovery=probe.in_recovery,
    )
    if side == "write":
        report["current_lsn"] = format_lsn(probe.current_lsn)
    else:
        report["replay_lsn"] = format_lsn(probe.replay_lsn if probe.in_recovery else None)
    if probe.role != expected:
        problems.append(f"{label}: {_wrong_role(settings, side, probe)}")
    return report


def _wrong_role(settings: RWDBSettings, side: Side, facts: _Facts) -> str:
    if side == "read":
        return (
            f"the read port ({settings.endpoint('read')}) reached a primary "
            f"({facts.server}), so reads are not offloaded: check HAProxy's /replica "
            "health check on the read backend, and that at least one replica is running "
            "(a primary listed as backup answers only when no replica is healthy)"
        )
    return (
        f"the write port ({settings.endpoint('write')}) reached a replica ({facts.server}), "
        "so every write will fail: check HAProxy's /primary health check on the write "
        "backend (after a failover it must follow the new leader)"
    )


def _lag(replica: _Facts, primary_lsn: int | None) -> dict[str, Any]:
    behind = None
    if primary_lsn is not None and replica.replay_lsn is not None:
        behind = max(0, primary_lsn - replica.replay_lsn)
    age = replica.replay_age
    return {
        # WAL the replica had still to replay when the primary's position was read.
        "bytes": behind,
        # Grows on a quiet primary too; "bytes" is what says whether it is behind.
        "seconds_since_last_replayed_transaction": None if age is None else round(age, 3),
    }


# -- the caller's read-your-writes pin ---------------------------------------------------


def _caller_report(
    state: RequestState | None,
    route: Route,
    settings: RWDBSettings,
    replicas: list[tuple[str, _Facts]],
) -> dict[str, Any]:
    mode = settings.pin_mode
    token = state.token if state is not None else None
    checked: list[dict[str, Any]] | None = None
    if token is not None and mode == "lsn":
        checked = [
            {
                "pair": pair,
                "server": facts.server,
                # A primary on the read port has everything (sessions treat it so too).
                "replayed": not facts.in_recovery
                or (facts.replay_lsn is not None and facts.replay_lsn >= token.lsn),
            }
            for pair, facts in replicas
        ]
    return {
        "pin_mode": mode,
        "in_request": state is not None,
        "token": token is not None,
        "token_lsn": format_lsn(token.lsn) if token is not None and mode == "lsn" else None,
        "token_expires_in_seconds": (
            max(0, round(token.expires - time.time())) if token is not None else None
        ),
        "replica_has_lsn": checked,
        "read_route": {
            "target": route.target,
            "reason": route.reason,
            "min_lsn": format_lsn(route.min_lsn),
        },
        "explanation": _explain_route(state, route, mode, checked),
    }


def _explain_route(
    state: RequestState | None,
    route: Route,
    mode: str,
    checked: list[dict[str, Any]] | None,
) -> str:
    if state is None:
        return (
            "no read-your-writes state: the middleware added by setup() is not in front of "
            "this route, so reads go to a replica"
        )
    if route.reason == "pinned":
        return (
            "you wrote recently and RWDB_PIN_MODE=window: the primary serves your reads "
            "until your token expires"
        )
    if route.min_lsn is not None:
        lsn = format_lsn(route.min_lsn)
        replayed = [c["server"] for c in checked or () if c["replayed"]]
        missing = [c["server"] for c in checked or () if not c["replayed"]]
        what = (
            "the primary's position RWDB_MAX_REPLICA_LAG seconds ago"
            if route.if_behind == "replica-lag"
            else "your last write"
        )
        summary = (
            f"a read session goes to a replica only if that replica has replayed {lsn} "
            f"({what}), else to the primary"
        )
        if not checked:
            return f"{summary}; this check could not reach a replica to compare"
        if not missing:
            return (
                f"{summary}; the replica(s) this check reached have, so your reads go to a "
                "replica; your token is cleared once every replica has it"
            )
        if not replayed:
            return (
                f"{summary}; the replica(s) this check reached have not yet, so a read now "
                "would go to the primary"
            )
        return (
            f"{summary}; of the replicas this check reached, {', '.join(replayed)} "
            f"have it and {', '.join(missing)} do not: the replica a read reaches decides"
        )
    if route.target == "primary":
        why = _PRIMARY_BECAUSE.get(route.reason, route.reason)
        return f"your reads go to the primary: {why}"
    if mode == "off":
        return "read-your-writes is off (RWDB_PIN_MODE=off): your reads go to a replica"
    return "no valid read-your-writes token was sent: your reads go to a replica"


_PRIMARY_BECAUSE = {
    "replica-down": (
        "the read side refused several connections in a row, and is tried again after "
        "RWDB_READ_RETRY_SECONDS"
    ),
    "replica-timeout": (
        "the replica gave no answer within the read deadline (RWDB_READ_TIMEOUT or the "
        "route's timeout=): its connection was discarded and the read ran on the primary"
    ),
    "replica-benched": (
        "every new read connection reached a replica benched for giving no answer within "
        "the read deadline (RWDB_REPLICA_BENCH_SECONDS)"
    ),
    "replica-unreachable": (
        "no connection to the read side could be opened for this read; the breaker "
        "sends later reads to the primary if it keeps failing"
    ),
    "replica-lag": "every replica is further behind than RWDB_MAX_REPLICA_LAG",
    "replica-behind": "a replica was found behind your last write earlier in this request",
    "wrote-in-request": "this request committed a write",
}
