"""Engine factories that are safe behind PgBouncer in transaction mode.

Public on purpose: an application's own engines (Alembic, scripts, test
fixtures) need the same connection arguments, or they fail with
``prepared statement "_pg3_0" already exists`` the first time PgBouncer hands
them another client's server connection.

What each engine does around its connections (retry, ping, read-only, errors)
is attached by :func:`.events.instrument`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..routing.replicas import ReadSideHealth
from ..settings import Driver, RWDBSettings, Side
from ..settings_values import parse_url
from .events import ROLE_OPTION, instrument
from .pool import AsyncIdleClosingQueuePool, IdleClosingQueuePool
from .sockets import libpq_params

__all__ = [
    "AsyncEnginePair",
    "EnginePair",
    "connect_args",
    "make_async_engine",
    "make_async_engine_pair",
    "make_async_primary_read_engine",
    "make_engine",
    "make_engine_pair",
    "make_primary_read_engine",
]


def connect_args(driver: Driver, settings: RWDBSettings) -> dict[str, Any]:
    """DBAPI connect arguments for one driver.

    Unless ``RWDB_PREPARED_STATEMENTS`` is on, every server-side statement
    cache is off: PgBouncer in transaction mode gives each transaction any
    server connection, and a statement prepared on one is missing (or
    duplicated) on the next. On psycopg they also carry the TCP keepalives and
    ``tcp_user_timeout`` (asyncpg takes none: :mod:`.events` sets them on its socket).
    """
    if driver == "psycopg":
        args: dict[str, Any] = {
            "connect_timeout": max(1, round(settings.connect_timeout)),
            "application_name": settings.application_name,
            **libpq_params(settings),
        }
        if not settings.prepared_statements:
            args["prepare_threshold"] = None
        return args
    args = {
        "timeout": settings.connect_timeout,
        "server_settings": {"application_name": settings.application_name},
    }
    if not settings.prepared_statements:
        args["statement_cache_size"] = 0
        args["prepared_statement_cache_size"] = 0
    return args


def _pool_args(side: Side, settings: RWDBSettings, kwargs: dict[str, Any]) -> dict[str, Any]:
    if "poolclass" in kwargs:
        # The caller's own pool (NullPool for Alembic or a test's throwaway engine)
        # may take none of the queue pool's sizes; pre-ping is the package's own.
        return {"pool_pre_ping": settings.pool_pre_ping}
    size, overflow = settings.pool_limits(side)
    return {
        "pool_size": size,
        "max_overflow": overflow,
        "pool_timeout": settings.pool_timeout,
        "pool_recycle": settings.pool_recycle,
        # Done by the package's own checkout ping (checkout.py), not SQLAlchemy's.
        "pool_pre_ping": settings.pool_pre_ping,
        "idle_timeout": settings.pool_idle_seconds,
    }


def _with_pool_class(options: dict[str, Any], is_async: bool) -> dict[str, Any]:
    """The package's pool (pool.py) unless the caller chose another pool class."""
    if options.get("poolclass") is None:
        options["poolclass"] = AsyncIdleClosingQueuePool if is_async else IdleClosingQueuePool
    else:  # the caller's pool knows nothing of the idle timeout
        options.pop("idle_timeout", None)
    return options


def make_engine(
    url: str | URL,
    settings: RWDBSettings | None = None,
    *,
    side: Side = "write",
    health: ReadSideHealth | None = None,
    **kwargs: Any,
) -> Engine:
    """A psycopg 3 engine with the package's pool, retry and PgBouncer settings.

    ``side="read"`` makes every transaction ``READ ONLY`` (set once per
    connection, sent with ``BEGIN``: no extra round trip, nothing left behind on
    PgBouncer's shared server connections). ``health`` is told about failed and
    successful connects. ``kwargs`` override :func:`sqlalchemy.create_engine`
    arguments.
    """
    url = _as_url(url, "psycopg")
    settings = settings or _settings_for(url)
    options = _engine_options("psycopg", side, settings, kwargs)
    ping = options.pop("pool_pre_ping")
    engine = create_engine(url, pool_pre_ping=False, **_with_pool_class(options, False))
    instrument(engine, side, settings, health, ping=ping, is_async=False)
    return engine


def make_async_engine(
    url: str | URL,
    settings: RWDBSettings | None = None,
    *,
    side: Side = "write",
    health: ReadSideHealth | None = None,
    **kwargs: Any,
) -> AsyncEngine:
    """The asyncpg twin of :func:`make_engine`."""
    url = _as_url(url, "asyncpg")
    settings = settings or _settings_for(url)
    options = _engine_options("asyncpg", side, settings, kwargs)
    ping = options.pop("pool_pre_ping")
    engine = create_async_engine(url, pool_pre_ping=False, **_with_pool_class(options, True))
    instrument(engine.sync_engine, side, settings, health, ping=ping, is_async=True)
    return engine


@dataclass(frozen=True, slots=True)
class EnginePair:
    """The write (primary) and read (replicas) engines of one driver."""

    write: Engine
    read: Engine


@dataclass(frozen=True, slots=True)
class AsyncEnginePair:
    write: AsyncEngine
    read: AsyncEngine


def make_primary_read_engine(settings: RWDBSettings) -> Engine:
    """The primary, for reads that must see it: READ ONLY, with a pool of its own.

    Apart from the write pool so that reads can never take the connections writes
    need, and without the read side's breaker: its failures say nothing about the
    replicas.
    """
    return make_engine(
        settings.url("write", "psycopg"), settings, side="read", **_primary_read_pool(settings)
    )


def make_async_primary_read_engine(settings: RWDBSettings) -> AsyncEngine:
    """The asyncpg twin of :func:`make_primary_read_engine`."""
    return make_async_engine(
        settings.url("write", "asyncpg"), settings, side="read", **_primary_read_pool(settings)
    )


def _primary_read_pool(settings: RWDBSettings) -> dict[str, Any]:
    size, overflow = settings.pool_limits("primary_read")
    return {"pool_size": size, "max_overflow": overflow}


def make_engine_pair(settings: RWDBSettings, health: ReadSideHealth | None = None) -> EnginePair:
    return EnginePair(
        write=make_engine(settings.url("write", "psycopg"), settings, side="write"),
        read=make_engine(settings.url("read", "psycopg"), settings, side="read", health=health),
    )


def make_async_engine_pair(
    settings: RWDBSettings, health: ReadSideHealth | None = None
) -> AsyncEnginePair:
    url = settings.url("read", "asyncpg")
    return AsyncEnginePair(
        write=make_async_engine(settings.url("write", "asyncpg"), settings, side="write"),
        read=make_async_engine(url, settings, side="read", health=health),
    )


def _as_url(url: str | URL, driver: Driver) -> URL:
    if isinstance(url, str):
        try:
            url = parse_url(url)
        except ValueError as exc:
            raise ValueError(f"database URL {exc}") from None
    return url.set(drivername=f"postgresql+{driver}")


def _engine_options(
    driver: Driver, side: Side, settings: RWDBSettings, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The engine arguments: the package's, overridden by the caller's ``kwargs``,
    except for the role. A caller's ``execution_options`` are merged with it: in
    its place, a write on the read side would look like a demoted primary."""
    return {
        **_pool_args(side, settings, kwargs),
        "connect_args": connect_args(driver, settings),
        **kwargs,
        "execution_options": {**kwargs.get("execution_options", {}), ROLE_OPTION: side},
    }


def _settings_for(url: URL) -> RWDBSettings:
    """The environment's settings for an engine whose URL is given.

    The URL stands for both sides' connection settings, so POSTGRES_PASSWORD
    (only needed to build a URL from the parts) may be unset; the pool, timeout
    and retry variables are still read, and still checked.
    """
    given = url.render_as_string(hide_password=False)
    return RWDBSettings(write_url=given, read_url=given)
