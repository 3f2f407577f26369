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
    """The hand-written module: engines, sessionmakers and dependencies.

    ``pool_size`` given: every pool keeps that many connections (the read side too),
    so a team that sized its pools for the load measured opens none under it; the
    default is fastapi_rwdb's formula, as the guide's pattern writes it.
    """

    def __init__(self, write_port: int, read_port: int, pool_size: int | None = None) -> None:
        def sizes(factor: int) -> dict[str, int]:
            if pool_size is None:
                return {"pool_size": POOL_SIZE * factor, "max_overflow": MAX_OVERFLOW * factor}
            return {"pool_size": pool_size, "max_overflow": MAX_OVERFLOW}

        def engine(port: int, factor: int) -> Engine:
            return create_engine(
                _url("psycopg", port), connect_args=PSYCOPG_ARGS, **sizes(factor), **POOL
            )

        def async_engine(port: int, factor: int) -> AsyncEngine:
            return create_async_engine(
                _url("asyncpg", port), connect_args=ASYNCPG_ARGS, **sizes(factor), **POOL
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


#: The peer library's pools as a new user would set them (its engine_config): 10 + 20
#: on each engine, pre-ping on, the same PgBouncer-safe connect arguments.
AA_POOL = {"pool_size": 10, "max_overflow": 20, "pool_pre_ping": True}


class AdvancedAlchemy:
    """advanced-alchemy's read/write routing (its ``RoutingSyncSessionMaker`` and
    ``RoutingAsyncSessionMaker``: a write, a flush or ``FOR UPDATE`` goes to the
    writer group, any other statement to the reader group, and a session sticks to
    the writer after its first write until it commits), one engine per group: the
    write port and the read port. Optional: ``pip install -e '.[bench]'``.

    Its async routing session cannot be made on SQLAlchemy 2.1 (advanced-alchemy
    1.12 sets ``AsyncSession.bind`` before ``AsyncSession.__init__``, and 2.1's
    ``bind`` setter needs the sync session made there): ``async_error`` then says
    what failed, the app serves the sync routes only and the async ones answer 500.
    """

    def __init__(self, write_port: int, read_port: int) -> None:
        from advanced_alchemy.config.routing import RoutingConfig
        from advanced_alchemy.routing import RoutingAsyncSessionMaker, RoutingSyncSessionMaker

        def config(driver: str) -> RoutingConfig:
            return RoutingConfig(
                primary_connection_string=_url(driver, write_port).render_as_string(False),
                read_replicas=[_url(driver, read_port).render_as_string(False)],
            )

        self.sync_maker = RoutingSyncSessionMaker(
            routing_config=config("psycopg"),
            engine_config={**AA_POOL, "connect_args": PSYCOPG_ARGS},
            session_config={"autoflush": False},
        )
        self.async_maker = RoutingAsyncSessionMaker(
            routing_config=config("asyncpg"),
            engine_config={**AA_POOL, "connect_args": ASYNCPG_ARGS},
            session_config={"expire_on_commit": False},
        )
        self.async_error = ""
        try:
            self.async_maker()
        except AttributeError as exc:  # see the class docstring
            self.async_error = f"{type(exc).__name__}: {exc}"

    def engines(self) -> list[Engine]:
        """Every engine's sync face (an async engine's pool lives on it)."""
        sync = [self.sync_maker.primary_engine, *self.sync_maker.replica_engines]
        async_ = [self.async_maker.primary_engine, *self.async_maker.replica_engines]
        return sync + [e.sync_engine for e in async_]

    def app(self) -> FastAPI:
        def get_db() -> Iterator[Session]:
            session = self.sync_maker()
            try:
                yield session
            finally:
                session.close()

        async def get_async_db() -> AsyncIterator[AsyncSession]:
            async with self.async_maker() as session:
                yield session

        peer = self

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            yield
            peer.sync_maker.close_all()
            for engine in [peer.async_maker.primary_engine, *peer.async_maker.replica_engines]:
                await engine.dispose()

        sync, async_ = (
            Annotated[Session, Depends(get_db)],
            Annotated[AsyncSession, Depends(get_async_db)],
        )
        return add_routes(FastAPI(lifespan=lifespan), sync, sync, async_, async_)
