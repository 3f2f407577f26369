"""What the registry tells the sessions it makes, through ``Session.info``.

``sessionmaker(info=...)`` is SQLAlchemy's way to give every session of a
maker the same settings, and a session's own ``info`` is where per-session
ones go. The keys are private to this module: the registry
(:class:`fastapi_rwdb.Database`) and the job scopes call the functions below,
the session classes read through them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ..routing.lsn import MAX_LSN
from ..routing.replicas import ReadSideHealth
from ..routing.request import RequestState, ServingDatabase
from ..routing.tokens import Token
from ..settings import Consistency, PinMode

logger = logging.getLogger("fastapi_rwdb")

_BINDS = "rwdb_read_binds"
_STATE = "rwdb_state"  # a RequestState of the session's own (a job's token, a fresh read)
_WAIT_MS = "rwdb_wait_ms"  # overrides RWDB_PIN_WAIT_MS for one session
_TIMEOUT = "rwdb_read_timeout"  # overrides RWDB_READ_TIMEOUT for one session
_PIN_MODE = "rwdb_pin_mode"  # on write sessions: RWDB_PIN_MODE, for the commit tracking
_WRITE_TIMEOUT = "rwdb_write_timeout"  # on write sessions: RWDB_WRITE_TIMEOUT (0: none)
_OWN_UNIT = "rwdb_own_unit"  # a write session that is a unit of work of its own


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
    timeout: float = 0.0  # RWDB_READ_TIMEOUT: each replica statement's deadline (0: none)

    @property
    def follows_reads(self) -> bool:
        """Session consistency: every read notes the position it saw."""
        return self.consistency == "session" and self.mode == "lsn"


# -- for the registry: a maker's settings ------------------------------------------------


def read_maker_info(binds: ReadBinds) -> dict[str, Any]:
    return {_BINDS: binds}


def write_maker_info(mode: PinMode, timeout: float = 0.0) -> dict[str, Any]:
    return {_PIN_MODE: mode, _WRITE_TIMEOUT: timeout}


# -- for the registry and the job scopes: one session's own ------------------------------


def give_state(info: dict[Any, Any], state: RequestState, wait_ms: int | None = None) -> None:
    """The read session routes by ``state`` instead of the request's (a job's token, a
    fresh read), waiting up to ``wait_ms`` for a replica when given."""
    info[_STATE] = state
    if wait_ms is not None:
        info[_WAIT_MS] = wait_ms


def read_after(
    info: dict[Any, Any], token: Token | None, wait: float, database: ServingDatabase
) -> None:
    """A job's read session routes by ``token`` (from ``after=``), waiting up to ``wait``
    seconds for a replica that has its position; ``None``: the token did not verify."""
    if token is None:
        # Not ours (another key, garbled): the position is unknown, so only the
        # primary is sure to have the write the job is about.
        logger.warning(
            "fastapi_rwdb: read session after= a token that does not verify "
            "(another RWDB_SECRET_KEY?); reading from the primary"
        )
        token = Token(lsn=MAX_LSN, expires=0)
        state = RequestState(token=token, replica_behind=True, database=database)
    else:
        state = RequestState(token=token, database=database)
    give_state(info, state, max(0, round(wait * 1000)))


def read_fresh(info: dict[Any, Any], wait: float | None, database: ServingDatabase) -> None:
    """A fresh read session: its position is the primary's, taken at its first read
    (:mod:`.reads`), waiting up to ``wait`` seconds (``RWDB_PIN_WAIT_MS`` when None)."""
    wait_ms = None if wait is None else max(0, round(wait * 1000))
    give_state(info, RequestState(fresh=True, database=database), wait_ms)


def give_timeout(info: dict[Any, Any], timeout: float | None) -> None:
    """The read session's replica statements get ``timeout`` seconds each instead of
    ``RWDB_READ_TIMEOUT`` (``None``: the setting; 0: no deadline)."""
    if timeout is not None:
        info[_TIMEOUT] = max(0.0, timeout)


def mark_own_unit(info: dict[Any, Any]) -> None:
    """The write session is a unit of work of its own (``get_write_db_context()``), as
    a job's is: its commits after a response has started are expected, not lost."""
    info[_OWN_UNIT] = True


# -- for the session classes ----------------------------------------------------------


def binds_of(session: Session) -> ReadBinds | None:
    binds: ReadBinds | None = session.info.get(_BINDS)
    return binds


def own_state(session: Session) -> RequestState | None:
    state: RequestState | None = session.info.get(_STATE)
    return state


def wait_ms_of(session: Session, binds: ReadBinds) -> int:
    wait: int = session.info.get(_WAIT_MS, binds.wait_ms)
    return wait


def timeout_of(session: Session, binds: ReadBinds) -> float:
    timeout: float = session.info.get(_TIMEOUT, binds.timeout)
    return timeout


def pin_mode_of(session: Session) -> PinMode:
    mode: PinMode = session.info.get(_PIN_MODE, "lsn")
    return mode


def write_timeout_of(session: Session) -> float | None:
    """The write side's deadline for what the package itself asks after a COMMIT."""
    timeout: float = session.info.get(_WRITE_TIMEOUT, 0.0)
    return timeout or None


def is_own_unit(session: Session) -> bool:
    return bool(session.info.get(_OWN_UNIT, False))
