"""engine.checkout's check of a read's position with its first statement: the
verdict on what the position query returned, and what is known without asking."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from fastapi_rwdb.engine import checkout
from fastapi_rwdb.engine.checkout import PositionCheck, ReplicaBehindError, check_with_first

NEEDED = (1 << 32) + 0x500  # 1/500


def test_a_position_far_enough_under_read_committed_passes_and_is_remembered() -> None:
    info: dict[str, Any] = {}
    PositionCheck(info, NEEDED).confirm(("1/500", "read committed"))
    position, at = info[checkout._LAST_POSITION]
    assert position == NEEDED and time.monotonic() - at < 1.0


@pytest.mark.parametrize(
    ("row", "unfit"),
    [
        (("1/4FF", "read committed"), False),  # one byte short
        ((None, "read committed"), False),  # no position reported
        (None, False),  # no row at all
        (("2/0", "repeatable read"), True),  # far enough, but its snapshot came first
        (("2/0", "serializable"), True),
    ],
)
def test_anything_else_is_behind(row: Any, unfit: bool) -> None:
    with pytest.raises(ReplicaBehindError) as caught:
        PositionCheck({}, NEEDED).confirm(row)
    assert caught.value.unfit is unfit


def _connection(info: dict[str, Any]) -> Any:
    return SimpleNamespace(connection=SimpleNamespace(info=info))


def test_a_reported_position_is_the_answer_without_a_check() -> None:
    assert check_with_first(_connection({checkout._REPORTED: NEEDED}), NEEDED) is None
    with pytest.raises(ReplicaBehindError):
        check_with_first(_connection({checkout._REPORTED: NEEDED - 1}), NEEDED)


def test_a_connection_found_short_a_moment_ago_is_behind_without_a_check() -> None:
    short = {checkout._LAST_POSITION: (NEEDED - 1, time.monotonic())}
    with pytest.raises(ReplicaBehindError):
        check_with_first(_connection(short), NEEDED)
    long_ago = {checkout._LAST_POSITION: (NEEDED - 1, time.monotonic() - 10)}
    check = check_with_first(_connection(long_ago), NEEDED)
    assert isinstance(check, PositionCheck) and check.needed == NEEDED


# -- asyncpg: the check that fails, and the verdict on its error ----------------------


class _ServerError(Exception):
    """As asyncpg's errors: a message and a SQLSTATE."""

    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def _wrapped(message: str, sqlstate: str = "22P02") -> Exception:
    """As SQLAlchemy's adapter raises it: its own error, the driver's as the cause."""
    adapter = Exception(f"<class 'asyncpg...'>: {message}")
    adapter.__cause__ = _ServerError(message, sqlstate)
    return adapter


def test_the_failing_check_names_the_position_it_needs_in_one_command() -> None:
    query = PositionCheck({}, NEEDED).failing_query()
    assert "'1/500'" in query
    assert "; " not in query  # one of the kept BEGIN's commands, split on "; "


def test_a_short_replica_is_behind_and_its_position_remembered() -> None:
    info: dict[str, Any] = {}
    error = _wrapped('invalid input syntax for type pg_lsn: "rwdb: short, at 1/4FF"')
    with pytest.raises(ReplicaBehindError) as caught:
        PositionCheck(info, NEEDED).judge(error)
    assert caught.value.unfit is False
    assert info[checkout._LAST_POSITION][0] == NEEDED - 1
    # and the connection is known to be behind, with no question asked
    with pytest.raises(ReplicaBehindError):
        check_with_first(_connection(info), NEEDED)


@pytest.mark.parametrize(
    "message",
    [
        "ungültige Eingabesyntax für Typ pg_lsn: »rwdb: short, at 1/4FF«",  # lc_messages=de
        "syntaxe en entrée invalide pour le type pg_lsn : « rwdb: short, at 1/4FF »",  # fr
    ],
)
def test_the_verdict_does_not_depend_on_the_server_language(message: str) -> None:
    info: dict[str, Any] = {}
    with pytest.raises(ReplicaBehindError):
        PositionCheck(info, NEEDED).judge(_wrapped(message))
    assert info[checkout._LAST_POSITION][0] == NEEDED - 1


def test_a_server_with_no_position_is_behind() -> None:
    info: dict[str, Any] = {}
    with pytest.raises(ReplicaBehindError):
        PositionCheck(info, NEEDED).judge(_wrapped('... pg_lsn: "rwdb: short, at none"'))
    assert info[checkout._LAST_POSITION][0] is None


def test_a_transaction_that_is_not_read_committed_is_unfit() -> None:
    error = _wrapped('invalid input syntax for type pg_lsn: "rwdb: isolation repeatable read"')
    with pytest.raises(ReplicaBehindError) as caught:
        PositionCheck({}, NEEDED).judge(error)
    assert caught.value.unfit is True


@pytest.mark.parametrize(
    "error",
    [
        _wrapped('invalid input syntax for type integer: "abc"'),  # the statement's own
        _wrapped('some text "rwdb: short, at 1/4FF"', sqlstate="42P01"),  # another SQLSTATE
        ConnectionResetError("connection lost"),
    ],
)
def test_any_other_error_is_left_to_be_raised(error: Exception) -> None:
    info: dict[str, Any] = {}
    PositionCheck(info, NEEDED).judge(error)  # no verdict: the caller raises it
    assert checkout._LAST_POSITION not in info


def test_a_check_that_passed_remembers_the_position_it_needed() -> None:
    info: dict[str, Any] = {checkout._LAST_POSITION: (NEEDED - 1, time.monotonic())}
    PositionCheck(info, NEEDED).judge(None)
    assert info[checkout._LAST_POSITION][0] == NEEDED
    assert check_with_first(_connection(info), NEEDED) is not None  # no longer behind
