"""Shared pieces: the stack's address and nodes (the tests use them too), the benchmark
table, a bare ASGI driver, statistics, and what machine and software a run was made on."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
from dotenv import dotenv_values
from sqlalchemy import BigInteger, Column, DateTime, MetaData, Table, Text, func

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
OUT_DIR = BENCH_DIR / "out"
STACK = ROOT / "scripts" / "stack.sh"

# The local stack's address: .env.example's values, shared with the tests (which import
# this module for it); a developer's own environment wins.
for _name, _value in dotenv_values(ROOT / ".env.example").items():
    if _value is not None:
        os.environ.setdefault(_name, _value)

# scripts/stack.sh: each node's own PostgreSQL, for asking one node directly.
NODE_PORTS = {"node1": 15432, "node2": 15433, "node3": 15434}

SECRET_KEY = "benchmark-secret-key-0123456789abcdef"
TABLE = "rwdb_bench_items"

metadata = MetaData()
items = Table(
    TABLE,
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("client", Text, nullable=False),
    Column("payload", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), server_default=func.now()),
)


def env(name: str) -> str:
    return os.environ[name]


def dsn(port_var: str = "POSTGRES_PORT") -> str:
    """The app role's conninfo for the port in the environment variable ``port_var``."""
    return node_dsn(int(env(port_var)))


def node_dsn(port: int, user: str = "", password: str = "") -> str:
    """Conninfo for ``port`` on the stack's host (a node's own PostgreSQL: NODE_PORTS),
    as the app role unless ``user`` and ``password`` are given."""
    return (
        f"host={env('POSTGRES_SERVER')} port={port} user={user or env('POSTGRES_USER')} "
        f"password={password or env('POSTGRES_PASSWORD')} dbname={env('POSTGRES_DB')} "
        "connect_timeout=5"
    )


def replica_nodes() -> list[str]:
    """The nodes in recovery, by name, asked of each node directly (which node is the
    primary changes: tests switch over)."""
    found = []
    for name, port in NODE_PORTS.items():
        with psycopg.connect(node_dsn(port), prepare_threshold=None) as conn:
            if conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,):
                found.append(name)
    return found


def prepare_table(seed_rows: int = 0) -> list[int]:
    """Create the benchmark table on the primary; add ``seed_rows`` rows and return their ids."""
    with psycopg.connect(dsn(), prepare_threshold=None, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} ("
            " id bigserial PRIMARY KEY, client text NOT NULL, payload text NOT NULL,"
            " created_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_client ON {TABLE} (client, id)")
        if not seed_rows:
            return []
        rows = conn.execute(
            f"INSERT INTO {TABLE} (client, payload)"
            " SELECT 'seed', md5(g::text) FROM generate_series(1, %s) g RETURNING id",
            (seed_rows,),
        ).fetchall()
    return [int(r[0]) for r in rows]


def wait_replicas_have(ids: Sequence[int], timeout: float = 30.0) -> None:
    """Block until a few fresh connections to the read port all see the last id."""
    deadline = time.monotonic() + timeout
    last = max(ids)
    while True:
        seen = 0
        for _ in range(4):  # HAProxy round-robins connections over the replicas
            with psycopg.connect(dsn("POSTGRES_READ_PORT"), prepare_threshold=None) as conn:
                row = conn.execute(f"SELECT 1 FROM {TABLE} WHERE id = %s", (last,)).fetchone()
                seen += row is not None
        if seen == 4:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the replicas did not catch up with the seed rows")
        time.sleep(0.2)


def replica_delay() -> str:
    """``recovery_min_apply_delay`` as a replica reports it (another engineer may set it)."""
    with psycopg.connect(dsn("POSTGRES_READ_PORT"), prepare_threshold=None) as conn:
        row = conn.execute("SHOW recovery_min_apply_delay").fetchone()
    return str(row[0]) if row else "?"


def stack(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(  # noqa: S603 - our own script, fixed arguments
        ["bash", str(STACK), *args],  # noqa: S607
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.stdout


def check_stack(timeout: float = 90.0) -> None:
    """The write port reaches a primary and the read port a replica (others share the
    stack and may be failing nodes over: wait a little for it to settle)."""
    deadline = time.monotonic() + timeout
    problem = ""
    while time.monotonic() < deadline:
        try:
            roles = []
            for port in ("POSTGRES_PORT", "POSTGRES_READ_PORT"):
                with psycopg.connect(dsn(port), prepare_threshold=None) as conn:
                    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                    roles.append(bool(row and row[0]))
            if roles == [False, True]:
                return
            problem = f"write port in recovery: {roles[0]}, read port in recovery: {roles[1]}"
        except psycopg.OperationalError as exc:
            problem = f"not reachable ({type(exc).__name__})"
        time.sleep(2)
    raise SystemExit(
        f"the local stack is not ready: {problem}; see bash scripts/stack.sh status "
        "(start it with: bash scripts/stack.sh up)"
    )


@contextlib.contextmanager
def replica_lag(delay: str) -> Iterator[None]:
    """``stack.sh lag DELAY`` for the block; always ``lag 0`` afterwards, whatever happens."""
    try:
        stack("lag", delay)
        yield
    finally:
        stack("lag", "0")


@contextlib.contextmanager
def replica_paused() -> Iterator[str]:
    """One replica's WAL replay paused for the block (the other stays current); the
    paused node's name is yielded. Always resumed afterwards, whatever happens."""
    replicas = replica_nodes()
    if not replicas:
        raise RuntimeError("no replica to pause")
    node = replicas[0]
    try:
        stack("pause-replay", node)
        yield node
    finally:
        stack("resume-replay", "all")


# ------------------------------------------------------------------ a bare ASGI driver

Headers = list[tuple[bytes, bytes]]


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self) -> None:
        self.status = 0
        self.headers: Headers = []
        self.body = b""

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


async def call(
    app: Any, method: str, path: str, headers: Headers | None = None, body: bytes = b""
) -> Response:
    """One HTTP request straight into an ASGI app: no sockets, no HTTP parsing, no client
    library, so the figures are the app's own (and the same for every variant)."""
    response = Response()
    done = asyncio.Event()
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            response.status = message["status"]
            response.headers = list(message.get("headers", ()))
        elif message["type"] == "http.response.body":
            response.body += message.get("body", b"")
            if not message.get("more_body", False):
                done.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench"), *(headers or ())],
        "client": ("127.0.0.1", 50000),
        "server": ("bench", 80),
    }
    await app(scope, receive, send)
    return response


# ------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in 0..100."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and extremes of per-round figures."""
    return {
        "median": statistics.median(values),
        "p25": percentile(values, 25),
        "p75": percentile(values, 75),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


# ------------------------------------------------------------ machine and versions


def _run(*cmd: str) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)  # noqa: S603
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (done.stdout or done.stderr).strip()


def environment() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    versions = {}
    for dist in ("fastapi", "starlette", "sqlalchemy", "psycopg", "asyncpg", "sqlmodel", "httpx"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "-"
    try:
        with psycopg.connect(dsn(), prepare_threshold=None) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            versions["postgresql"] = str(row[0]) if row else "?"
    except psycopg.Error:
        versions["postgresql"] = "?"
    versions["pgbouncer"] = (
        _run("pgbouncer", "--version").splitlines()[0].removeprefix("PgBouncer ")
    )
    haproxy = _run("haproxy", "-v").splitlines()[0]
    versions["haproxy"] = haproxy.split()[2] if haproxy.startswith("HAProxy version") else haproxy
    versions["python"] = platform.python_version()
    head = _run("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD")
    dirty = _run("git", "-C", str(ROOT), "status", "--porcelain", "--", "fastapi_rwdb")
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "versions": versions,
        "git": head + (" + uncommitted changes in fastapi_rwdb/" if dirty else ""),
    }


def save(part: str, data: dict[str, Any]) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{part}.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def load(part: str) -> dict[str, Any] | None:
    path = OUT_DIR / f"{part}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())  # type: ignore[no-any-return]
