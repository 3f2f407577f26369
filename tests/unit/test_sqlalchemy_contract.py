"""The private SQLAlchemy behaviour fastapi_rwdb relies on (fastapi_rwdb/internals.py),
checked against the installed release. No PostgreSQL: SQLite in memory stands in
where a connection is needed. A SQLAlchemy release that changes any of this fails
here, by name, instead of quietly running the slower fallbacks."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.util import greenlet_spawn
from sqlmodel import Session as SQLModelSession
from sqlmodel import select

from fastapi_rwdb.engine import sqlalchemy_internals as internals


class _Base(DeclarativeBase):  # a metadata of its own: nothing reaches the real database
    pass


class Thing(_Base):
    __tablename__ = "contract_thing"
    id: Mapped[int] = mapped_column(primary_key=True)


def test_session_execute_internal_has_the_expected_shape() -> None:
    assert internals.EXECUTE_INTERNAL, "Session._execute_internal changed: see internals.py"


@pytest.mark.parametrize("call", ["execute", "scalar", "scalars", "get", "exec"])
def test_every_way_of_running_a_statement_passes_through_execute_internal(call: str) -> None:
    seen: list[Any] = []

    class Watching(SQLModelSession):
        def _execute_internal(self, statement: Any, *args: Any, **kw: Any) -> Any:
            seen.append(statement)
            return super()._execute_internal(statement, *args, **kw)

    engine = create_engine("sqlite://")
    _Base.metadata.create_all(engine)
    with Watching(engine) as session:
        session.add(Thing(id=1))
        session.commit()
        seen.clear()
        if call == "get":
            session.expunge_all()
            session.get(Thing, 1)
        elif call == "exec":
            session.exec(select(Thing)).all()
        else:
            getattr(session, call)(text("SELECT 1"))
    assert len(seen) == 1


def test_await_runs_a_coroutine_from_the_sync_side() -> None:
    async def main() -> int:
        return await greenlet_spawn(lambda: internals.await_(asyncio.sleep(0, result=5)))

    assert asyncio.run(main()) == 5


@pytest.mark.parametrize("dialect", [PGDialect_psycopg, PGDialect_asyncpg])
def test_both_dialects_can_make_a_connection_read_only(dialect: type[Dialect]) -> None:
    method = getattr(dialect, "set_readonly", None)
    assert callable(method)
    assert list(inspect.signature(method).parameters) == ["self", "connection", "value"]


def test_commits_go_through_the_dialects_do_commit() -> None:
    assert list(inspect.signature(Dialect.do_commit).parameters) == ["self", "dbapi_connection"]
    engine = create_engine("sqlite://")
    committed: list[Any] = []
    hooked = {"on": False}

    def hook_of(dbapi_connection: Any) -> Any:
        return committed.append if hooked["on"] else None

    internals.route_commit(engine, hook_of)
    with engine.connect() as conn:
        conn.execute(text("CREATE TABLE t (x int)"))
        conn.commit()  # the DBAPI commit: no hook
        assert committed == []
        hooked["on"] = True
        conn.execute(text("INSERT INTO t VALUES (1)"))
        conn.commit()
    assert len(committed) == 1  # the driver connection, handed to the hook
    # Only this engine's dialect instance was changed.
    assert create_engine("sqlite://").dialect.do_commit.__func__ is type(engine.dialect).do_commit  # type: ignore[attr-defined]


def test_connection_options_go_through_the_dialect_instance() -> None:
    """Where SQLAlchemy applies a Connection's execution options: the hook sees them
    first, and the engine keeps SQLAlchemy's fast path (no engine event listener)."""
    assert list(inspect.signature(Dialect.set_connection_execution_options).parameters) == [
        "self",
        "connection",
        "opts",
    ]
    engine = create_engine("sqlite://")
    seen: list[tuple[Any, dict[str, Any]]] = []
    internals.before_connection_options(engine, lambda conn, opts: seen.append((conn, dict(opts))))
    with engine.connect() as conn:
        conn.execution_options(isolation_level="SERIALIZABLE")
        assert seen == [(conn, {"isolation_level": "SERIALIZABLE"})]
        assert conn.get_isolation_level() == "SERIALIZABLE"  # applied after the hook
    assert engine._has_events is False
    other = create_engine("sqlite://")
    assert (
        other.dialect.set_connection_execution_options.__func__
        is type(  # type: ignore[attr-defined]
            engine.dialect
        ).set_connection_execution_options
    )


@pytest.mark.parametrize("side", ["read", "write"])
@pytest.mark.parametrize("is_async", [False, True])
def test_the_package_engines_keep_sqlalchemys_fast_path(side: str, is_async: bool) -> None:
    """No ConnectionEvents listener of the package's own, with the default settings
    (a read and a write deadline): one would send every statement, BEGIN, COMMIT and
    ROLLBACK through SQLAlchemy's event dispatch. The deadline is armed by the
    engine's own dialect (internals.around_driver_calls)."""
    from fastapi_rwdb.engine.factory import make_async_engine, make_engine
    from fastapi_rwdb.settings import RWDBSettings

    settings = RWDBSettings(secret_key="k" * 32)  # type: ignore[call-arg]
    assert settings.read_timeout > 0 and settings.write_timeout > 0
    url = "postgresql://u:p@127.0.0.1:1/db"
    if is_async:
        engine = make_async_engine(url, settings, side=side).sync_engine  # type: ignore[arg-type]
    else:
        engine = make_engine(url, settings, side=side)  # type: ignore[arg-type]
    assert engine._has_events is False


def test_driver_calls_go_through_the_dialect_instance() -> None:
    """Every statement (with and without parameters, executemany), every COMMIT and
    every ROLLBACK reaches the wrapped dialect methods, with the pool's connection; an error leaves
    what was armed for handle_error; the engine keeps SQLAlchemy's fast path."""
    engine = create_engine("sqlite://")
    calls: list[str] = []
    armed: dict[str, Any] = {}

    def arm(pooled: Any) -> bool:
        calls.append("arm")
        armed["conn"] = pooled
        pooled.info["armed"] = True
        return True

    def disarm(pooled: Any) -> bool:
        calls.append("disarm")
        assert pooled.info.pop("armed")
        return False

    def arm_rollback(pooled: Any) -> bool:
        try:
            info = pooled.info
        except NotImplementedError:  # the dialect's first connect (as deadline.py)
            return False
        calls.append("arm rollback")
        info["armed"] = True
        return True

    internals.around_driver_calls(engine, arm, disarm, commits=True, arm_rollback=arm_rollback)
    with engine.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x int)")  # no parameters
        conn.execute(text("INSERT INTO t VALUES (:x)"), {"x": 1})
        conn.execute(text("INSERT INTO t VALUES (:x)"), [{"x": 2}, {"x": 3}])  # executemany
        assert calls == ["arm", "disarm"] * 3
        assert armed["conn"] is conn.connection
        calls.clear()
        conn.commit()
        assert calls == ["arm", "disarm"]
        calls.clear()
        with pytest.raises(Exception, match="no such table"):
            conn.execute(text("SELECT * FROM missing"))
        assert calls == ["arm"] and conn.connection.info.pop("armed")
        calls.clear()
        conn.rollback()
        assert calls == ["arm rollback", "disarm"]
    assert engine._has_events is False
    other = create_engine("sqlite://")
    names = ("do_execute", "do_execute_no_params", "do_executemany", "do_commit", "do_rollback")
    for name in names:
        assert getattr(other.dialect, name).__func__ is getattr(type(other.dialect), name)


def test_a_disarm_that_says_the_connection_is_spent_invalidates_it() -> None:
    engine = create_engine("sqlite://")
    internals.around_driver_calls(engine, lambda pooled: True, lambda pooled: True, commits=False)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
        assert conn.invalidated


def test_psycopg_autocommit_is_the_attribute_the_pipelined_begin_sets_back() -> None:
    """engine/wire.begin_with_first puts a psycopg connection in autocommit for the
    pipeline that sends BEGIN with the first statement, then sets
    ``Connection._autocommit`` back (psycopg's setter refuses inside the transaction):
    the public property must read that attribute, and pipeline mode be there."""
    import psycopg

    from fastapi_rwdb.engine import wire

    assert wire.PIPELINED_BEGIN, "psycopg pipeline mode or its autocommit property changed"
    conn = object.__new__(psycopg.Connection)
    for value in (True, False):
        conn._autocommit = value
        assert conn.autocommit is value


def test_the_asyncpg_adapter_opens_its_transaction_as_expected() -> None:
    """7.: the adapter's cursor opens the transaction with ``_start_transaction()`` when
    ``_transaction`` is None; the opener is offered only then, and only by that adapter."""
    from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection as Adapter
    from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_cursor as Cursor

    assert inspect.iscoroutinefunction(Adapter._start_transaction)
    assert "_transaction" in Adapter.__slots__
    assert "self._transaction" in inspect.getsource(Adapter._start_transaction)
    opens = inspect.getsource(Cursor._prepare_and_execute)
    assert "if adapt_connection._transaction is None:" in opens
    assert "await adapt_connection._start_transaction()" in opens
    adapter = Adapter.__new__(Adapter)
    adapter._transaction = None
    opener = internals.adapter_transaction_opener(adapter)
    assert opener is not None and opener.__func__ is Adapter._start_transaction  # type: ignore[attr-defined]
    adapter._transaction = object()  # already open
    assert internals.adapter_transaction_opener(adapter) is None
    assert internals.adapter_transaction_opener(object()) is None


def test_a_rollback_keeping_loaded_leaves_objects_as_they_were() -> None:
    """9.: with the identity map swapped for the rollback, no loaded object is expired;
    a plain rollback (the control) expires them all."""
    engine = create_engine("sqlite://")
    _Base.metadata.create_all(engine)
    try:
        with SQLModelSession(engine) as session:
            session.add(Thing(id=1))
            session.commit()
        with SQLModelSession(engine) as session:
            thing = session.get(Thing, 1)
            assert thing is not None
            internals.rollback_keeping_loaded(session)
            assert thing.__dict__.get("id") == 1, "the object was expired"
            assert session.get_transaction() is None and thing in session
            session.exec(select(Thing)).all()  # a transaction again (get() hits the map)
            session.rollback()
            assert "id" not in thing.__dict__  # the control: a rollback expires
    finally:
        engine.dispose()


def test_a_rollback_keeping_loaded_with_changes_pending_forgets_them() -> None:
    """With a change pending, the plain rollback: the change is forgotten, as a
    rollback must, rather than kept on an object the session no longer tracks as dirty."""
    engine = create_engine("sqlite://")
    _Base.metadata.create_all(engine)
    try:
        with SQLModelSession(engine) as session:
            session.add(Thing(id=2))
            internals.rollback_keeping_loaded(session)
            assert not session.new
    finally:
        engine.dispose()
