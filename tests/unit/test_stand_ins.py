"""The stale replica's read side stands in for a cluster's whatever the Database does
(fastapi_rwdb.stand_ins): no server is needed, engines connect only on first use."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import create_async_engine

import fastapi_rwdb
from fastapi_rwdb import Database, RWDBSettings, stand_ins
from fastapi_rwdb.stand_ins import StaleReplicaError, StandIn

from ..helpers import KEY

URL = "postgresql://rwdb:pw@127.0.0.1:1/stand_in_db"


def settings(database: str = "stand_in_db") -> RWDBSettings:
    return RWDBSettings(
        write_url=f"postgresql://rwdb:pw@127.0.0.1:1/{database}",  # type: ignore[arg-type]
        read_url=f"postgresql://rwdb:pw@127.0.0.1:2/{database}",  # type: ignore[arg-type]
        secret_key=KEY,  # type: ignore[arg-type]
    )


def new_stand_in(everywhere: bool = False) -> StandIn:
    return StandIn(
        create_engine("postgresql+psycopg://rwdb:pw@127.0.0.1:1/snapshot"),
        create_async_engine("postgresql+asyncpg://rwdb:pw@127.0.0.1:1/snapshot"),
        everywhere,
    )


@contextmanager
def standing_in(database: Database, everywhere: bool = False) -> Iterator[StandIn]:
    stand_in = new_stand_in(everywhere)
    with stand_ins.standing_in(database.settings.endpoint("write"), stand_in):
        yield stand_in


def read_binds(database: Database) -> tuple[Engine, Engine]:
    """The engines a read session made now would read from (sync, async's sync side)."""
    sync = database.read_session().bind
    aio = database.async_read_session().bind
    assert isinstance(sync, Engine) and aio is not None
    return sync, aio.sync_engine  # type: ignore[union-attr]


def test_read_sessions_made_inside_read_the_stand_in_and_after_it_the_read_side() -> None:
    database = Database(settings())
    real = read_binds(database)
    with standing_in(database) as stand_in:
        assert read_binds(database) == (stand_in.sync, stand_in.aio.sync_engine)
        assert database.engines.write is not stand_in.sync  # writes stay on the primary
        assert database.write_session().bind is database.engines.write
    assert read_binds(database) == real
    assert database.stand_in() is None


def test_the_block_survives_dispose_and_engines_rebuilt_on_first_use() -> None:
    database = Database(settings())
    with standing_in(database) as stand_in:
        read_binds(database)
        database.dispose_sync()  # what an app's lifespan ending does
        assert not database.is_built("engines")
        assert read_binds(database) == (stand_in.sync, stand_in.aio.sync_engine)
        asyncio.run(database.dispose())
        assert read_binds(database) == (stand_in.sync, stand_in.aio.sync_engine)
        # The stand-in's engines are the block's: dispose() never drops them.
        assert stand_ins.for_endpoint(database.settings.endpoint("write")) is stand_in


def test_every_database_of_the_cluster_reads_the_stand_in_configure_and_using_too() -> None:
    first = Database(settings())
    # using() around it all puts the process-wide Database back afterwards.
    with fastapi_rwdb.using(first), standing_in(first) as stand_in:
        made_inside = Database(settings())  # an app set up inside the block
        configured = fastapi_rwdb.configure(settings())
        with fastapi_rwdb.using(Database(settings())) as used:
            for database in (made_inside, configured, used, fastapi_rwdb.get_database()):
                assert read_binds(database)[0] is stand_in.sync
        other = Database(settings("another_db"))  # another cluster: not stood in for
        assert read_binds(other)[0] is not stand_in.sync


def test_an_inner_block_is_in_force_until_it_ends_then_the_outer_one_again() -> None:
    database = Database(settings())
    with standing_in(database) as outer:
        with standing_in(database) as inner:
            assert read_binds(database)[0] is inner.sync
        assert read_binds(database)[0] is outer.sync


def test_a_read_session_made_before_the_block_keeps_its_engines() -> None:
    database = Database(settings())
    before = database.read_session()
    with standing_in(database) as stand_in:
        assert before.bind is not stand_in.sync


def test_a_whole_run_stand_in_refuses_another_clusters_database() -> None:
    database = Database(settings())
    other = Database(settings("another_db"))
    with standing_in(database, everywhere=True):
        with pytest.raises(StaleReplicaError) as raised:
            other.read_session()
        message = str(raised.value)
        assert "127.0.0.1:1/another_db" in message and "--rwdb-stale" in message
        assert "pw" not in message  # no password in what the person reads
        read_binds(database)  # its own cluster reads the stand-in
    # Not a whole-run block: two clusters in one process are legitimate.
    with standing_in(database):
        read_binds(other)


def test_the_generation_moves_on_every_change() -> None:
    database = Database(settings())
    before = stand_ins.generation
    with standing_in(database):
        assert stand_ins.generation == before + 1
    assert stand_ins.generation == before + 2
