"""Where a read session may go, and what it carries to decide: kept in ``Session.info``.

The registry (:mod:`fastapi_rwdb.database`) puts a :class:`ReadBinds` in each read
sessionmaker's ``info``; the session classes (:mod:`fastapi_rwdb.sessions`,
:mod:`fastapi_rwdb.conflicts`) read it. Its own module, so that neither of them
imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from .health import ReadSideHealth
from .settings import Consistency, PinMode

#: Session.info keys.
BINDS = "rwdb_read_binds"
STATE = "rwdb_state"  # a RequestState of the session's own (a job's token)
WAIT_MS = "rwdb_wait_ms"  # overrides RWDB_PIN_WAIT_MS for one session
PIN_MODE_INFO = "rwdb_pin_mode"  # on write sessions: RWDB_PIN_MODE, for the commit tracking


@dataclass(frozen=True, slots=True)
class ReadBinds:
    """Where a read session may go; for async sessions, the async engines' sync sides."""

    replica: Engine
    primary: Engine  # the primary-read engine: its own pool, READ ONLY transactions
    mode: PinMode
    wait_ms: int
    is_async: bool
    health: ReadSideHealth | None = None
    consistency: Consistency = "read-your-writes"
