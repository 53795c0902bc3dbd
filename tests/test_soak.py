"""A 30 s soak at a fixed moderate load (bench/bench_soak.py runs 10 minutes at 80 % of the
measured capacity): no failed request, no descriptor growth, bounded memory growth."""

from __future__ import annotations

import pytest

from harness.chaos import ChaosFleet, run_soak

pytestmark = pytest.mark.slow


def test_short_soak():
    with ChaosFleet(replicas=2) as fleet:
        r = run_soak(fleet, duration_s=30.0, rate=8.0)
    assert r.sent == r.completed, (r.errored, r.lost, r.errors_per_window)
    assert not r.fd_leaks, (r.fd_leaks, r.fd_kinds[-1], r.peak_concurrency)
    # 30 s is mostly warm-up for the allocator; the 10-minute bench holds it to 10 %.
    assert r.rss_growth < 0.15, (r.rss_growth, r.rss_kb[::5])
