"""Reads reach replicas and writes the primary, through HAProxy and PgBouncer."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import event, insert, select, text

from fastapi_rwdb import (
    ReadOnlySessionError,
    get_async_read_db_context,
    get_async_write_db_context,
    get_database,
    get_read_db_context,
    get_write_db_context,
    make_async_engine,
    make_engine,
)

from ..models import Item

pytestmark = pytest.mark.stack

WHERE = text("SELECT pg_is_in_recovery() AS replica, inet_server_port() AS port")


def test_sync_reads_hit_both_replicas_and_writes_the_primary() -> None:
    ports = set()
    for _ in range(8):
        get_database().engines.read.dispose()  # a new connection: HAProxy picks again
        with get_read_db_context() as s:
            row = s.execute(WHERE).one()
        assert row.replica is True
        ports.add(row.port)
    assert len(ports) == 2, f"reads reached only {ports}"
    with get_write_db_context() as s:
        row = s.execute(WHERE).one()
    assert row.replica is False and row.port not in ports


async def test_async_reads_hit_both_replicas_and_writes_the_primary() -> None:
    ports = set()
    for _ in range(8):
        await get_database().async_engines.read.dispose()
        async with get_async_read_db_context() as s:
            row = (await s.execute(WHERE)).one()
        assert row.replica is True
        ports.add(row.port)
    assert len(ports) == 2, f"reads reached only {ports}"
    async with get_async_write_db_context() as s:
        row = (await s.execute(WHERE)).one()
    assert row.replica is False and row.port not in ports


def test_primary_read_scope_is_on_the_primary_and_read_only() -> None:
    name = f"primary-read-{uuid.uuid4()}"
    with get_write_db_context() as s:
        s.add(Item(name=name))
    with get_read_db_context(primary=True) as s:
        assert s.execute(WHERE).one().replica is False
        # Sees the row at once, however far the replicas are behind.
        assert s.scalar(select(Item.name).where(Item.name == name)) == name
        with pytest.raises(ReadOnlySessionError, match="get_write_db"):
            s.execute(insert(Item).values(name="never"))


async def test_200_concurrent_async_queries_through_pgbouncer() -> None:
    async def one(i: int) -> bool:
        scope = get_async_read_db_context() if i % 4 else get_async_write_db_context()
        async with scope as s:
            query = text("SELECT CAST(:i AS int), pg_sleep(0.01)")
            return (await s.execute(query, {"i": i})).scalar() == i

    results = await asyncio.gather(*(one(i) for i in range(200)), return_exceptions=True)
    errors = [r for r in results if r is not True]
    assert errors == []


def test_threaded_sync_burst_through_pgbouncer() -> None:
    def one(i: int) -> bool:
        scope = get_read_db_context() if i % 4 else get_write_db_context()
        with scope as s:
            query = text("SELECT CAST(:i AS int), pg_sleep(0.005)")
            return s.execute(query, {"i": i}).scalar() == i

    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(lambda i: _capture(one, i), range(400)))
    assert [r for r in results if r is not True] == []


def _capture(fn, i):  # type: ignore[no-untyped-def]
    try:
        return fn(i)
    except Exception as exc:  # collected and asserted on, not swallowed
        return exc


def test_orm_write_in_read_session_is_refused_before_sql() -> None:
    name = f"refused-{uuid.uuid4()}"
    with get_read_db_context() as s:
        s.add(Item(name=name))
        with pytest.raises(ReadOnlySessionError, match="nothing was sent") as info:
            s.flush()
        assert "get_write_db" in str(info.value)
    with get_read_db_context(primary=True) as s:
        assert s.scalar(select(Item).where(Item.name == name)) is None


def test_core_dml_in_read_session_is_refused_by_the_database() -> None:
    with get_read_db_context() as s, pytest.raises(ReadOnlySessionError, match="get_write_db"):
        s.execute(insert(Item).values(name="never"))


async def test_async_writes_in_read_session_are_refused() -> None:
    async with get_async_read_db_context() as s:
        with pytest.raises(ReadOnlySessionError):
            await s.execute(text("INSERT INTO rwdb_items (name) VALUES ('never')"))
    async with get_async_read_db_context() as s:
        s.add(Item(name="never"))
        with pytest.raises(ReadOnlySessionError, match="nothing was sent"):
            await s.flush()


def test_write_scope_commits_on_success_and_rolls_back_on_error() -> None:
    kept, dropped = f"kept-{uuid.uuid4()}", f"dropped-{uuid.uuid4()}"
    with get_write_db_context() as s:
        s.add(Item(name=kept))
    with pytest.raises(RuntimeError), get_write_db_context() as s:
        s.add(Item(name=dropped))
        s.flush()  # really sent to the primary, then rolled back
        raise RuntimeError("boom")
    with get_read_db_context(primary=True) as s:
        names = set(s.scalars(select(Item.name).where(Item.name.in_([kept, dropped]))))
    assert names == {kept}


async def test_async_write_scope_commits_and_rolls_back() -> None:
    kept, dropped = f"akept-{uuid.uuid4()}", f"adropped-{uuid.uuid4()}"
    async with get_async_write_db_context() as s:
        s.add(Item(name=kept))
    with pytest.raises(RuntimeError):
        async with get_async_write_db_context() as s:
            s.add(Item(name=dropped))
            await s.flush()
            raise RuntimeError("boom")
    async with get_async_read_db_context(primary=True) as s:
        found = await s.scalars(select(Item.name).where(Item.name.in_([kept, dropped])))
        names = set(found.all())
    assert names == {kept}


def test_read_scope_refuses_ddl_even_on_the_primary() -> None:
    # READ ONLY is enforced by PostgreSQL, not only by the ORM guard.
    with get_read_db_context(primary=True) as s, pytest.raises(ReadOnlySessionError):
        s.execute(text("CREATE TEMP TABLE t_never (x int)"))


def test_checkout_ping_replaces_a_dead_pooled_connection() -> None:
    engine = get_database().engines.read
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
        raw = conn.connection.driver_connection
    raw.close()  # dies while idle in the pool, as after a failover or a proxy restart
    with get_read_db_context() as s:
        assert s.execute(WHERE).one().replica is True
    assert raw.closed


async def test_async_checkout_ping_replaces_a_dead_pooled_connection() -> None:
    engine = get_database().async_engines.write
    async with engine.connect() as conn:
        await conn.exec_driver_sql("SELECT 1")
        raw = (await conn.get_raw_connection()).driver_connection
    raw.terminate()
    async with get_async_write_db_context() as s:
        assert (await s.execute(WHERE)).one().replica is False
    assert raw.is_closed()


@pytest.mark.parametrize("is_async", [False, True], ids=["psycopg", "asyncpg"])
async def test_a_callers_execution_options_keep_the_read_role(is_async: bool) -> None:
    """Execution options given to the factory are merged with the role, not put in
    its place: a write on the read engine stays the caller's mistake (the pool is
    kept), instead of looking like a demoted primary (pool discarded, a 503)."""
    settings = get_database().settings
    options = {"execution_options": {"logging_token": "mine"}}
    opened: list[int] = []
    if is_async:
        aengine = make_async_engine(
            settings.url("read", "asyncpg"), settings, side="read", **options
        )
        event.listen(aengine.sync_engine.pool, "connect", lambda *a: opened.append(1))
        try:
            for _ in range(2):
                async with aengine.connect() as aconn:
                    with pytest.raises(ReadOnlySessionError, match="get_write_db"):
                        await aconn.execute(insert(Item).values(name="never"))
        finally:
            await aengine.dispose()
    else:
        engine = make_engine(settings.url("read", "psycopg"), settings, side="read", **options)
        event.listen(engine.pool, "connect", lambda *a: opened.append(1))
        try:
            for _ in range(2):
                with engine.connect() as conn:
                    assert conn.get_execution_options()["logging_token"] == "mine"
                    with pytest.raises(ReadOnlySessionError, match="get_write_db"):
                        conn.execute(insert(Item).values(name="never"))
        finally:
            engine.dispose()
    assert len(opened) == 1, "the pool was discarded as if the server had been demoted"
