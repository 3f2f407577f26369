"""Per-process dictionaries that a long run could grow without end stay bounded."""

from __future__ import annotations

import logging

import pytest

from fastapi_rwdb.routing import request


def test_the_late_commit_warnings_remember_a_bounded_number_of_paths(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(request, "_late_warned", {})
    caplog.set_level(logging.ERROR, logger="fastapi_rwdb")
    for i in range(5000):  # no route matched: one key per URL
        request._warn_late_commit({"method": "POST", "path": f"/items/{i}"})
    assert 0 < len(request._late_warned) <= 1000
