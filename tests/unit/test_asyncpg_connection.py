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
