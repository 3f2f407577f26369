"""Reading the answers to the one-message COMMIT (fastapi_rwdb/orm/writes.py), no
database: libpq's results stood in for by objects with the same three fields. The
sending itself, and a COMMIT that fails, are checked against the real stack
(tests/stack/test_read_your_writes.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from fastapi_rwdb.orm import writes
from fastapi_rwdb.routing.lsn import parse_lsn

OK, ROWS = psycopg.pq.ExecStatus.COMMAND_OK, psycopg.pq.ExecStatus.TUPLES_OK


@dataclass
class Result:
    status: Any
    value: bytes | None = None

    @property
    def ntuples(self) -> int:
        return 0 if self.status != ROWS else 1

    def get_value(self, row: int, column: int) -> bytes | None:
        return self.value


def answer(monkeypatch: pytest.MonkeyPatch, results: list[Result]) -> list[str]:
    sent: list[str] = []

    def fake(raw: Any, sql: str) -> list[Result]:
        sent.append(sql)
        return results

    monkeypatch.setattr(writes, "simple_query_results", fake)
    return sent


def test_commit_with_position(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = answer(monkeypatch, [Result(OK), Result(ROWS, b"0/3000060")])
    got = writes._commit_reading_lsn(None, check=False, read_lsn=True)  # type: ignore[arg-type]
    assert got == (True, parse_lsn("0/3000060"))
    assert sent == [writes.COMMIT_READING_LSN_SQL]


@pytest.mark.parametrize(("flag", "wrote"), [(b"t", True), (b"f", False)])
def test_commit_with_the_question(
    monkeypatch: pytest.MonkeyPatch, flag: bytes, wrote: bool
) -> None:
    answer(monkeypatch, [Result(ROWS, flag), Result(OK), Result(ROWS, b"0/10")])
    got = writes._commit_reading_lsn(None, check=True, read_lsn=True)  # type: ignore[arg-type]
    assert got == (wrote, parse_lsn("0/10"))
    answer(monkeypatch, [Result(ROWS, flag), Result(OK)])
    assert writes._commit_reading_lsn(None, check=True, read_lsn=False) == (wrote, None)  # type: ignore[arg-type]


def test_an_answer_short_of_a_result_takes_the_safe_side(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It wrote, at a position no replica reports: the client reads from the primary."""
    answer(monkeypatch, [Result(ROWS, b"f"), Result(OK)])
    got = writes._commit_reading_lsn(None, check=True, read_lsn=True)  # type: ignore[arg-type]
    assert got == (True, writes.UNKNOWN_LSN)
    answer(monkeypatch, [Result(OK)])
    got = writes._commit_reading_lsn(None, check=False, read_lsn=True)  # type: ignore[arg-type]
    assert got == (True, writes.UNKNOWN_LSN)
