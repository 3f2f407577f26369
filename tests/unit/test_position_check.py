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
