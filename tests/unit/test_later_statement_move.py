"""Which later statements of a read transaction may move to the primary when their
replica fails them (fastapi_rwdb/orm/replay.py): only where the transaction holds
nothing a new one would lack. No PostgreSQL: SQLite stands in where a connection
is needed, and statements are only inspected, never run."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import column, create_engine, func, literal, select, table, text, union_all
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fastapi_rwdb.engine import sqlalchemy_internals as internals
from fastapi_rwdb.orm import replay

ITEMS = table("items", column("id"), column("name"))


class _Base(DeclarativeBase):  # a metadata of its own: nothing reaches a database
    pass


class Thing(_Base):
    __tablename__ = "later_move_thing"
    id: Mapped[int] = mapped_column(primary_key=True)


@pytest.mark.parametrize(
    ("statement", "options"),
    [
        (select(ITEMS), None),
        (select(func.count()).select_from(ITEMS), None),
        (union_all(select(literal(1)), select(literal(2))), None),
        (select(ITEMS).where(text("id > 1")), None),
    ],
    ids=["select", "count", "union", "text-inside-select"],
)
def test_a_compiled_select_read_at_once_leaves_nothing(statement: Any, options: Any) -> None:
    assert replay._leaves_nothing(statement, options)


@pytest.mark.parametrize(
    ("statement", "options"),
    [
        (text("SET LOCAL work_mem = '64MB'"), None),
        (text("SELECT 1"), None),
        (None, None),  # run on session.connection(): not seen
        (select(ITEMS).with_for_update(), None),
        (select(func.set_config("app.user", "7", True)), None),
        (select(func.pg_advisory_xact_lock(42)), None),
        (select(func.pg_try_advisory_lock(42)), None),
        (select(ITEMS), {"stream_results": True}),
        (select(ITEMS), {"yield_per": 100}),
        (select(ITEMS).execution_options(yield_per=100), None),
    ],
    ids=[
        "set-local",
        "text-select",
        "unseen",
        "for-update",
        "set-config",
        "advisory-xact-lock",
        "try-advisory-lock",
        "streamed",
        "yield-per-option",
        "yield-per-on-statement",
    ],
)
def test_what_may_leave_state_keeps_the_failure_where_it_is(statement: Any, options: Any) -> None:
    assert not replay._leaves_nothing(statement, options)


def test_each_statement_takes_its_snapshot_only_where_the_level_says_so() -> None:
    """The level comes from the connection's options, else the engine's
    create_engine(isolation_level=...), else the server's default (SQLite's:
    SERIALIZABLE, one snapshot for the transaction)."""
    default = create_engine("sqlite://")
    configured = create_engine("sqlite://", isolation_level="AUTOCOMMIT")
    try:
        with default.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
            assert conn.default_isolation_level == "SERIALIZABLE"
            assert not replay._snapshot_per_statement(conn)
            conn.rollback()
            conn.execution_options(isolation_level="AUTOCOMMIT")
            assert replay._snapshot_per_statement(conn)
        with configured.connect() as conn:
            assert replay._snapshot_per_statement(conn)
            conn.execution_options(isolation_level="SERIALIZABLE")
            assert not replay._snapshot_per_statement(conn)
    finally:
        default.dispose()
        configured.dispose()


def test_a_session_with_changes_pending_never_moves() -> None:
    """The move rolls the transaction back: it would drop them."""
    session = Session()
    assert replay._movable(session, True, [])  # a first statement always may
    session.info[replay._RAN] = []
    ran = [(select(literal(1)), None), (select(literal(2)), None)]
    assert replay._movable(session, False, ran)  # no connection held: nothing to doubt
    assert not replay._movable(session, False, [(text("SET LOCAL x = 1"), None), *ran])
    session.add(Thing(id=1))
    assert not replay._movable(session, False, ran)


def test_the_configured_isolation_level_is_read_from_the_dialect() -> None:
    """8. of sqlalchemy_internals: SQLAlchemy keeps create_engine's level where the
    package reads it; when it stops, the level is unknown (and nothing moves)."""
    plain = create_engine("postgresql+psycopg://")
    given = create_engine("postgresql+psycopg://", isolation_level="REPEATABLE READ")
    assert internals.configured_isolation(plain.dialect) is None
    assert internals.configured_isolation(given.dialect) == "REPEATABLE READ"
    assert internals.configured_isolation(object()) == internals.UNKNOWN_ISOLATION  # type: ignore[arg-type]


def test_session_connection_marks_the_transaction_once() -> None:
    """What runs on ``session.connection()`` is unseen: the transaction is marked, once
    however often it is called (memory stays flat in a loop)."""
    engine = create_engine("sqlite://")
    cls = type("Watched", (replay.ReplayConflictRetry, Session), {})
    try:
        with cls(engine) as session:
            for _ in range(5):
                session.connection()
            assert session.info[replay._RAN] == [replay._UNSEEN]
            assert not replay._movable(session, False, session.info[replay._RAN])
    finally:
        engine.dispose()
