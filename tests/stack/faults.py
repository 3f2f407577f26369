"""Grey faults on the shared stack: a node's PgBouncer frozen (SIGSTOP), as a
stopped proxy or a host stalled on I/O looks to a client (its kernel still
completes TCP handshakes and takes bytes; nothing answers).

The freeze is undone in a ``finally`` (SIGCONT), and, should the test process be
killed inside the block (a timeout, Ctrl-C twice), by a dead-man switch: a
detached ``sh`` started with the freeze continues the PgBouncer after
``at_most`` seconds whatever becomes of the test. The stack is shared: a
PgBouncer left stopped would break everyone's runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STACK_DIR = Path(os.environ.get("RWDB_STACK_DIR", "/var/tmp/rwdb-stack"))  # noqa: S108 (stack.sh)
BOUNCER_PORTS = {"node1": 16432, "node2": 16433, "node3": 16434}  # scripts/stack.sh


def bouncer_pid(node: str) -> int:
    return int((STACK_DIR / node / "pgbouncer.pid").read_text().split()[0])


@contextlib.contextmanager
def frozen_bouncer(node: str, *, at_most: float = 60.0) -> Iterator[int]:
    """``node``'s PgBouncer stopped for the block (yields its pid), continued after it,
    and in any case after ``at_most`` seconds."""
    pid = bouncer_pid(node)
    with stopped([pid], at_most=at_most):
        yield pid


def postgres_pids(node: str) -> list[int]:
    """``node``'s postmaster and every process it started (backends, WAL receiver, ...)."""
    postmaster = int((STACK_DIR / node / "data" / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(
        ["pgrep", "-P", str(postmaster)], capture_output=True, text=True, check=False
    ).stdout.split()
    return [postmaster, *map(int, children)]


@contextlib.contextmanager
def stalled_postgres(node: str, *, at_most: float = 60.0) -> Iterator[list[int]]:
    """``node``'s whole PostgreSQL stopped for the block, as a host stalled on I/O looks:
    connections stay open, nothing answers, a new connection is never served."""
    pids = postgres_pids(node)
    with stopped(pids, at_most=at_most):
        yield pids


@contextlib.contextmanager
def slowed_bouncer(
    node: str, *, stop: float = 0.05, run: float = 0.05, at_most: float = 60.0
) -> Iterator[int]:
    """``node``'s PgBouncer stopped ``stop`` s out of every ``stop + run`` s for the block:
    it answers everything, slowly."""
    pid = bouncer_pid(node)
    done = threading.Event()

    def cycle() -> None:
        while not done.is_set():
            os.kill(pid, signal.SIGSTOP)
            time.sleep(stop)
            os.kill(pid, signal.SIGCONT)
            done.wait(run)

    with stopped([pid], at_most=at_most):  # the dead-man switch, for the cycle's pauses
        os.kill(pid, signal.SIGCONT)
        worker = threading.Thread(target=cycle, daemon=True)
        worker.start()
        try:
            yield pid
        finally:
            done.set()
            worker.join()


@contextlib.contextmanager
def stopped(pids: list[int], *, at_most: float) -> Iterator[None]:
    """``pids`` stopped (SIGSTOP) for the block and continued after it, and in any case
    after ``at_most`` seconds, by a detached ``sh`` that outlives a killed test run."""
    listed = " ".join(map(str, pids))
    switch = subprocess.Popen(
        ["/bin/sh", "-c", f"sleep {at_most:.1f}; kill -CONT {listed}"],
        start_new_session=True,  # outlives a killed test run
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        switch.kill()
        switch.wait()


def bouncer_url(node: str) -> str:
    """The app role on ``node``'s own PgBouncer (no HAProxy: this very node)."""
    return (
        f"postgresql://{os.environ['POSTGRES_USER']}:{os.environ['POSTGRES_PASSWORD']}"
        f"@127.0.0.1:{BOUNCER_PORTS[node]}/{os.environ['POSTGRES_DB']}"
    )


async def read_one(
    database: Any, driver: str, statement: Any, params: Any, *, timeout: float
) -> Any:
    """One row of ``statement`` in a read session of ``database`` on ``driver``
    ("psycopg" or "asyncpg") whose statements each get ``timeout`` seconds."""
    if driver == "psycopg":
        with database.read_session(timeout=timeout) as s:
            return s.execute(statement, params).one()
    async with database.async_read_session(timeout=timeout) as a:
        return (await a.execute(statement, params)).one()
