"""What a driver's error says: its SQLSTATE, and which ones mean what to this package.

psycopg and asyncpg report the same server errors differently, and SQLAlchemy
wraps both; everything here looks through the wrapping. One place for the
codes, so that retrying a connect, answering with a 503 and retrying a read
agree on what each one means.
"""

from __future__ import annotations

import asyncpg  # type: ignore[import-untyped]
import psycopg

from ..errors import RWDBError
from ..settings import RWDBSettings

#: How much of a driver's message a report or a log line quotes.
_ERROR_CHARS = 240

#: The transaction is read-only: a write in a read session, or on a demoted primary.
READ_ONLY_SQLSTATE = "25006"
#: The server (or the proxy in front of it) is shutting down, restarting, or out of
#: connection slots for a moment: worth another try.
SERVER_GOING_AWAY = frozenset({"57P01", "57P02", "57P03", "53300"})
#: The server cancelled a statement at its ``statement_timeout``: a busy server, not a
#: frozen one (a read's deadline, engine/deadline.py).
STATEMENT_TIMEOUT = "57014"
#: A replica cancelled a query to go on replaying WAL (snapshot, lock or buffer-pin
#: conflict with recovery).
REPLAY_CONFLICT = frozenset({"40001", "40P01"})


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver error, wrapped by SQLAlchemy or not."""
    for candidate in (exc, getattr(exc, "orig", None), exc.__cause__):
        code = getattr(candidate, "sqlstate", None)
        if isinstance(code, str):
            return code
    return None


def is_out_of_step(exc: BaseException) -> bool:
    """Whether the driver lost its place in the conversation with the server, wrapped by
    SQLAlchemy or not. A backend ended between two statements sends its FATAL error
    unasked, and PgBouncer one of its own, before the socket closes; what the driver
    then says is no SQLSTATE but its own confusion: asyncpg's ``InternalClientError``
    (its protocol waits for a message that never comes and fails every later command,
    COMMIT included, before sending it), psycopg's ``InternalError`` "received 2
    results from command" (a BEGIN, SAVEPOINT or ROLLBACK sent on its own, as when
    SQLAlchemy first looks at a new connection, answered by both errors; the wording
    is psycopg's, held by ``tests/stack/test_terminated_backends.py``). Nothing on
    such a connection can be trusted: it is discarded as a lost one is."""
    chain = [exc]  # SQLAlchemy's error, its DBAPI adapter's, the driver's: a few links
    for candidate in chain:
        if isinstance(candidate, asyncpg.exceptions.InternalClientError):
            return True
        if (
            isinstance(candidate, psycopg.InternalError)
            and candidate.sqlstate is None
            and str(candidate).startswith("received ")
        ):
            return True
        for inner in (getattr(candidate, "orig", None), candidate.__cause__):
            if isinstance(inner, BaseException) and inner not in chain and len(chain) < 8:
                chain.append(inner)
    return False


def is_connection_failure(code: str | None) -> bool:
    """Class 08 (connection exception) or a server going away."""
    return code is not None and (code.startswith("08") or code in SERVER_GOING_AWAY)


def brief(exc: BaseException) -> str:
    """Error class and first line, for the log: enough to diagnose, no DSN (the drivers
    never print the password)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def describe_error(exc: BaseException, settings: RWDBSettings) -> str:
    """Error class and the first line of the driver's message, secrets masked."""
    inner: BaseException = exc
    orig = getattr(exc, "orig", None)  # SQLAlchemy's wrapper around the driver's error
    if isinstance(orig, BaseException):
        inner = orig
    elif isinstance(exc, RWDBError) and exc.__cause__ is not None:
        inner = exc.__cause__  # ours, raised from the driver's error
    lines = str(inner).strip().splitlines()
    first = lines[0].strip() if lines else ""
    if len(first) > _ERROR_CHARS:
        first = first[: _ERROR_CHARS - 3] + "..."
    for secret in _secrets(settings):
        first = first.replace(secret, "***")
    return f"{type(inner).__name__}: {first}" if first else type(inner).__name__


def _secrets(settings: RWDBSettings) -> list[str]:
    found = []
    for value in (settings.password, settings.write_url, settings.read_url):
        if value is not None and value.get_secret_value():
            found.append(value.get_secret_value())
    for side in ("write", "read"):
        password = settings.url(side, "psycopg").password
        if password:
            found.append(str(password))
    return sorted(set(found), key=len, reverse=True)  # whole URLs before their parts
