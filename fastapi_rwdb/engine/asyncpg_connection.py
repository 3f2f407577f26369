"""The package's asyncpg connection class: what rides in the messages of BEGIN and COMMIT.

SQLAlchemy's asyncpg adapter sends ``BEGIN`` and ``COMMIT`` through the connection's
``execute`` (asyncpg's transaction object does), in the simple query protocol, which
takes several statements in one message. Three things ride along, each saving a
round trip:

- a read transaction's ``SET LOCAL statement_timeout`` (:mod:`.deadline`) goes in
  the message of its ``BEGIN``;
- a tracked write's ``COMMIT`` reads the primary's WAL position after it, in the
  same message, as psycopg's does (:mod:`fastapi_rwdb.orm.writes`);
- a read with a token opens its transaction with the replica's position read in
  the ``BEGIN``'s message, as psycopg's does (:func:`begin_reading`, called by
  :func:`fastapi_rwdb.engine.wire.begin_reading_position`).

The last two are the trick of this module. asyncpg returns no rows from a simple
query, so the answer comes back as the one row of a ``COPY ... TO STDOUT`` sent
in the same message: ``COMMIT; COPY (SELECT pg_current_wal_lsn()) TO STDOUT``,
through what asyncpg's private ``Connection._copy_out`` calls (its public
``copy_from_query`` calls that after wrapping the query, which would wrap the
``COMMIT`` too): the protocol object's ``copy_out``. asyncpg's COPY state
discards the completion messages of the commands that come before the COPY's.
Were a release to stop doing so, a COMMIT that went through could be reported as
failed, so the behaviour is not assumed: the first connection the process opens
is asked, outside any transaction, ``BEGIN; COMMIT; COPY (SELECT 'ok') TO
STDOUT`` (:func:`probe`); only when the row comes back is a message sent this
way; otherwise the answer is read in a round trip of its own, as before.
``tests/stack/test_asyncpg_commit.py`` checks the messages against the stack.

A read's ``BEGIN`` and its deadline's ``SET LOCAL`` need not wait for an answer of
their own either: asyncpg waits for the ``BEGIN``'s before it sends the first
statement, a round trip in which the server has nothing to say but "done". The
``BEGIN`` is kept instead, and written on the socket just before the first
statement's describe step, as extended-protocol messages without a Sync (Parse,
Bind, Execute of the unnamed statement, each): the server runs them in order and
their answers (ParseComplete, BindComplete, CommandComplete) come before the
statement's; asyncpg's describe step passes over messages it does not expect (its
read buffer discards what a state does not consume). Should the ``BEGIN`` fail, its
error is the describe step's, which then sends the Sync that ends the error, as for
any statement that fails there. The choke point is asyncpg's private
``Connection._get_statement`` (every statement with parameters, ``prepare``,
``fetch``, ``executemany`` pass through it, as long as no statement cache is on:
the ``BEGIN`` is kept only then, as behind PgBouncer); a simple query or a COPY
sent instead carries the kept ``BEGIN`` in its own message, and a ``ROLLBACK`` or
``COMMIT`` of a transaction that never reached the server sends nothing. Only a
read's ``BEGIN`` (one that carries the deadline's ``SET LOCAL``) is kept: a
statement that passed by the choke point would run outside the transaction,
harmless on a replica, not for a write. Asked of the first connection as the COPY
is (:func:`probe`: the statement must see the ``SET LOCAL`` and find itself in the
transaction); otherwise the ``BEGIN`` is sent as before.

The package's COPYs return one short row, which asyncpg hands to a sink with the
socket's reading paused (back-pressure for a slow sink: the event loop's selector
changed twice, two system calls; benchmarks/peers.md has what it cost). The package's
sink never waits, so it is sent with that pause and its resume made no-ops on the
connection's transport for the COPY (:func:`_reading_unpaused`): asyncpg wakes the
COPY's task before the event loop reads the socket again, and the task asks for
the next data before it gives the loop back, so no data can arrive with nobody
waiting. A transport whose methods cannot be replaced (uvloop's) keeps the pause.
``tests/stack/test_asyncpg_commit.py`` reads a COPY of a few megabytes this way.

A read with a token may have the replica's position checked the same way: the
check is a third command kept with the ``BEGIN`` (:meth:`PackageConnection.begin_with_check`),
and, as the describe step reads no rows, it answers by failing when the replica is
short (:meth:`fastapi_rwdb.engine.checkout.PositionCheck.failing_query`): the
statement is then never run, and the read session routes it again.
"""

from __future__ import annotations

import functools
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any, TypeGuard

import asyncpg  # type: ignore[import-untyped]

logger = logging.getLogger("fastapi_rwdb")

#: What asyncpg's transaction object sends to commit (``Transaction._make_commit_query``).
_COMMIT = "COMMIT;"
_PROBE = "BEGIN; COMMIT; COPY (SELECT 'ok') TO STDOUT"
COMMIT_READING_POSITION = "COMMIT; COPY (SELECT pg_current_wal_lsn()) TO STDOUT"

#: Whether this process's asyncpg answers commands with a COPY after them as expected:
#: None until the first connection is asked (:func:`probe`).
_commit_with_copy: bool | None = None
#: Whether a read's BEGIN may wait to ride with its first statement (the module's doc):
#: None until the first connection is asked (:func:`probe`).
_begin_ahead: bool | None = None
#: What asyncpg's transaction object sends to end a transaction.
_ENDS = frozenset({"COMMIT;", "ROLLBACK;"})
_PROBE_TIMEOUT = "SET LOCAL statement_timeout = 4321"


class PackageConnection(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's connection, whose next ``BEGIN`` may carry a statement and a query, or
    wait to ride with the first statement, and whose next ``COMMIT`` may read the WAL
    position after it, in the same message."""

    rwdb_pending: str | None = None  # sent after the next BEGIN
    rwdb_begin_copies: tuple[str, float | None] | None = None  # see begin_reading
    rwdb_begin_copied: str | None = None
    rwdb_commit_reads_position: bool = False
    rwdb_committed_at: str | None = None  # what the last such COMMIT read
    rwdb_ahead: tuple[str, bytes] | None = None  # a kept BEGIN: as text, as messages
    rwdb_keep: bool = False  # keep the next BEGIN (it carries a position check)

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        if not args:
            pending, copies = self.rwdb_pending, self.rwdb_begin_copies
            if (pending or copies) and query.lstrip().upper().startswith("BEGIN"):
                keep, self.rwdb_keep = self.rwdb_keep, False
                self.rwdb_pending = self.rwdb_begin_copies = None
                query = query.rstrip().rstrip(";") + (f"; {pending}" if pending else "")
                if copies is None and pending and (keep or self.can_keep_begin()):
                    # (a check names its position: not one for the cache of the others)
                    messages = _as_messages(query) if keep else _cached_messages(query)
                    self.rwdb_ahead = (query, messages)
                    return "BEGIN"
                if copies is None:
                    query += ";"
                else:
                    sql, copy_timeout = copies
                    line = await _copy_out(self, f"{query}; {sql}", copy_timeout)
                    self.rwdb_begin_copied = line
                    return "BEGIN"
            elif self.rwdb_ahead is not None:
                kept, self.rwdb_ahead = self.rwdb_ahead[0], None
                if query in _ENDS:  # the transaction never reached the server
                    return query.rstrip(";")
                query = f"{kept}; {query}"
            elif self.rwdb_commit_reads_position and query == _COMMIT:
                self.rwdb_commit_reads_position = False
                self.rwdb_committed_at = await _copy_out(self, COMMIT_READING_POSITION, timeout)
                return "COMMIT"
        result: str = await super().execute(query, *args, timeout=timeout)
        return result

    def can_keep_begin(self) -> bool:
        """Whether the next ``BEGIN`` may wait to ride with the first statement."""
        # Not with a statement cache: a cached statement is bound and run without
        # passing _get_statement (nor does SQLAlchemy's own cache, which the package
        # turns on and off with asyncpg's: RWDB_PREPARED_STATEMENTS). Not while a
        # cancellation is on its way: asyncpg waits for it before the describe step.
        # (Cancellations only end between a session's BEGIN and its first statement:
        # a yes asked then still holds when the BEGIN goes.)
        return bool(_begin_ahead) and not (self._stmt_cache_enabled or self._cancellations)

    def caches_statements(self) -> bool:
        """Whether asyncpg's statement cache is on: no ``BEGIN`` is ever kept then."""
        return bool(self._stmt_cache_enabled)

    def begin_with_check(self, commands: str) -> None:
        """Send ``commands`` (``SET LOCAL ...; SELECT <check>``) with the next ``BEGIN``,
        kept for the first statement (asked :meth:`can_keep_begin` just before)."""
        self.rwdb_pending, self.rwdb_keep = commands, True

    def forget_begin(self) -> None:
        """Nothing rides with the next ``BEGIN``: the connection went back to the pool
        with a transaction that never began (a check must not reach another's)."""
        self.rwdb_pending, self.rwdb_keep = None, False

    async def _get_statement(self, *args: Any, **kwargs: Any) -> Any:
        # asyncpg's private choke point of every statement sent with the extended
        # protocol (see the module's doc); nothing is awaited between here and the
        # describe step's own write.
        ahead = self.rwdb_ahead
        if ahead is not None:
            self.rwdb_ahead = None
            if not self.is_closed():
                self._transport.write(ahead[1])
        return await super()._get_statement(*args, **kwargs)

    async def _copy_out(self, *args: Any, **kwargs: Any) -> Any:
        ahead = self.rwdb_ahead
        if ahead is not None:  # (not sent this way by the package: its own round trip)
            self.rwdb_ahead = None
            await super().execute(ahead[0])
        return await super()._copy_out(*args, **kwargs)


def _as_messages(commands: str) -> bytes:
    """``commands`` (``BEGIN ...; SET LOCAL ...``) as extended-protocol messages, each a
    Parse, Bind and Execute of the unnamed statement and portal, with no Sync."""
    out = bytearray()
    for command in commands.split("; "):
        query = command.encode() + b"\0"
        out += b"P" + struct.pack("!i", 4 + 1 + len(query) + 2) + b"\0" + query + b"\0\0"
        out += b"B" + struct.pack("!i", 12) + b"\0\0" + b"\0\0\0\0\0\0"  # no formats, params
        out += b"E" + struct.pack("!i", 9) + b"\0" + struct.pack("!i", 0)  # every row
    return bytes(out)


#: A read's BEGIN and deadline are the same few texts: built once each.
_cached_messages = functools.lru_cache(maxsize=64)(_as_messages)


def begin_ahead() -> bool:
    """Whether a read's ``BEGIN`` can wait for its first statement (the probe said so)."""
    return bool(_begin_ahead)


def is_ours(raw: Any) -> TypeGuard[PackageConnection]:
    """Whether ``raw`` is a :class:`PackageConnection` (``isinstance`` cannot say:
    asyncpg's connection metaclass answers True for any asyncpg connection)."""
    return PackageConnection in type(raw).__mro__


async def _copy_out(raw: Any, sql: str, timeout: float | None) -> str | None:
    """The first line a simple-query message ending in ``COPY ... TO STDOUT`` returns.

    Sent through the connection's protocol object, as ``Connection._copy_out`` sends
    it once it has told a path, a file and a function apart (an exception raised and
    caught on every call: a tenth of the COPY's cost in CPU); through
    ``Connection._copy_out`` when a kept ``BEGIN`` must ride along (never the case for
    the package's own COPYs)."""
    kept = getattr(raw, "rwdb_ahead", None) is not None
    copy = raw._copy_out if kept else raw._protocol.copy_out
    sink = _Lines()
    with _reading_unpaused(raw._transport):
        await copy(sql, sink, timeout)
    return sink.first()


async def first_copied_line(
    copy: Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[Any]],
) -> str | None:
    """The first line of what ``copy`` (an asyncpg COPY ... TO STDOUT, given the sink
    for its data) sends, as text; ``None`` for no row or a NULL."""
    sink = _Lines()
    await copy(sink)
    return sink.first()


class _Lines:
    """A COPY's sink (asyncpg awaits what calling it returns): keeps what arrives,
    never waits (see the module's doc on the paused reading)."""

    __slots__ = ("chunks",)

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    async def __call__(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    def first(self) -> str | None:
        """The first line, as text; ``None`` for no row or a NULL."""
        line = b"".join(self.chunks).split(b"\n", 1)[0].decode()
        return None if line in ("", "\\N") else line


def _nothing() -> None:
    return None


class _reading_unpaused:
    """For a COPY whose sink never waits: the transport's ``pause_reading`` and
    ``resume_reading`` do nothing meanwhile (see the module's doc)."""

    __slots__ = ("replaced", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport, self.replaced = transport, False

    def __enter__(self) -> None:
        try:
            self.transport.pause_reading = self.transport.resume_reading = _nothing
            self.replaced = True
        except AttributeError:  # no instance attributes (uvloop): asyncpg pauses
            pass

    def __exit__(self, *exc: object) -> None:
        if self.replaced:
            del self.transport.pause_reading, self.transport.resume_reading


async def probe(raw: Any) -> None:
    """Ask, once per process, on a new connection outside any transaction, whether a
    COMMIT can carry the position read, and whether a BEGIN can ride with the first
    statement (see the module's docstring)."""
    global _commit_with_copy, _begin_ahead
    if _commit_with_copy is not None or not is_ours(raw):
        return
    try:
        works = await _copy_out(raw, _PROBE, None) == "ok"
    except (AttributeError, asyncpg.exceptions.InternalClientError) as exc:
        works = False
        logger.info("fastapi_rwdb: asyncpg cannot read the WAL position with COMMIT (%r)", exc)
    except Exception:
        return
    _commit_with_copy = works
    _begin_ahead = await _ahead_works(raw)


async def _ahead_works(raw: PackageConnection) -> bool:
    """Whether a kept BEGIN reaches the server with the next statement, which then sees
    its ``SET LOCAL`` inside the transaction."""
    global _begin_ahead
    _begin_ahead = True
    try:
        raw.rwdb_pending = _PROBE_TIMEOUT
        await raw.execute("BEGIN READ ONLY;")
        seen = await raw.fetchval("SELECT current_setting('statement_timeout') || $1::text", "")
        works = seen == "4321ms" and bool(raw.is_in_transaction())
    except Exception as exc:
        works = False
        logger.info("fastapi_rwdb: asyncpg sends each BEGIN in a round trip of its own (%r)", exc)
    finally:
        raw.rwdb_pending = raw.rwdb_ahead = None
    if raw.is_in_transaction():
        await raw.execute("ROLLBACK;")  # (an error here fails the connect, as the COPY's)
    return works


async def begin_reading(
    raw: PackageConnection,
    start: Callable[[], Awaitable[None]],
    query: str,
    then: str | None,
    timeout: float | None,
) -> tuple[bool, str | None]:
    """Open ``raw``'s transaction by awaiting ``start()`` (SQLAlchemy's adapter, whose
    asyncpg transaction object sends the ``BEGIN`` through :meth:`PackageConnection.execute`),
    with ``then`` and ``COPY (query) TO STDOUT`` in the BEGIN's message: one round
    trip. Whether that was done (the probe said yes, and the ``BEGIN`` came through
    :meth:`PackageConnection.execute`), and the COPY's first line (tab-separated
    columns). ``timeout``: asyncpg's, for the whole message."""
    if not _commit_with_copy:
        return False, None
    raw.rwdb_pending = then
    raw.rwdb_begin_copies = (f"COPY ({query}) TO STDOUT", timeout)
    try:
        await start()
        sent = raw.rwdb_begin_copies is None
    finally:
        raw.rwdb_pending = raw.rwdb_begin_copies = None
    line, raw.rwdb_begin_copied = raw.rwdb_begin_copied, None
    return sent, line


def arm(raw: Any) -> bool:
    """Make ``raw``'s next COMMIT read the WAL position after it; False when it cannot."""
    if not (_commit_with_copy and is_ours(raw)):
        return False
    raw.rwdb_commit_reads_position = True
    raw.rwdb_committed_at = None
    return True


def committed_at(raw: PackageConnection) -> tuple[bool, str | None]:
    """Whether ``raw``'s armed COMMIT was sent, and the position it read; disarms."""
    sent = not raw.rwdb_commit_reads_position
    raw.rwdb_commit_reads_position = False
    position, raw.rwdb_committed_at = raw.rwdb_committed_at, None
    return sent, position
