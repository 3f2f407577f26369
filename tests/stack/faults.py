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
from collections.abc import Iterator
from pathlib import Path

STACK_DIR = Path(os.environ.get("RWDB_STACK_DIR", "/var/tmp/rwdb-stack"))  # noqa: S108 (stack.sh)
BOUNCER_PORTS = {"node1": 16432, "node2": 16433, "node3": 16434}  # scripts/stack.sh


def bouncer_pid(node: str) -> int:
    return int((STACK_DIR / node / "pgbouncer.pid").read_text().split()[0])


@contextlib.contextmanager
def frozen_bouncer(node: str, *, at_most: float = 60.0) -> Iterator[int]:
    """``node``'s PgBouncer stopped for the block (yields its pid), continued after it,
    and in any case after ``at_most`` seconds."""
    pid = bouncer_pid(node)
    switch = subprocess.Popen(
        ["/bin/sh", "-c", f"sleep {at_most:.1f}; kill -CONT {pid}"],
        start_new_session=True,  # outlives a killed test run
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        os.kill(pid, signal.SIGSTOP)
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)
        switch.kill()
        switch.wait()


def bouncer_url(node: str) -> str:
    """The app role on ``node``'s own PgBouncer (no HAProxy: this very node)."""
    return (
        f"postgresql://{os.environ['POSTGRES_USER']}:{os.environ['POSTGRES_PASSWORD']}"
        f"@127.0.0.1:{BOUNCER_PORTS[node]}/{os.environ['POSTGRES_DB']}"
    )
