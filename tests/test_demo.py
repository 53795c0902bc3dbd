"""A smaller `kvfleet demo` end to end: real replicas, balancer, load generator."""

from __future__ import annotations

import pytest

from kvfleet.demo import DemoConfig, run_demo

pytestmark = pytest.mark.slow


def test_small_demo_compares_policies(tmp_path):
    lines = []
    out = run_demo(DemoConfig(max_requests=30, out=str(tmp_path)), log=lines.append)
    s = out["summaries"]
    assert s["round_robin"]["completed"] == s["precise_prefix"]["completed"] == 30
    assert "| cache hit rate |" in out["table"] and (tmp_path / "compare.md").exists()
    assert s["precise_prefix"]["cache_hit_rate"] > s["round_robin"]["cache_hit_rate"]
    assert list(tmp_path.glob("*.png")), "the report has plots"
