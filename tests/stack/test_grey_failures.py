"""Grey failures (issue 20): a replica's PgBouncer that stops answering without
closing anything (SIGSTOP: its kernel still completes TCP handshakes and takes
bytes), as a stopped proxy or a host stalled on I/O looks to a client.

Run under the machine-wide lock like every stack test; each freeze is undone
whatever the test does (see :mod:`.faults`).
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text

from fastapi_rwdb import DatabaseUnavailableError, RWDBSettings, make_engine

from ..helpers import replica_nodes
from .faults import bouncer_url, frozen_bouncer

pytestmark = pytest.mark.stack


def bouncer_settings(node: str, **overrides: object) -> RWDBSettings:
    url = bouncer_url(node)
    return RWDBSettings(write_url=url, read_url=url, **overrides)  # type: ignore[arg-type]


FREEZE = 8.0  # seconds: well beyond every deadline below


def test_the_checkout_ping_has_a_deadline_and_never_hands_out_what_timed_out() -> None:
    """Issue 20, item 4. A pooled connection whose PgBouncer froze: its checkout ping
    gives up after RWDB_CONNECT_TIMEOUT, the connection is discarded (never handed
    out), and the new one the pool opens in its place meets the same frozen path and
    is an outage: all of it well within the freeze. (Before: psycopg's ping waited
    for an answer until the freeze ended.)"""
    node = replica_nodes()[0]
    settings = bouncer_settings(node, connect_timeout=1, connect_retries=0, ping_skip_ms=0)
    engine = make_engine(settings.url("read", "psycopg"), settings, side="read")
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_is_in_recovery()")).scalar_one() is True
            pooled = conn.connection.dbapi_connection
        assert pooled is not None and not pooled.closed
        with frozen_bouncer(node, at_most=FREEZE + 5):
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailableError), engine.connect():
                pass
            took = time.monotonic() - started
            assert pooled.closed, "the connection whose ping timed out was kept"
            time.sleep(max(0.0, FREEZE - (time.monotonic() - started)))
        # ping (1 s) + one connect attempt (1 s), with room for a slow machine
        assert took < 4.0, f"the checkout took {took:.1f} s"
        with engine.connect() as conn:  # the path is back: a new connection serves
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
            assert conn.connection.dbapi_connection is not pooled
    finally:
        engine.dispose()
