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


def test_the_soak_slope_is_the_growth_after_warm_up_per_100k_requests() -> None:
    from benchmarks.soak import slope_per_100k

    # 5 MB of warm-up, then 1 MB per 100,000 requests.
    samples = [
        (n, 100.0 + (5.0 if n >= 20_000 else n / 4000) + n / 100_000)
        for n in range(0, 300_001, 10_000)
    ]
    assert abs(slope_per_100k(samples) - 1.0) < 1e-6
    flat = [(n, 90.0) for n in range(0, 100_001, 1000)]
    assert slope_per_100k(flat) == 0.0
    with pytest.raises(ValueError):
        slope_per_100k([(0, 1.0), (10, 2.0)])
