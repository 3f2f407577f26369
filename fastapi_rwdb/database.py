"""The process-wide registry: settings, the engines (a write, a read and a
primary-read engine per driver) and their sessionmakers.

Everything is built on first use, so the dependencies work with nothing but the
``POSTGRES_*`` variables set, and nothing connects at import time. One
re-entrant lock guards the lazy construction: building the engines reads the
settings, which are lazy too, and a plain lock would deadlock right there.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from . import metrics, pools
from .binds import BINDS, PIN_MODE_INFO, STATE, WAIT_MS, ReadBinds
from .engines import (
    AsyncEnginePair,
    EnginePair,
    make_async_engine,
    make_async_engine_pair,
    make_async_primary_read_engine,
    make_engine_pair,
    make_primary_read_engine,
)
from .health import ReadSideHealth
from .lsn import MAX_LSN
from .sessions import read_class, session_classes, write_class
from .settings import RWDBSettings
from .state import RequestState, request_state
from .tokens import Token, TokenSigner, derive_key

logger = logging.getLogger("fastapi_rwdb")

_T = TypeVar("_T")
_S = TypeVar("_S", Session, AsyncSession)


@dataclass(frozen=True, slots=True)
class _Makers(Generic[_S]):
    """The sessionmakers of one driver."""

    write: Callable[[], _S]
    read: Callable[[], _S]
    primary_read: Callable[[], _S]


class Database:
    """Settings, engines and sessionmakers of one application.

    Most applications never touch this: :func:`fastapi_rwdb.setup` and the
    dependencies use the default instance. Build your own for tests or for a
    process that talks to two clusters.
    """

    def __init__(
        self,
        settings: RWDBSettings | None = None,
        *,
        session_class: type[Session] | None = None,
        async_session_class: type[AsyncSession] | None = None,
    ) -> None:
        self._session_class = session_class
        self._async_session_class = async_session_class
        self._lock = threading.RLock()
        # Built on first use: engines and sessionmakers, dropped by dispose() ...
        self._built: dict[str, Any] = {}
        # ... and what outlives the pools: the settings, the read side's health, and
        # the token signer (a new key would stop every token handed out from verifying).
        self._kept: dict[str, Any] = {} if settings is None else {"settings": settings}
        self._checked = False
        #: False once setup() has hooked this Database into an app's lifespan, True
        #: when that lifespan runs (or once the middleware has warned that it did not).
        self.lifespan_ok = True
        # The apps set up with this Database (weakly: an app that is gone owns nothing).
        self._apps: weakref.WeakSet[Any] = weakref.WeakSet()

    def __repr__(self) -> str:
        s = self._kept.get("settings")
        if s is None:
            return "<Database (settings not loaded yet)>"
        return f"<Database write={s.endpoint('write')} read={s.endpoint('read')}>"

    def _once(self, name: str, build: Callable[[], _T], *, keep: bool = False) -> _T:
        """``build()`` once, under the lock (re-entrant: building the engines reads the
        settings, which are built on first use too); ``keep``: survive dispose()."""
        store = self._kept if keep else self._built
        try:
            found: _T = store[name]
            return found
        except KeyError:
            pass
        with self._lock:
            if name not in store:
                store[name] = build()
            built: _T = store[name]
            return built

    @property
    def settings(self) -> RWDBSettings:
        return self._once("settings", RWDBSettings, keep=True)

    def check(self) -> RWDBSettings:
        """Load the settings now, and log once what is legal but probably a mistake."""
        settings = self.settings
        if not self._checked:
            self._checked = True
            for warning in settings.warnings():
                logger.warning("fastapi_rwdb: %s", warning)
        return settings

    @property
    def health(self) -> ReadSideHealth:
        """The read side's breaker and lag, shared by the sync and async read engines."""
        s = self.settings
        return self._once(
            "health",
            lambda: ReadSideHealth(
                s.read_fallback_after,
                s.read_retry_seconds,
                s.max_replica_lag,
                s.replicas,
                s.lag_check_interval,
            ),
            keep=True,
        )

    @property
    def signer(self) -> TokenSigner:
        """Signs read-your-writes tokens with ``RWDB_SECRET_KEY`` (or a key derived from the
        database credentials); ``RWDB_SECRET_KEY_FALLBACKS`` verify too."""
        return self._once("signer", lambda: TokenSigner(*_token_keys(self.settings)), keep=True)

    def token_for(self, lsn: int) -> str:
        """A signed read-your-writes token for ``lsn``, valid ``RWDB_PIN_SECONDS``."""
        expires = int(time.time() + self.settings.pin_seconds)
        return self.signer.dump(Token(lsn=lsn, expires=expires))

    def lifespan_missing(self, root_path: str) -> None:
        """Say, once, that requests arrive but setup()'s lifespan never ran."""
        self.lifespan_ok = True
        where = f"mounted at {root_path}" if root_path else "this app"
        logger.warning(
            "fastapi_rwdb: requests are arriving for the app %s, but the lifespan that "
            "setup() gave it never ran: %sits pools will not be disposed at shutdown. "
            "Starlette does not run the lifespan of a mounted app; run it from the outer "
            "app's lifespan with `async with fastapi_rwdb.lifespan(<the mounted app>): "
            "yield` (or serve the app with its lifespan on).",
            where,
            "no replica-lag watch is running, and "
            if self.settings.max_replica_lag is not None
            else "",
        )

    # -- engines -------------------------------------------------------------------

    @property
    def engines(self) -> EnginePair:
        """The psycopg pair; built on first use."""
        return self._once(
            "engines", lambda: _log_built(make_engine_pair(self.settings, self.health), self)
        )

    @property
    def async_engines(self) -> AsyncEnginePair:
        """The asyncpg pair; built on first use."""
        return self._once(
            "async_engines", lambda: make_async_engine_pair(self.settings, self.health)
        )

    @property
    def monitor_engine(self) -> AsyncEngine:
        """One connection to the primary for the background replica view.

        Its own, so that the view never takes a write connection from the app (a
        write must not wait behind it) and never counts in the app's pools.
        """
        return self._once(
            "monitor",
            lambda: make_async_engine(
                self.settings.url("write", "asyncpg"),
                self.settings,
                side="read",
                pool_size=1,
                max_overflow=0,
            ),
        )

    @property
    def primary_read_engine(self) -> Engine:
        """The psycopg engine of reads that must see the primary (a pool of its own)."""
        return self._once("primary_read", lambda: make_primary_read_engine(self.settings))

    @property
    def async_primary_read_engine(self) -> AsyncEngine:
        """The asyncpg engine of reads that must see the primary (a pool of its own)."""
        return self._once(
            "async_primary_read", lambda: make_async_primary_read_engine(self.settings)
        )

    def pool_stats(self) -> dict[str, Any]:
        """Every pool's size and use, read from memory; builds nothing."""
        return pools.pool_stats(self)

    def is_built(self, name: str) -> bool:
        return name in self._built

    @contextmanager
    def reading_from(self, engine: Engine, async_engine: AsyncEngine) -> Iterator[None]:
        """Read sessions made inside the block use these read engines (the routing,
        the tokens and the primary stay as they are); sessions made before keep theirs.

        For :mod:`fastapi_rwdb.testing`'s stale replica, whose read side is a snapshot
        of the primary. The caller disposes of the engines it passed.
        """
        sync, aio = self.engines, self.async_engines
        ours = EnginePair(sync.write, engine), AsyncEnginePair(aio.write, async_engine)
        with self._lock:
            names = ("engines", "async_engines", "makers", "async_makers")
            saved = {name: self._built.get(name) for name in names}
            self._built["engines"], self._built["async_engines"] = ours
            self._built.pop("makers", None)
            self._built.pop("async_makers", None)
        try:
            yield
        finally:
            with self._lock:
                restore = self._built.get("engines") is ours[0]
                if restore:
                    for name, value in saved.items():
                        if value is None:
                            self._built.pop(name, None)
                        else:
                            self._built[name] = value
            if not restore:
                # Disposed inside the block (an app's lifespan ended there): so are the
                # read engines set aside, as dispose() would have done.
                sync.read.dispose()
                aio.read.sync_engine.dispose(close=False)

    # -- sessionmakers ------------------------------------------------------------

    def _classes(self) -> tuple[type[Session], type[AsyncSession]]:
        sync_cls, async_cls = session_classes(self.settings.session_class)
        return self._session_class or sync_cls, self._async_session_class or async_cls

    def _read_binds(self, replica: Engine, primary: Engine, is_async: bool) -> dict[str, Any]:
        s = self.settings
        routing = ReadBinds(
            replica, primary, s.pin_mode, s.pin_wait_ms, is_async, self.health, s.consistency
        )
        return {BINDS: routing}

    def _sync_makers(self) -> _Makers[Session]:
        """The psycopg sessionmakers; building them builds no asyncpg engine."""

        def build() -> _Makers[Session]:
            sync_cls, _ = self._classes()
            read_cls, write_cls = read_class(sync_cls), write_class(sync_cls)
            pair, primary = self.engines, self.primary_read_engine
            write_info = {PIN_MODE_INFO: self.settings.pin_mode}
            return _Makers(
                write=sessionmaker(pair.write, class_=write_cls, info=write_info),
                read=sessionmaker(
                    pair.read, class_=read_cls, info=self._read_binds(pair.read, primary, False)
                ),
                # A read that must see the primary has a pool of its own, so it can never
                # take a write's connection; it runs READ ONLY, so a write in a read
                # session fails the same way whichever server it reached.
                primary_read=sessionmaker(primary, class_=read_cls),
            )

        return self._once("makers", build)

    def _async_makers(self) -> _Makers[AsyncSession]:
        """The asyncpg sessionmakers; building them builds no psycopg engine."""

        def build() -> _Makers[AsyncSession]:
            sync_cls, async_cls = self._classes()
            read_cls, write_cls = read_class(sync_cls), write_class(sync_cls)
            pair, primary = self.async_engines, self.async_primary_read_engine
            common: dict[str, Any] = {"class_": async_cls, "expire_on_commit": False}
            return _Makers(
                write=async_sessionmaker(
                    pair.write,
                    sync_session_class=write_cls,
                    info={PIN_MODE_INFO: self.settings.pin_mode},
                    **common,
                ),
                read=async_sessionmaker(
                    pair.read,
                    sync_session_class=read_cls,
                    info=self._read_binds(pair.read.sync_engine, primary.sync_engine, True),
                    **common,
                ),
                primary_read=async_sessionmaker(primary, sync_session_class=read_cls, **common),
            )

        return self._once("async_makers", build)

    # -- sessions -----------------------------------------------------------------

    def write_session(self) -> Session:
        """A session on the primary. The caller commits and closes it."""
        return self._sync_makers().write()

    def read_session(
        self,
        *,
        primary: bool = False,
        after: str | None = None,
        wait: float | None = None,
        fresh: bool = False,
    ) -> Session:
        """A read-only session on a replica, or on the primary when ``primary``.

        ``after``: a token from :func:`fastapi_rwdb.current_token`; the reads then
        go only to a replica that has replayed its position (waiting up to
        ``wait`` seconds for one, 1 by default), else to the primary.

        ``fresh``: the reads see every write committed anywhere before the
        session's first read: the primary's current WAL position is taken then,
        and a replica serves only once it has replayed it (waiting up to ``wait``
        seconds, ``RWDB_PIN_WAIT_MS`` by default), else the primary.
        """
        primary = primary or self._fresh_on_primary(fresh)
        makers = self._sync_makers()
        session = (makers.primary_read if primary else makers.read)()
        self._prepare_read(session.info, primary, after, wait, fresh)
        return session

    def async_write_session(self) -> AsyncSession:
        return self._async_makers().write()

    def async_read_session(
        self,
        *,
        primary: bool = False,
        after: str | None = None,
        wait: float | None = None,
        fresh: bool = False,
    ) -> AsyncSession:
        """The asyncpg twin of :meth:`read_session`."""
        primary = primary or self._fresh_on_primary(fresh)
        makers = self._async_makers()
        session = (makers.primary_read if primary else makers.read)()
        self._prepare_read(session.info, primary, after, wait, fresh)
        return session

    def _fresh_on_primary(self, fresh: bool) -> bool:
        # Without WAL positions (RWDB_PIN_MODE window or off) only the primary is fresh.
        return fresh and self.settings.pin_mode != "lsn"

    def _prepare_read(
        self,
        info: dict[Any, Any],
        primary: bool,
        after: str | None,
        wait: float | None,
        fresh: bool,
    ) -> None:
        if primary:
            # No routing to do: say so once, as the routed sessions do at their first read.
            metrics.record_route("primary", "primary-read")
        elif after is not None:
            self._read_after(info, after, 1.0 if wait is None else wait)
        elif fresh:
            info[STATE] = RequestState(fresh=True, database=self)
            if wait is not None:
                info[WAIT_MS] = max(0, round(wait * 1000))

    def _read_after(self, info: dict[Any, Any], after: str, wait: float) -> None:
        """Give a job's session a routing state of its own, holding ``after``'s position."""
        token = self.signer.load(after, max_age=self.settings.pin_seconds, check_expiry=False)
        if token is None:
            # Not ours (another key, garbled): the position is unknown, so only the
            # primary is sure to have the write the job is about.
            logger.warning(
                "fastapi_rwdb: read session after= a token that does not verify "
                "(another RWDB_SECRET_KEY?); reading from the primary"
            )
            token = Token(lsn=MAX_LSN, expires=0)
            info[STATE] = RequestState(token=token, replica_behind=True, database=self)
        else:
            info[STATE] = RequestState(token=token, database=self)
        info[WAIT_MS] = max(0, round(wait * 1000))

    # -- shutdown -----------------------------------------------------------------

    def _serves(self, app: Any) -> None:
        """``app`` uses this Database (``setup()``): its lifespan disposes of the pools
        at shutdown, and :func:`configure` must not do it behind its back."""
        self._apps.add(app)

    def _forget_engines(self) -> tuple[list[Engine], list[AsyncEngine]]:
        with self._lock:
            built, self._built = self._built, {}
        sync: list[Engine] = []
        aio: list[AsyncEngine] = []
        if (pair := built.get("engines")) is not None:
            sync += [pair.write, pair.read]
        if (engine := built.get("primary_read")) is not None:
            sync.append(engine)
        if (async_pair := built.get("async_engines")) is not None:
            aio += [async_pair.write, async_pair.read]
        if (async_engine := built.get("async_primary_read")) is not None:
            aio.append(async_engine)
        if (monitor := built.get("monitor")) is not None:
            aio.append(monitor)
        return sync, aio

    async def dispose(self) -> None:
        """Close every pooled connection; the engines rebuild themselves if used again."""
        sync, aio = self._forget_engines()
        for async_engine in aio:
            await async_engine.dispose()
        for engine in sync:
            engine.dispose()

    def dispose_sync(self) -> None:
        """:meth:`dispose` for code with no event loop (the async pools are dropped)."""
        sync, aio = self._forget_engines()
        for engine in sync:
            engine.dispose()
        for async_engine in aio:
            # Without a loop the async connections cannot be closed politely; drop them.
            async_engine.sync_engine.dispose(close=False)


def _log_built(pair: EnginePair, db: Database) -> EnginePair:
    s = db.settings
    logger.info(
        "fastapi_rwdb engines: write %s, read %s (pool %d, read pool %d)",
        s.endpoint("write"),
        s.endpoint("read"),
        s.pool_limits("write")[0],
        s.pool_limits("read")[0],
    )
    db.check()
    return pair


def _token_keys(settings: RWDBSettings) -> list[bytes]:
    """The signing key first, then the keys that still verify.

    With no ``RWDB_SECRET_KEY`` every process derives the same key from the
    database credentials, so tokens keep working across workers and pods with
    no setting; see :func:`fastapi_rwdb.tokens.derive_key`.
    """
    fallbacks = [key.encode() for key in settings.fallback_keys()]
    if settings.secret_key is not None:
        return [settings.secret_key.get_secret_value().encode(), *fallbacks]
    url = settings.url("write", "psycopg")
    password = url.password or ""
    if settings.pin_mode != "off" and not password:
        logger.warning(
            "fastapi_rwdb: RWDB_SECRET_KEY is not set and the database password is empty "
            "(trust authentication?), so the read-your-writes token key, derived from the "
            "user and database names, can be guessed. A forged token cannot read or change "
            "any data, nor touch other clients: it only sends its bearer's own reads to the "
            "primary. Set RWDB_SECRET_KEY to the same long random string on every process "
            "to rule that out."
        )
    derived = _derived_key(url.username or "", url.database or "", str(password))
    return [derived, *fallbacks]


@functools.lru_cache(maxsize=8)
def _derived_key(user: str, database: str, password: str) -> bytes:
    # Cached: the derivation is slow on purpose, and tests build many Databases.
    return derive_key(user, database, password)


_default = Database()
_default_lock = threading.Lock()


def get_database() -> Database:
    """The :class:`Database` the dependencies and scopes use.

    Inside a request, the one of the app serving it (its middleware says which,
    so two apps set up with different settings can share a process); elsewhere
    the process-wide one that :func:`configure` (and so ``setup()``) installs.
    """
    state = request_state.get()
    if state is not None and state.database is not None:
        return state.database
    return _default


def configure(database: Database | RWDBSettings | None = None) -> Database:
    """Replace the process-wide :class:`Database` (before serving requests).

    Settings are loaded and checked right away, so a bad configuration stops
    start-up instead of the first request. The one replaced is disposed of,
    unless an app set up with it still serves requests with it (its middleware
    says which Database to use): that app's lifespan disposes of it at shutdown.
    """
    global _default
    if not isinstance(database, Database):
        database = Database(database)
    database.check()
    with _default_lock:
        old, _default = _default, database
    if old is not database and old._built and not old._apps:
        old.dispose_sync()
    return database


@contextmanager
def using(database: Database) -> Iterator[Database]:
    """Make ``database`` the process-wide :class:`Database` for a ``with`` block,
    then put the previous one back, even if the block raises.

    For tests and scripts that need another cluster or other settings for a
    while. Nothing is disposed of on the way in or out: ``database`` is the
    caller's to dispose of. Requests still use their own app's Database. The
    default is one per process, not per thread or task: blocks in concurrent
    threads or tasks would swap it under each other.
    """
    global _default
    with _default_lock:
        previous, _default = _default, database
    try:
        yield database
    finally:
        with _default_lock:
            _default = previous
