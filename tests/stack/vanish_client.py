"""The client side of tests/stack/test_vanished_peer.py, run inside a private network
namespace: engines made by the package (psycopg and asyncpg) connect to 127.0.0.1:PORT of
that namespace, which a relay carries to the stack's read port. It prints "ready", waits
for "go" (the namespace's loopback has been taken down: every packet is now dropped, no
FIN, no RST), then reports as JSON how long each kind of connection took to fail:

- ``inflight``: a statement sent after the peer vanished (bounded by TCP_USER_TIMEOUT);
- ``idle``: a connection left idle, used after ``IDLE_WAIT`` seconds (keepalives should
  have dropped it by then: the statement fails at once).

A connection still without an answer after ``CAP`` seconds is reported as ``null``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from typing import Any

from sqlalchemy import text

from fastapi_rwdb import RWDBSettings, make_async_engine, make_engine

CAP = float(os.environ.get("VANISH_CAP", "12"))
IDLE_WAIT = 6.0
SELECT = text("SELECT 1")


def settings() -> RWDBSettings:
    options = json.loads(os.environ["VANISH_OPTIONS"])
    e = os.environ
    url = (
        f"postgresql://{e['POSTGRES_USER']}:{e['POSTGRES_PASSWORD']}@127.0.0.1:"
        f"{e['VANISH_PORT']}/{e['POSTGRES_DB']}"
    )
    return RWDBSettings(write_url=url, read_url=url, connect_retries=0, **options)


def timed_sync(conn: Any, results: dict[str, Any], key: str) -> None:
    started = time.monotonic()
    try:
        conn.execute(SELECT)
        results[key] = {"answered": True}
    except Exception as exc:
        results[key] = {
            "seconds": round(time.monotonic() - started, 2),
            "error": type(exc).__name__,
        }


async def timed_async(conn: Any) -> dict[str, Any]:
    started = time.monotonic()
    try:
        await conn.execute(SELECT)
        return {"answered": True}
    except Exception as exc:
        return {"seconds": round(time.monotonic() - started, 2), "error": type(exc).__name__}


def in_thread(conn: Any, results: dict[str, Any], key: str) -> threading.Thread:
    thread = threading.Thread(target=timed_sync, args=(conn, results, key), daemon=True)
    thread.start()
    return thread


async def main() -> None:
    s = settings()
    url = s.url("read", "psycopg")
    sync_engine = make_engine(url, s, side="read")
    async_engine = make_async_engine(s.url("read", "asyncpg"), s, side="read")
    sync_busy, sync_idle = sync_engine.connect(), sync_engine.connect()
    async_busy, async_idle = await async_engine.connect(), await async_engine.connect()
    for conn in (sync_busy, sync_idle):
        conn.execute(SELECT)
    for aconn in (async_busy, async_idle):
        await aconn.execute(SELECT)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("expected go")
    results: dict[str, Any] = {}
    started = time.monotonic()
    busy = in_thread(sync_busy, results, "psycopg_inflight")
    async_task = asyncio.ensure_future(timed_async(async_busy))
    await asyncio.sleep(IDLE_WAIT)
    idle = in_thread(sync_idle, results, "psycopg_idle")
    async_idle_task = asyncio.ensure_future(timed_async(async_idle))
    done, _ = await asyncio.wait({async_task, async_idle_task}, timeout=CAP)
    results["asyncpg_inflight"] = async_task.result() if async_task in done else None
    results["asyncpg_idle"] = async_idle_task.result() if async_idle_task in done else None
    for thread in (busy, idle):
        thread.join(max(0.0, started + IDLE_WAIT + CAP - time.monotonic()))
    for key in ("psycopg_inflight", "psycopg_idle"):
        results.setdefault(key, None)
    print(json.dumps(results), flush=True)
    os._exit(0)  # connections still hung cannot be closed politely


if __name__ == "__main__":
    asyncio.run(main())
