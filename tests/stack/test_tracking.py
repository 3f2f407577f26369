"""Which commits earn a token: every way of writing through a write session is seen,
and nothing that only read gets one. Against the real stack, both drivers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI
from sqlalchemy import event, func, insert, literal, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import fastapi_rwdb
from fastapi_rwdb import AsyncWriteSession, Database, RWDBSettings, WriteSession
from fastapi_rwdb.orm.writes import UNKNOWN_LSN

from ..helpers import KEY, client, dsn, rwdb_app, served_client
from ..models import Item

pytestmark = pytest.mark.stack

items = Item.__table__  # type: ignore[attr-defined]


def _name() -> str:
    return f"track-{uuid.uuid4()}"


# Each body runs in a write session and commits; True: it wrote.
SYNC: dict[str, tuple[Callable[[Session], Any], bool]] = {
    "orm add": (lambda s: s.add(Item(name=_name())), True),
    "core insert": (lambda s: s.execute(insert(items).values(name=_name())), True),
    "core update, no row matched": (
        lambda s: s.execute(update(items).where(items.c.id == -1).values(name="x")),
        True,  # DML is trusted without asking: a token more, never one less
    ),
    "text insert": (
        lambda s: s.execute(text("INSERT INTO rwdb_items (name) VALUES (:n)"), {"n": _name()}),
        True,
    ),
    "raw connection insert": (
        # (no parameters: the two drivers' paramstyles differ)
        lambda s: s.connection().exec_driver_sql(
            f"INSERT INTO rwdb_items (name) VALUES ('{_name()}')"
        ),
        True,
    ),
    "bulk insert mappings": (lambda s: s.bulk_insert_mappings(Item, [{"name": _name()}]), True),
    "scalar of a write": (
        lambda s: s.scalar(insert(items).values(name=_name()).returning(items.c.id)),
        True,
    ),
    # close() ends a transaction without after_rollback: what it noted must not carry on.
    "a write after close()": (
        lambda s: (
            s.execute(insert(items).values(name=_name())),
            s.close(),
            s.add(Item(name=_name())),
        ),
        True,
    ),
    "a select after a closed write": (
        lambda s: (
            s.execute(insert(items).values(name=_name())),
            s.close(),
            s.execute(select(items.c.id).limit(1)),
        ),
        False,
    ),
    # PostgreSQL runs a data-modifying CTE whatever the SELECT around it does.
    "insert in a CTE": (
        lambda s: s.execute(
            select(insert(items).values(name=_name()).returning(items.c.id).cte("w").c.id)
        ).all(),
        True,
    ),
    "insert in an unreferenced CTE": (
        lambda s: s.execute(
            select(literal(1)).add_cte(insert(items).values(name=_name()).cte("w"))
        ).all(),
        True,
    ),
    "select in a CTE": (
        lambda s: s.execute(select(select(items.c.id).limit(1).cte("r").c.id)).all(),
        False,
    ),
    "compiled select": (lambda s: s.execute(select(items.c.id).limit(1)).all(), False),
    "text select": (lambda s: s.execute(text("SELECT 1")).all(), False),
    "raw connection select": (lambda s: s.connection().exec_driver_sql("SELECT 1").all(), False),
    "nothing": (lambda s: None, False),
}


async def _async_body(session: AsyncSession, kind: str) -> None:
    await session.run_sync(SYNC[kind][0])


def make_app() -> FastAPI:
    app = rwdb_app()

    @app.post("/sync/{kind}")
    def sync_route(kind: str, db: WriteSession) -> dict[str, bool]:
        SYNC[kind][0](db)
        db.commit()
        return {"ok": True}

    @app.post("/async/{kind}")
    async def async_route(kind: str, db: AsyncWriteSession) -> dict[str, bool]:
        await _async_body(db, kind)
        await db.commit()
        return {"ok": True}

    @app.post("/async-native/{what}")
    async def async_native(what: str, db: AsyncWriteSession) -> dict[str, bool]:
        # The async API itself, not run_sync: execute, scalar and connection().
        if what == "execute":
            await db.execute(insert(items).values(name=_name()))
        elif what == "scalar":
            await db.scalar(insert(items).values(name=_name()).returning(items.c.id))
        elif what == "connection":
            conn = await db.connection()
            await conn.exec_driver_sql(f"INSERT INTO rwdb_items (name) VALUES ('{_name()}')")
        else:
            await db.execute(select(items.c.id).limit(1))
        await db.commit()
        return {"ok": True}

    return app


@pytest.fixture(scope="module")
async def app() -> AsyncIterator[FastAPI]:
    application = make_app()
    async with application.router.lifespan_context(application):
        yield application


def primary_lsn() -> int:
    with psycopg.connect(dsn(), prepare_threshold=None, autocommit=True) as conn:
        row = conn.execute("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8").fetchone()
    assert row is not None
    return int(row[0])


async def post(app: FastAPI, path: str) -> str | None:
    async with client(app, "http://t") as c:
        response = await c.post(path)
    assert response.status_code == 200, response.text
    token = response.headers.get("x-rwdb-pin")
    assert (token is None) == ("set-cookie" not in response.headers)
    return token


def token_lsn(token: str) -> int:
    token_data = fastapi_rwdb.get_database().signer.load(token, max_age=3600)
    assert token_data is not None, "the token must verify"
    return token_data.lsn


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("kind", list(SYNC))
async def test_a_token_exactly_when_the_commit_wrote(app: FastAPI, flavour: str, kind: str) -> None:
    before = primary_lsn()
    token = await post(app, f"/{flavour}/{kind}")
    wrote = SYNC[kind][1]
    if not wrote:
        assert token is None
        return
    assert token is not None
    # The position after the commit: past where the WAL was before it (a transaction
    # that changed no row writes no commit record), not past now.
    lsn = token_lsn(token)
    assert lsn != UNKNOWN_LSN
    if "no row" in kind:
        assert before <= lsn <= primary_lsn()
    else:
        assert before < lsn <= primary_lsn()


@pytest.mark.parametrize("what", ["execute", "scalar", "connection", "select"])
async def test_async_session_api_is_tracked(app: FastAPI, what: str) -> None:
    before = primary_lsn()
    token = await post(app, f"/async-native/{what}")
    if what == "select":
        assert token is None
    else:
        assert token is not None and before < token_lsn(token) <= primary_lsn()


def _write_then_failed_savepoint(s: Session) -> None:
    s.execute(insert(items).values(name=_name()))
    # The savepoint is rolled back; the outer write stands.
    with contextlib.suppress(DBAPIError), s.begin_nested():
        s.execute(text("SELECT 1/0"))


def _savepoint_write_only(s: Session) -> None:
    with s.begin_nested():
        s.execute(insert(items).values(name=_name()))


SAVEPOINTS = {
    "write, then a savepoint that fails": (_write_then_failed_savepoint, True),
    "a write inside a released savepoint": (_savepoint_write_only, True),
}
SYNC.update(SAVEPOINTS)


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("kind", list(SAVEPOINTS))
async def test_savepoints_neither_lose_nor_invent_a_write(
    app: FastAPI, flavour: str, kind: str
) -> None:
    before = primary_lsn()
    token = await post(app, f"/{flavour}/{kind}")
    assert token is not None and before < token_lsn(token) <= primary_lsn()


WRITING_FUNCTION = (
    "CREATE OR REPLACE FUNCTION rwdb_add_item(n text) RETURNS bigint LANGUAGE sql"
    " AS $$ INSERT INTO rwdb_items (name) VALUES (n) RETURNING id $$"
)
FUNCTIONS = {
    "a writing function in a compiled select": (
        lambda s: s.execute(select(func.rwdb_add_item(_name()))).all(),
        True,
    ),
    "a writing function in textual SQL": (
        lambda s: s.execute(text("SELECT rwdb_add_item(:n)"), {"n": _name()}).all(),
        True,
    ),
}
SYNC.update(FUNCTIONS)


@pytest.fixture(scope="module")
def writing_function() -> None:
    with psycopg.connect(dsn(), prepare_threshold=None, autocommit=True) as conn:
        conn.execute(WRITING_FUNCTION)


@pytest.mark.parametrize(
    ("flavour", "kind"),
    [
        ("sync", "a writing function in a compiled select"),
        ("sync", "a writing function in textual SQL"),
        # asyncpg is not asked about compiled SELECTs (a round trip more for every
        # transaction that only read); textual SQL is asked about.
        ("async", "a writing function in textual SQL"),
    ],
)
async def test_a_writing_function_called_by_a_select_earns_a_token(
    app: FastAPI, writing_function: None, flavour: str, kind: str
) -> None:
    before = primary_lsn()
    token = await post(app, f"/{flavour}/{kind}")
    assert token is not None and before < token_lsn(token) <= primary_lsn()


class _VetoedCommit(Exception):
    """Raised by an application's own before_commit listener."""


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_a_commit_vetoed_by_a_later_before_commit_listener_is_not_committed(
    flavour: str,
) -> None:
    """An application's before_commit listener runs after the package's (registered
    later) and raises: SQLAlchemy then rolls back and the app is told the commit
    failed, so nothing may have been committed on the server, and no token issued."""

    class AppSession(Session):
        pass

    database = Database(RWDBSettings(secret_key=KEY), session_class=AppSession)
    app = FastAPI()
    fastapi_rwdb.setup(app, database)
    name = _name()

    @app.post("/sync")
    def sync_route(db: WriteSession) -> None:
        db.execute(insert(items).values(name=name))
        db.commit()

    @app.post("/async")
    async def async_route(db: AsyncWriteSession) -> None:
        await db.execute(insert(items).values(name=name))
        await db.commit()

    database.write_session().close()  # the package's listeners are on its subclass now

    def veto(session: Session) -> None:
        raise _VetoedCommit

    event.listen(AppSession, "before_commit", veto)
    async with served_client(app, "http://t", raise_app_exceptions=False) as c:
        response = await c.post(f"/{flavour}")
    assert response.status_code == 500
    assert "set-cookie" not in response.headers
    with psycopg.connect(dsn(), prepare_threshold=None, autocommit=True) as conn:
        found = conn.execute("SELECT count(*) FROM rwdb_items WHERE name = %s", (name,))
        assert found.fetchone() == (0,), "committed on the server, reported failed"


WIRE_BODIES: dict[str, Callable[[Session], Any]] = {
    "orm write": lambda s: s.add(Item(name=_name())),
    "text write": lambda s: s.execute(
        text("INSERT INTO rwdb_items (name) VALUES (:n)"), {"n": _name()}
    ),
    "compiled select": lambda s: s.execute(select(items.c.id).limit(1)).all(),
}


async def test_psycopg_commit_tracking_costs_no_round_trip() -> None:
    """Counted on the wire (benchmarks.wire's proxy), against the same work on a plain
    SQLAlchemy engine: the WAL position, and the question whether the transaction
    wrote, travel in the COMMIT's own message."""
    from sqlalchemy import create_engine

    from benchmarks.wire import WireCounter, round_trips
    from fastapi_rwdb.engine.factory import connect_args

    upstream = {"write": (os.environ["POSTGRES_SERVER"], int(os.environ["POSTGRES_PORT"]))}
    counted: dict[str, dict[str, tuple[int, int]]] = {}
    with WireCounter(upstream) as wire:
        # The background replica view would query the primary through the counter too.
        settings = RWDBSettings(
            secret_key=KEY, write_port=wire.ports["write"], lag_check_interval=3600
        )
        plain = create_engine(
            settings.url("write", "psycopg"),
            pool_pre_ping=True,
            connect_args=connect_args("psycopg", settings),
        )
        app = FastAPI()
        fastapi_rwdb.setup(app, Database(settings))

        @app.post("/{kind}")
        def route(kind: str, db: WriteSession) -> None:
            WIRE_BODIES[kind](db)
            db.commit()

        def plain_request(kind: str) -> None:
            with Session(plain) as s:
                WIRE_BODIES[kind](s)
                s.commit()

        async with served_client(app, "http://t") as client:
            for kind in WIRE_BODIES:
                for variant in ("plain", "rwdb"):
                    for _ in range(2):  # the first fills the pool
                        await asyncio.sleep(0.05)  # the proxy has counted the last bytes
                        wire.reset()
                        if variant == "plain":
                            plain_request(kind)
                        else:
                            (await client.post(f"/{kind}")).raise_for_status()
                    await asyncio.sleep(0.05)
                    counts = wire.counts()
                    counted.setdefault(kind, {})[variant] = (
                        round_trips(counts),
                        counts["statement"],
                    )
        plain.dispose()
    # The WAL position; the question whether it wrote (after textual SQL, or when only
    # compiled SELECTs ran: a function they called may have written).
    extra_statements = {"orm write": 1, "text write": 2, "compiled select": 1}
    for kind, extra in extra_statements.items():
        (plain_trips, plain_statements), (trips, statements) = (
            counted[kind]["plain"],
            counted[kind]["rwdb"],
        )
        # One round trip fewer: the plain engine pings every checkout, the package
        # not a connection returned moments ago (RWDB_PING_SKIP_MS).
        assert (kind, trips) == (kind, plain_trips - 1)
        assert (kind, statements) == (kind, plain_statements + extra)
