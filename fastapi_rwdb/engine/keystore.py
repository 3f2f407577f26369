"""The token signing key kept in the database, so that no setting is needed and no
token says anything about the database password.

With no ``RWDB_SECRET_KEY``, the processes of a deployment still share one thing,
the primary: the first process to need a key generates a random one and stores it
in the one-row table ``rwdb_token_key`` (``CREATE TABLE IF NOT EXISTS``, then
``INSERT ... ON CONFLICT DO NOTHING``: whoever loses the race reads the winner's
key). It is read on the primary through the write URL, one short transaction per
step (PgBouncer's transaction mode is fine), on a throwaway connection of its own:
nothing of the application's pools, tracking or request state is involved.

When it is fetched: ``setup()`` runs at import, often before the database is up,
so it fetches nothing. The app's lifespan starts fetching the key at start-up,
in the background (bounded by ``RWDB_CONNECT_TIMEOUT``: a database that is down
does not hold up the start); code in a worker thread (sync
routes, jobs) fetches it on first use if it is still unknown; the event loop
never waits on a blocking call. While the key is unknown (the database was down
at start-up), the middleware starts another attempt at most once a second in the
background (only a response that carries a new token waits for it), and meanwhile:

- a token that is well formed and unexpired is trusted without its signature
  check: the worst a forger gains is primary reads for himself, which is what a
  token gives anyway, and a genuine client keeps reading its own writes;
- a write is never left without a token: it is signed with the key derived from
  the credentials (scrypt), with a warning; every process accepts that key when
  verifying, so the client stays pinned wherever its next request lands.

The derived key also signs everything when the table cannot be created nor read
(a role without ``CREATE`` on its schema, a read-only transaction): that is
logged once as a warning that names the fix (create the table once as the owner,
or set ``RWDB_SECRET_KEY``).

Rotation: put the stored key in ``RWDB_SECRET_KEY_FALLBACKS``, delete the row,
restart the processes: they generate and store a new one, and tokens signed with
the old one keep verifying.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

from ..routing.tokens import Token, TokenSigner, derive_key, load_unverified
from ..settings import RWDBSettings
from .factory import connect_args
from .sqlstates import brief, sqlstate_of

logger = logging.getLogger("fastapi_rwdb")

TABLE = "rwdb_token_key"
_SELECT = text("SELECT key FROM rwdb_token_key WHERE id = 1")
_CREATE = text(
    "CREATE TABLE IF NOT EXISTS rwdb_token_key (id smallint PRIMARY KEY CHECK (id = 1), "
    "key text NOT NULL, created timestamptz NOT NULL DEFAULT now())"
)
_INSERT = text("INSERT INTO rwdb_token_key (id, key) VALUES (1, :key) ON CONFLICT (id) DO NOTHING")
#: The table is missing and this role may not create it, or the server is read-only:
#: trying again will not help.
_CANNOT_CREATE = frozenset({"42501", "25006", "42P01"})
#: Two processes created the table at once: the loser sees one of these; read again.
_RACE = frozenset({"23505", "42P07"})
_RETRY_EVERY = 1.0  # seconds between attempts while the key is unknown


class KeyStoreUnusable(Exception):
    """The table can be neither read nor created with this role."""


def _new_key() -> str:
    # Text, not bytes: an operator copies it into RWDB_SECRET_KEY_FALLBACKS to rotate.
    return secrets.token_urlsafe(32)


def _after_failed_read(exc: DBAPIError) -> None:
    """A missing table is created next; a role that may not read it never will."""
    code = sqlstate_of(exc)
    if code == "42501":
        raise KeyStoreUnusable(brief(exc)) from None
    if code != "42P01":
        raise exc


def _after_failed_create(exc: DBAPIError) -> None:
    """Another process won the race: read again; anything else that cannot change: give up."""
    code = sqlstate_of(exc)
    if code in _CANNOT_CREATE:
        raise KeyStoreUnusable(brief(exc)) from None
    if code not in _RACE:
        raise exc


def _fetch_sync(conn: Connection) -> str:
    for _ in range(3):
        try:
            with conn.begin():
                found = conn.execute(_SELECT).scalar()
            if found is not None:
                return str(found)
        except DBAPIError as exc:
            _after_failed_read(exc)
        try:
            with conn.begin():
                conn.execute(_CREATE)
                conn.execute(_INSERT, {"key": _new_key()})
                found = conn.execute(_SELECT).scalar()
            if found is not None:
                return str(found)
        except DBAPIError as exc:
            _after_failed_create(exc)
    raise KeyStoreUnusable("the key row could not be read back")


async def _fetch_async(conn: AsyncConnection) -> str:
    for _ in range(3):
        try:
            async with conn.begin():
                found = (await conn.execute(_SELECT)).scalar()
            if found is not None:
                return str(found)
        except DBAPIError as exc:
            _after_failed_read(exc)
        try:
            async with conn.begin():
                await conn.execute(_CREATE)
                await conn.execute(_INSERT, {"key": _new_key()})
                found = (await conn.execute(_SELECT)).scalar()
            if found is not None:
                return str(found)
        except DBAPIError as exc:
            _after_failed_create(exc)
    raise KeyStoreUnusable("the key row could not be read back")


class SigningKeys:
    """The token signer of one Database, once its key is known.

    ``current()`` never blocks; ``load()`` may (worker threads only);
    ``await load_async()`` on the event loop.
    """

    def __init__(self, settings: RWDBSettings) -> None:
        self._settings = settings
        self._fallbacks = [key.encode() for key in settings.fallback_keys()]
        self._lock = threading.Lock()
        self._signer: TokenSigner | None = None
        self._derived_signer: TokenSigner | None = None
        self._failed_at = -_RETRY_EVERY  # the last attempt that failed (not one under way)
        self._loading: asyncio.Task[TokenSigner | None] | None = None
        self._warned = False
        if settings.secret_key is not None:
            key = settings.secret_key.get_secret_value().encode()
            self._signer = TokenSigner(key, *self._fallbacks)

    def __repr__(self) -> str:
        state = "known" if self._signer is not None else "unknown"
        return f"<SigningKeys {state}>"

    def current(self) -> TokenSigner | None:
        """The signer if the key is known, else ``None``; never blocks."""
        return self._signer

    def known(self) -> TokenSigner | None:
        """The signer if its key is known, fetching it first when called off the event
        loop (a worker thread may block; the loop must not): ``None`` while unknown."""
        signer = self._signer
        if signer is None and not _on_event_loop() and self.may_retry():
            signer = self.load()
        return signer

    def signer(self) -> TokenSigner:
        """The signer to sign with: the known key, else the derived one (warned)."""
        signer = self.known()
        if signer is None:
            signer = self.derived_signer("the database could not be reached")
        return signer

    def verify(self, raw: str | None, max_age: float, *, check_expiry: bool = True) -> Token | None:
        """``TokenSigner.load`` with the known key; while it is unknown, the token is
        taken at its word (format and expiry only: see the module docstring)."""
        signer = self.known()
        if signer is None:
            return load_unverified(raw, max_age, check_expiry=check_expiry)
        return signer.load(raw, max_age=max_age, check_expiry=check_expiry)

    def _derived(self) -> bytes:
        url = self._settings.url("write", "psycopg")
        return derive_key(url.username or "", url.database or "", str(url.password or ""))

    def _stored(self, key: str) -> TokenSigner:
        # The derived key verifies too: tokens signed with it while the stored key was
        # out of reach must keep their clients pinned; nothing is signed with it here.
        # Not with an empty password: that key could be computed from the names alone.
        extra = [self._derived()] if self._settings.url("write", "psycopg").password else []
        signer = TokenSigner(key.encode(), *self._fallbacks, *extra)
        self._signer = signer
        return signer

    def derived_signer(self, reason: str) -> TokenSigner:
        """Signs with the derived key (a last resort), and says so once."""
        if self._derived_signer is None:
            self._derived_signer = TokenSigner(self._derived(), *self._fallbacks)
        if not self._warned:
            self._warned = True
            logger.warning(
                "fastapi_rwdb: the read-your-writes token key could not be read from the "
                "database table %s (%s), so tokens are signed with a key derived from the "
                "database password: a token then lets its holder test password guesses "
                "offline. Set RWDB_SECRET_KEY to the same long random string on every "
                "process, or create the table once as its schema's owner (the role only "
                "needs SELECT on it afterwards).%s",
                TABLE,
                reason,
                ""
                if self._settings.url("write", "psycopg").password
                else " The password is empty (trust authentication?), so that key can be "
                "guessed from the user and database names: a forged token cannot read or "
                "change any data, nor touch other clients; it only sends its bearer's own "
                "reads to the primary.",
            )
        return self._derived_signer

    def _unusable(self, exc: KeyStoreUnusable) -> TokenSigner:
        signer = self.derived_signer(str(exc))
        self._signer = signer
        return signer

    def load(self) -> TokenSigner | None:
        """Fetch the key now, blocking (never call this on the event loop)."""
        with self._lock:
            if self._signer is not None:
                return self._signer
            s = self._settings
            engine = create_engine(
                s.url("write", "psycopg"),
                poolclass=NullPool,
                connect_args=connect_args("psycopg", s),
            )
            try:
                with engine.connect() as conn:
                    return self._stored(_fetch_sync(conn))
            except KeyStoreUnusable as exc:
                return self._unusable(exc)
            except Exception as exc:
                self._failed(exc)
                return None
            finally:
                engine.dispose()

    async def load_async(self) -> TokenSigner | None:
        """Fetch the key without blocking the loop, bounded by the connect timeout;
        concurrent callers share one attempt."""
        if self._signer is not None:
            return self._signer
        return await asyncio.shield(self._start())

    def load_in_background(self) -> None:
        """Start an attempt unless one is under way or one failed in the last second;
        the caller does not wait for it."""
        if self._signer is None and self.may_retry():
            self._start()

    def stop(self) -> None:
        """Cancel an attempt under way (the app is shutting down)."""
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()

    def _start(self) -> asyncio.Task[TokenSigner | None]:
        loading = self._loading
        # A task of another loop (a test's, long closed) cannot be awaited here.
        if (
            loading is None
            or loading.done()
            or loading.get_loop() is not asyncio.get_running_loop()
        ):
            loading = self._loading = asyncio.ensure_future(self._attempt())
        return loading

    async def _attempt(self) -> TokenSigner | None:
        s = self._settings
        engine = create_async_engine(
            s.url("write", "asyncpg"),
            poolclass=NullPool,
            connect_args=connect_args("asyncpg", s),
        )
        try:
            async with asyncio.timeout(s.connect_timeout + 1):
                async with engine.connect() as conn:
                    key = await _fetch_async(conn)
            return self._stored(key)
        except KeyStoreUnusable as exc:
            return self._unusable(exc)
        except Exception as exc:
            self._failed(exc)
            return None
        finally:
            await engine.dispose()

    def _failed(self, exc: Exception) -> None:
        """An attempt (sync or async) that could not reach the key: said, and the next
        one held back a second."""
        self._failed_at = time.monotonic()
        logger.warning("fastapi_rwdb: cannot read the token key yet (%s)", brief(exc))

    def may_retry(self) -> bool:
        """Whether a request may start another attempt: at most one a second after one
        failed. Not held back by one under way: a worker thread that signs while the
        lifespan's background attempt is still running fetches the key itself rather
        than sign with the derived key (the first write after startup did)."""
        return time.monotonic() - self._failed_at >= _RETRY_EVERY


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
