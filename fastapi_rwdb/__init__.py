"""Read/write splitting for FastAPI on HAProxy -> PgBouncer -> Patroni PostgreSQL."""

from .database import Database, configure, get_database, using
from .dependencies import (
    AsyncDBSession,
    AsyncReadSession,
    AsyncWriteSession,
    DBSession,
    ReadSession,
    WriteSession,
    get_async_db,
    get_async_read_db,
    get_async_write_db,
    get_db,
    get_read_db,
    get_write_db,
)
from .engines import (
    AsyncEnginePair,
    EnginePair,
    connect_args,
    make_async_engine,
    make_async_engine_pair,
    make_engine,
    make_engine_pair,
)
from .errors import (
    DatabaseUnavailableError,
    ReadOnlySessionError,
    ReplicaConflictError,
    RWDBError,
    SettingsError,
)
from .scopes import (
    current_token,
    get_async_read_db_context,
    get_async_write_db_context,
    get_read_db_context,
    get_write_db_context,
)
from .settings import RWDBSettings
from .wiring import lifespan, setup

__all__ = [
    "AsyncDBSession",
    "AsyncEnginePair",
    "AsyncReadSession",
    "AsyncWriteSession",
    "DBSession",
    "Database",
    "DatabaseUnavailableError",
    "EnginePair",
    "RWDBError",
    "RWDBSettings",
    "ReadOnlySessionError",
    "ReadSession",
    "ReplicaConflictError",
    "SettingsError",
    "WriteSession",
    "configure",
    "connect_args",
    "current_token",
    "get_async_db",
    "get_async_read_db",
    "get_async_read_db_context",
    "get_async_write_db",
    "get_async_write_db_context",
    "get_database",
    "get_db",
    "get_read_db",
    "get_read_db_context",
    "get_write_db",
    "get_write_db_context",
    "lifespan",
    "make_async_engine",
    "make_async_engine_pair",
    "make_engine",
    "make_engine_pair",
    "setup",
    "using",
]
