"""engine/asyncpg_connection.py without a server: what may be armed, and when."""

import asyncpg  # type: ignore[import-untyped]
import pytest

from fastapi_rwdb.engine import asyncpg_connection
from fastapi_rwdb.engine.asyncpg_connection import PackageConnection, arm, is_ours


class Plain(asyncpg.Connection):  # type: ignore[misc]
    """An application's own connection class (never connected here)."""

    def __del__(self) -> None:
        pass


class Unconnected(PackageConnection):
    def __del__(self) -> None:
        pass


def test_only_the_packages_class_is_ours() -> None:
    assert is_ours(Unconnected.__new__(Unconnected))
    assert not is_ours(Plain.__new__(Plain))
    assert not is_ours(object())


@pytest.mark.parametrize("probed", [None, False])
def test_nothing_is_armed_until_the_probe_said_yes(
    probed: bool | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(asyncpg_connection, "_commit_with_copy", probed)
    assert not arm(Unconnected.__new__(Unconnected))


def test_an_armed_commit_that_was_never_sent_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncpg_connection, "_commit_with_copy", True)
    raw = Unconnected.__new__(Unconnected)
    assert arm(raw)
    assert asyncpg_connection.committed_at(raw) == (False, None)  # disarmed: read it otherwise
    assert not raw.rwdb_commit_reads_position
    assert not arm(Plain.__new__(Plain))


async def test_a_begin_reading_carries_its_statement_and_query_in_one_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the BEGIN of a read with a token sends, and that nothing is left armed."""
    monkeypatch.setattr(asyncpg_connection, "_commit_with_copy", True)
    sent: list[tuple[str, float | None]] = []

    async def copy_out(raw: object, sql: str, timeout: float | None) -> str:
        sent.append((sql, timeout))
        return "0/3000060\tread committed"

    monkeypatch.setattr(asyncpg_connection, "_copy_out", copy_out)
    raw = Unconnected.__new__(Unconnected)

    async def start() -> None:  # as asyncpg's transaction object sends it
        assert await raw.execute("BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY;") == "BEGIN"

    answer = await asyncpg_connection.begin_reading(
        raw, start, "SELECT 1, 2", "SET LOCAL statement_timeout = 4000", 2.5
    )
    assert answer == (True, "0/3000060\tread committed")
    assert sent == [
        (
            "BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY; SET LOCAL statement_timeout = 4000;"
            " COPY (SELECT 1, 2) TO STDOUT",
            2.5,
        )
    ]
    assert raw.rwdb_pending is None and raw.rwdb_begin_copies is None
    assert raw.rwdb_begin_copied is None


async def test_a_begin_reading_that_fails_leaves_nothing_armed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(asyncpg_connection, "_commit_with_copy", True)
    raw = Unconnected.__new__(Unconnected)

    async def start() -> None:
        raise TimeoutError  # the BEGIN's message got no answer in time

    with pytest.raises(TimeoutError):
        await asyncpg_connection.begin_reading(raw, start, "SELECT 1", None, 1.0)
    assert raw.rwdb_pending is None and raw.rwdb_begin_copies is None


@pytest.mark.parametrize("probed", [None, False])
async def test_no_begin_reading_until_the_probe_said_yes(
    probed: bool | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(asyncpg_connection, "_commit_with_copy", probed)
    started: list[bool] = []

    async def start() -> None:
        started.append(True)

    raw = Unconnected.__new__(Unconnected)
    assert await asyncpg_connection.begin_reading(raw, start, "SELECT 1", None, 1.0) == (
        False,
        None,
    )
    assert started == []  # the caller reads the position its old way


async def test_a_begin_that_did_not_come_through_execute_is_not_taken_for_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Were a SQLAlchemy or asyncpg release to open the transaction another way, the
    caller is told, and reads the position its old way."""
    monkeypatch.setattr(asyncpg_connection, "_commit_with_copy", True)
    raw = Unconnected.__new__(Unconnected)

    async def start() -> None:
        pass

    assert await asyncpg_connection.begin_reading(raw, start, "SELECT 1", None, 1.0) == (
        False,
        None,
    )
    assert raw.rwdb_begin_copies is None
