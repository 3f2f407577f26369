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


def test_a_kept_begin_is_parse_bind_execute_of_each_command_without_a_sync() -> None:
    """The messages written ahead of the first statement's describe step: for each
    command a Parse of the unnamed statement (no parameter types), a Bind of the
    unnamed portal (no formats, no parameters), an Execute of every row; no Sync
    (the statement's own ends them) and nothing else."""
    sent = asyncpg_connection._as_messages("BEGIN READ ONLY; SET LOCAL statement_timeout = 900")
    messages, at = [], 0
    while at < len(sent):
        kind, length = sent[at : at + 1], int.from_bytes(sent[at + 1 : at + 5], "big")
        messages.append((kind, sent[at + 5 : at + 1 + length]))
        at += 1 + length
    assert at == len(sent)
    assert [kind for kind, _ in messages] == [b"P", b"B", b"E"] * 2
    assert messages[0][1] == b"\0BEGIN READ ONLY\0\0\0"
    assert messages[3][1] == b"\0SET LOCAL statement_timeout = 900\0\0\0"
    assert messages[1][1] == messages[4][1] == b"\0\0" + b"\0" * 6
    assert messages[2][1] == messages[5][1] == b"\0" + b"\0" * 4


def test_asyncpg_keeps_what_the_kept_begin_relies_on() -> None:
    """The private asyncpg names the kept BEGIN uses (engine/asyncpg_connection.py):
    the statement choke point, the transport it writes on, the cancellations it
    waits for. A release without them fails here; the probe would then say no."""
    import inspect

    assert inspect.iscoroutinefunction(asyncpg.Connection._get_statement)
    assert inspect.iscoroutinefunction(asyncpg.Connection._copy_out)
    # The COPY after a COMMIT goes straight to what _copy_out sends a function's COPY to.
    copy_out = inspect.getsource(asyncpg.Connection._copy_out)
    assert "await self._protocol.copy_out(copy_stmt, writer, timeout)" in copy_out
    assert {"_protocol", "_transport", "_cancellations", "_stmt_cache_enabled"} <= set(
        asyncpg.Connection.__slots__
    )
    source = inspect.getsource(asyncpg.Connection._do_execute)
    assert "self._get_statement(" in source  # fetch, execute with arguments, executemany


class _Transport:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")


class _SlotTransport:  # as uvloop's: no instance attributes
    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.calls.append("pause")


def test_a_copy_does_not_pause_the_reading_and_gives_the_methods_back() -> None:
    transport = _Transport()
    with asyncpg_connection._reading_unpaused(transport):
        transport.pause_reading()
        transport.resume_reading()
    assert transport.calls == []
    transport.pause_reading()
    assert transport.calls == ["pause"]
    with pytest.raises(ValueError), asyncpg_connection._reading_unpaused(transport):
        raise ValueError  # given back when the COPY fails too
    transport.resume_reading()
    assert transport.calls == ["pause", "resume"]


def test_a_transport_whose_methods_cannot_be_replaced_keeps_its_pause() -> None:
    transport = _SlotTransport()
    with asyncpg_connection._reading_unpaused(transport):
        transport.pause_reading()
    assert transport.calls == ["pause"]


async def test_the_copy_sink_keeps_the_first_line_and_never_waits() -> None:
    sink = asyncpg_connection._Lines()
    step = sink(b"0/3000")
    with pytest.raises(StopIteration):  # done at its first step: nothing awaited
        step.send(None)
    await sink(b"148\tx\nsecond\n")
    assert sink.first() == "0/3000148\tx"
    assert asyncpg_connection._Lines().first() is None
    null = asyncpg_connection._Lines()
    await null(b"\\N\n")
    assert null.first() is None
