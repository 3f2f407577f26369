"""The process-wide registry: settings, the engines (a write, a read and a
primary-read engine per driver) and their sessionmakers.

Everything is built on first use, so the dependencies work with nothing but the
``POSTGRES_*`` variables set, and nothing connects at import time. One
re-entrant lock guards the lazy construction: building the engines reads the
settings, which are lazy too, and a plain lock would deadlock right there.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from . import stand_ins
from .engine.factory import (
    AsyncEnginePair,
    EnginePair,
    make_async_engine,
    make_async_engine_pair,
    make_async_primary_read_engine,
    make_engine_pair,
    make_primary_read_engine,
)
from .engine.keystore import SigningKeys
from .engine.pool import pools_report
from .observe import metrics
from .orm.classes import session_classes
from .orm.makers import Makers, async_makers, sync_makers
from .orm.session_info import ReadBinds, give_timeout, read_after, read_fresh, write_maker_info
from .routing.bench import ReplicaBench
from .routing.replicas import ReadSideHealth
from .routing.tokens import Token, TokenSigner
from .settings import RWDBSettings
from .stand_ins import StandIn

logger = logging.getLogger("fastapi_rwdb")

_T = TypeVar("_T")


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
        # ... and what outlives the pools: the settings, the read side's health, the
        # token key (a new key would stop every token handed out from verifying).
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
                bench=ReplicaBench(s.replica_bench_seconds),
            ),
            keep=True,
        )

    @property
    def signing_keys(self) -> SigningKeys:
        """``RWDB_SECRET_KEY``, or the key kept in the database (:mod:`.engine.keystore`)."""
        return self._once("keys", lambda: SigningKeys(self.settings), keep=True)

    @property
    def signer(self) -> TokenSigner:  # RWDB_SECRET_KEY_FALLBACKS verify too
        return self.signing_keys.signer()

    def token_for(self, lsn: int) -> str:
        """A signed read-your-writes token for ``lsn``, valid ``RWDB_PIN_SECONDS``."""
        return self.signer.dump(Token(lsn, int(time.time() + self.settings.pin_seconds)))

    # -- engines -------------------------------------------------------------------

    @property
    def engines(self) -> EnginePair:
        """The psycopg pair; built on first use. Its read engine is the stand-in's while
        one replaces this cluster's read side (:mod:`fastapi_rwdb.stand_ins`)."""
        pair = self._once(
            "engines", lambda: _log_built(make_engine_pair(self.settings, self.health), self)
        )
        stand_in = self.stand_in()
        return pair if stand_in is None else EnginePair(pair.write, stand_in.sync)

    @property
    def async_engines(self) -> AsyncEnginePair:
        """The asyncpg pair; built on first use (a stand-in's read engine as above)."""
        pair = self._once(
            "async_engines", lambda: make_async_engine_pair(self.settings, self.health)
        )
        stand_in = self.stand_in()
        return pair if stand_in is None else AsyncEnginePair(pair.write, stand_in.aio)

    def stand_in(self) -> StandIn | None:
        """The engines standing in for this cluster's read side now, if any."""
        if not stand_ins.generation:
            return None  # none was ever set in this process
        endpoint = self._once("endpoint", lambda: self.settings.endpoint("write"), keep=True)
        return stand_ins.for_endpoint(endpoint)

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
        """The six pools, read from memory (the body of ``GET {prefix}/pool-stats``);
        builds nothing: see :func:`fastapi_rwdb.engine.pool.pools_report`."""
        built = self._built
        sync, aio = built.get("engines"), built.get("async_engines")
        primary, async_primary = built.get("primary_read"), built.get("async_primary_read")
        return pools_report(
            self.settings,
            sync=(sync and sync.write, sync and sync.read, primary),
            aio=(
                aio and aio.write.sync_engine,
                aio and aio.read.sync_engine,
                async_primary and async_primary.sync_engine,
            ),
        )

    def is_built(self, name: str) -> bool:
        return name in self._built

    # -- sessionmakers ------------------------------------------------------------

    def _classes(self) -> tuple[type[Session], type[AsyncSession]]:
        sync_cls, async_cls = session_classes(self.settings.session_class)
        return self._session_class or sync_cls, self._async_session_class or async_cls

    def _binds(self, replica: Engine, primary: Engine, is_async: bool) -> ReadBinds:
        s = self.settings
        args = (s.pin_mode, s.pin_wait_ms, is_async, self.health, s.consistency, s.read_timeout)
        return ReadBinds(replica, primary, *args)

    def _sync_makers(self) -> Makers[Session]:
        """The psycopg sessionmakers; building them builds no asyncpg engine."""

        def build() -> Makers[Session]:
            base, _ = self._classes()
            pair, primary = self.engines, self.primary_read_engine
            binds = self._binds(pair.read, primary, False)
            info = write_maker_info(self.settings.pin_mode, self.settings.write_timeout)
            return sync_makers(base, pair.write, binds, write_info=info)

        return self._once_per_stand_in("makers", build)

    def _async_makers(self) -> Makers[AsyncSession]:
        """The asyncpg sessionmakers; building them builds no psycopg engine."""

        def build() -> Makers[AsyncSession]:
            base, async_class = self._classes()
            pair, primary = self.async_engines, self.async_primary_read_engine
            binds = self._binds(pair.read.sync_engine, primary.sync_engine, True)
            info = write_maker_info(self.settings.pin_mode, self.settings.write_timeout)
            return async_makers(
                base, async_class, pair.write, pair.read, primary, binds, write_info=info
            )

        return self._once_per_stand_in("async_makers", build)

    def _once_per_stand_in(self, name: str, build: Callable[[], _T]) -> _T:
        """:meth:`_once`, built again when a stand-in for the read side comes or goes."""
        generation = stand_ins.generation
        found: tuple[int, _T] | None = self._built.get(name)
        if found is not None and found[0] == generation:
            return found[1]
        with self._lock:
            found = self._built.get(name)
            if found is None or found[0] != generation:
                found = self._built[name] = (generation, build())
            return found[1]

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
        timeout: float | None = None,
    ) -> Session:
        """A read-only session on a replica, or on the primary when ``primary``.

        ``after``: a token from :func:`fastapi_rwdb.current_token`; the reads then
        go only to a replica that has replayed its position (waiting up to
        ``wait`` seconds for one, 1 by default), else to the primary.

        ``fresh``: the reads see every write committed anywhere before the
        session's first read: the primary's current WAL position is taken then,
        and a replica serves only once it has replayed it (waiting up to ``wait``
        seconds, ``RWDB_PIN_WAIT_MS`` by default), else the primary. ``timeout``:
        each replica statement's deadline, instead of ``RWDB_READ_TIMEOUT``.
        """
        primary = primary or self._fresh_on_primary(fresh)
        makers = self._sync_makers()
        session = (makers.primary_read if primary else makers.read)()
        give_timeout(session.info, timeout)
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
        timeout: float | None = None,
    ) -> AsyncSession:
        """The asyncpg twin of :meth:`read_session`."""
        primary = primary or self._fresh_on_primary(fresh)
        makers = self._async_makers()
        session = (makers.primary_read if primary else makers.read)()
        give_timeout(session.info, timeout)
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
            token = self.signing_keys.verify(after, self.settings.pin_seconds, check_expiry=False)
            read_after(info, token, 1.0 if wait is None else wait, self)
        elif fresh:
            read_fresh(info, wait, self)

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
