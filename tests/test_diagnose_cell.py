"""bench/diagnose_cell.py: one policy on one small simulated cell, its decisions and spread."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("diagnose_cell", Path(__file__).parents[1] / "bench" / "diagnose_cell.py")
diagnose_cell = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(diagnose_cell)


@pytest.mark.parametrize("policy", ["predictive", "precise_prefix"])
def test_reports_every_decision_and_each_replicas_share(policy, capsys):
    assert diagnose_cell.main(["--workload", "agentic", "--requests", "60", "--replicas", "3", "--kv-tokens", "60000",
                               "--policy", policy, "--per-replica"]) == 0
    out = capsys.readouterr().out
    assert "decisions 60;" in out
    rows = [line for line in out.splitlines() if line.startswith("  http://r")]
    assert len(rows) == 3 and sum(int(r.split(": ")[1].split(",")[0]) for r in rows) == 60
    if policy == "predictive":  # numeric cost terms: its TTFT estimates are set against the delivered ones
        assert "estimated TTFT mean" in out


def test_a_missing_sweep_file_or_workload_says_what_to_pass(tmp_path, capsys):
    with pytest.raises(SystemExit):
        diagnose_cell.main(["--spec", str(tmp_path / "nope.toml")])
    assert "pass --spec" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        diagnose_cell.main(["--workload", "nope"])
    err = capsys.readouterr().err
    assert "choose one of" in err and "mooncake" in err


def test_tail_lists_the_slowest_requests_slowest_first(capsys):
    assert diagnose_cell.main(["--workload", "hot", "--requests", "40", "--replicas", "2", "--kv-tokens", "60000",
                               "--tail", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(out) if line.startswith("the 5 slowest requests"))
    rows = [line.split() for line in out[start + 1:] if line.startswith("  ") and not line.startswith("      ")][:5]
    assert len(rows) == 5
    ttfts = [float(r[6]) for r in rows]  # index, arrival, replica, prompt, cached, matched, TTFT
    assert ttfts == sorted(ttfts, reverse=True)
    assert all("cost=" in " ".join(r) for r in rows)  # predictive's terms at routing time
