"""A smaller `kvfleet demo` end to end: real replicas, balancer, load generator."""

from __future__ import annotations

import pytest

from kvfleet.demo import DemoConfig, run_demo, verdict

pytestmark = pytest.mark.slow


def test_small_demo_compares_policies(tmp_path):
    lines = []
    out = run_demo(DemoConfig(max_requests=30, out=str(tmp_path)), log=lines.append)
    s = out["summaries"]
    assert s["round_robin"]["completed"] == s["predictive"]["completed"] == 30
    assert "| cache hit rate |" in out["table"] and (tmp_path / "compare.md").exists()
    assert s["predictive"]["cache_hit_rate"] > s["round_robin"]["cache_hit_rate"]
    assert (tmp_path / "compare_ttft_cdf.png").is_file(), "both policies' TTFT on one plot"
    assert out["verdict"] in lines[-2] and out["verdict"].startswith("predictive")


@pytest.mark.parametrize("mean, sentence", [(60.0, "predictive vs round_robin on the same requests: mean TTFT −40 %"),
                                            (120.0, "predictive did not beat round_robin on this run: mean TTFT +20 %")])
def test_verdict_says_plainly_who_won(mean, sentence):
    s = {"round_robin": {"mean_ttft_ms": 100.0, "p99_ttft_ms": 400.0, "cache_hit_rate": 0.31},
         "predictive": {"mean_ttft_ms": mean, "p99_ttft_ms": 236.0, "cache_hit_rate": 0.84}}
    v = verdict(s, "round_robin", "predictive")
    assert v.startswith(sentence)
    assert "p99 −41 %" in v and "cache hit rate 0.84 vs 0.31" in v
