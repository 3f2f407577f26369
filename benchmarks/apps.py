"""The two applications the overhead benchmark compares, serving the same routes.

``baseline_app`` is the hand-written pattern teams use today (two
``create_engine`` and two ``create_async_engine`` calls, ``sessionmaker`` s,
plain ``Depends`` functions, no middleware), with the same PgBouncer-safe
connect arguments and the same pool sizes as fastapi_rwdb's defaults. It leaves
out the guide's ``SELECT 1`` on every new session (``pool_pre_ping`` already
checks each connection), which would cost the baseline one more round trip per
request and flatter fastapi_rwdb.

``rwdb_app`` is the same routes on ``fastapi_rwdb.setup`` and its dependencies.
"""

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from sqlalchemy import Engine, create_engine, insert, select, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

import fastapi_rwdb
from fastapi_rwdb import Database, RWDBSettings

from .common import SECRET_KEY, env, items

# fastapi_rwdb's defaults, written out as a team would in its own database module.
POOL_SIZE, MAX_OVERFLOW, READ_MULTIPLIER = 5, 10, 2
POOL = {"pool_timeout": 30, "pool_recycle": 1800, "pool_pre_ping": True}
PSYCOPG_ARGS = {"connect_timeout": 5, "application_name": "fastapi-rwdb", "prepare_threshold": None}
ASYNCPG_ARGS = {
    "timeout": 5,
    "server_settings": {"application_name": "fastapi-rwdb"},
    "statement_cache_size": 0,
    "prepared_statement_cache_size": 0,
}


def _url(driver: str, port: int) -> URL:
    return URL.create(
        f"postgresql+{driver}",
        username=env("POSTGRES_USER"),
        password=env("POSTGRES_PASSWORD"),
        host=env("POSTGRES_SERVER"),
        port=port,
        database=env("POSTGRES_DB"),
    )


def add_routes(app: FastAPI, read: Any, write: Any, async_read: Any, async_write: Any) -> FastAPI:
    """The benchmark's routes, written once against four session annotations."""

    @app.get("/sync/items/{item_id}")
    def sync_read(item_id: int, db: read) -> dict[str, Any]:  # type: ignore[valid-type]
        row = db.execute(select(items.c.id, items.c.payload).where(items.c.id == item_id)).first()
        return {"found": row is not None}

    @app.get("/async/items/{item_id}")
    async def async_read_(item_id: int, db: async_read) -> dict[str, Any]:  # type: ignore[valid-type]
        result = await db.execute(select(items.c.id, items.c.payload).where(items.c.id == item_id))
        return {"found": result.first() is not None}

    @app.post("/sync/items")
    def sync_write(db: write) -> dict[str, Any]:  # type: ignore[valid-type]
        stmt = insert(items).values(client="bench", payload="x").returning(items.c.id)
        new_id = db.execute(stmt).scalar_one()
        db.commit()
        return {"id": new_id}

    @app.post("/async/items")
    async def async_write_(db: async_write) -> dict[str, Any]:  # type: ignore[valid-type]
        stmt = insert(items).values(client="bench", payload="x").returning(items.c.id)
        new_id = (await db.execute(stmt)).scalar_one()
        await db.commit()
        return {"id": new_id}

    @app.post("/sync/items-text")
    def sync_write_text(db: write) -> dict[str, Any]:  # type: ignore[valid-type]
        """The same INSERT as textual SQL (fastapi_rwdb cannot tell it wrote without asking)."""
        stmt = text(
            f"INSERT INTO {items.name} (client, payload) VALUES ('bench', 'x') RETURNING id"
        )
        new_id = db.execute(stmt).scalar_one()
        db.commit()
        return {"id": new_id}

    return app


class Baseline:
    """The hand-written module: engines, sessionmakers and dependencies."""

    def __init__(self, write_port: int, read_port: int) -> None:
        def engine(port: int, factor: int) -> Engine:
            return create_engine(
                _url("psycopg", port),
                pool_size=POOL_SIZE * factor,
                max_overflow=MAX_OVERFLOW * factor,
                connect_args=PSYCOPG_ARGS,
                **POOL,
            )

        def async_engine(port: int, factor: int) -> AsyncEngine:
            return create_async_engine(
                _url("asyncpg", port),
                pool_size=POOL_SIZE * factor,
                max_overflow=MAX_OVERFLOW * factor,
                connect_args=ASYNCPG_ARGS,
                **POOL,
            )

        self.write_engine = engine(write_port, 1)
        self.read_engine = engine(read_port, READ_MULTIPLIER)
        self.async_write_engine = async_engine(write_port, 1)
        self.async_read_engine = async_engine(read_port, READ_MULTIPLIER)
        self.WriteSessionLocal = sessionmaker(
            autocommit=False, autoflush=False, bind=self.write_engine
        )
        self.ReadSessionLocal = sessionmaker(
            autocommit=False, autoflush=False, bind=self.read_engine
        )
        self.AsyncWriteSessionLocal = async_sessionmaker(
            self.async_write_engine, class_=AsyncSession, expire_on_commit=False
        )
        self.AsyncReadSessionLocal = async_sessionmaker(
            self.async_read_engine, class_=AsyncSession, expire_on_commit=False
        )

    async def dispose(self) -> None:
        await self.async_write_engine.dispose()
        await self.async_read_engine.dispose()
        self.write_engine.dispose()
        self.read_engine.dispose()

    def app(self) -> FastAPI:
        def get_write_db() -> Iterator[Session]:
            session = self.WriteSessionLocal()
            try:
                yield session
            finally:
                session.close()

        def get_read_db() -> Iterator[Session]:
            session = self.ReadSessionLocal()
            try:
                yield session
            finally:
                session.close()

        async def get_async_write_db() -> AsyncIterator[AsyncSession]:
            async with self.AsyncWriteSessionLocal() as session:
                yield session

        async def get_async_read_db() -> AsyncIterator[AsyncSession]:
            async with self.AsyncReadSessionLocal() as session:
                yield session

        baseline = self

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            yield
            await baseline.dispose()

        return add_routes(
            FastAPI(lifespan=lifespan),
            Annotated[Session, Depends(get_read_db)],
            Annotated[Session, Depends(get_write_db)],
            Annotated[AsyncSession, Depends(get_async_read_db)],
            Annotated[AsyncSession, Depends(get_async_write_db)],
        )


def rwdb_app(write_port: int, read_port: int, **overrides: Any) -> tuple[FastAPI, Database]:
    """The same routes on fastapi_rwdb. SQLAlchemy's session classes, like the baseline:
    this measures fastapi_rwdb, not SQLModel."""
    settings = RWDBSettings(
        write_port=write_port,
        read_port=read_port,
        secret_key=SECRET_KEY,
        session_class="sqlalchemy",
        pin_seconds=3600,  # the token route reuses one token for the whole run
        **overrides,
    )
    app = FastAPI()
    database = fastapi_rwdb.setup(app, Database(settings))
    add_routes(
        app,
        fastapi_rwdb.ReadSession,
        fastapi_rwdb.WriteSession,
        fastapi_rwdb.AsyncReadSession,
        fastapi_rwdb.AsyncWriteSession,
    )
    return app, database
