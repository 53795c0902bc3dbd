"""Predictor evaluation: the metrics, the online replay, the acceptance numbers on the shared
traces and on kvfleet's own generated workloads, and `kvfleet predict eval`."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from loadgen.traces import TraceRequest, load_trace
from predictors import Features
from predictors.evaluate import EvalConfig, evaluate_features, evaluate_trace, history_mask, table
from predictors.features import chain_ids
from predictors.metrics import bucket_accuracy, coverage, kendall_tau, mae, median_relative_error
from predictors.workloads import workload

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "traces"
MOONCAKE = SHARED / "mooncake_synthetic.jsonl"
AZURE = SHARED / "azure2023_code.csv"


# ----------------------------------------------------------------------------- metrics


def brute_tau_b(x, y) -> float:
    conc = disc = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            tx += 1
        elif dy == 0:
            ty += 1
        elif dx == dy:
            conc += 1
        else:
            disc += 1
    return (conc - disc) / math.sqrt((conc + disc + tx) * (conc + disc + ty))


@pytest.mark.parametrize("seed", range(8))
def test_kendall_tau_matches_the_definition_with_ties(seed):
    rng = random.Random(seed)
    n = rng.randrange(2, 120)
    levels = rng.choice([3, 10, 1000])
    x = [rng.randrange(levels) for _ in range(n)]
    y = [xi + rng.randrange(levels) if seed % 2 else rng.randrange(levels) for xi in x]
    if len(set(x)) == 1 or len(set(y)) == 1:
        assert math.isnan(kendall_tau(x, y))
    else:
        assert kendall_tau(x, y) == pytest.approx(brute_tau_b(x, y), abs=1e-12)


def test_kendall_tau_edges_and_scale():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3])) and math.isnan(kendall_tau([1], [1]))
    with pytest.raises(ValueError):
        kendall_tau([1, 2], [1])
    rng = np.random.default_rng(0)
    x = rng.normal(size=50_000)
    assert abs(kendall_tau(x, rng.normal(size=50_000))) < 0.02  # O(n log n): 50k points in well under a second
    assert kendall_tau(x, x + 0.1 * rng.normal(size=50_000)) > 0.9


def test_error_metrics():
    assert mae([10, 20], [12, 10]) == 6
    assert median_relative_error([10, 0, 5], [5, 0, 5]) == 0  # |0-0|/max(0,1)=0, 0, 1 -> median 0
    assert median_relative_error([10], [5]) == 1
    assert bucket_accuracy([5, 9, 1, 0], [7, 16, 1, 1]) == 0.75  # [4,8) yes, 9 vs 16 no, 1 vs 1 yes, 0 ~ 1 yes
    assert coverage([1, 1, 1], [5, 5, 5], [0, 3, 5]) == pytest.approx(2 / 3)
    assert math.isnan(mae([], []))


# ----------------------------------------------------------------------------- the online replay


def repeats(n: int, groups: int, seed: int = 0) -> tuple[list[Features], list[int]]:
    rng = random.Random(seed)
    gs = [rng.randrange(groups) for _ in range(n)]
    return [Features(100, chain_ids((g,))) for g in gs], [7 * (g + 1) for g in gs]


def test_history_mask_respects_the_observation_delay():
    feats, _ = repeats(10, 1)
    assert history_mask(feats, 0).tolist() == [False] + [True] * 9
    assert history_mask(feats, 3).tolist() == [False] * 4 + [True] * 6
    assert not history_mask([Features(5)] * 4, 0).any()  # no block hashes, no history


def test_evaluation_is_online_and_delay_costs_accuracy():
    """Every request is predicted before its own output is observed: exact repeats are learned,
    but a first sighting is never right by peeking, and a longer completion lag hurts."""
    feats, ys = repeats(600, 40)
    res = [evaluate_features(feats, ys, EvalConfig(("prefix_history",), delay=d)) for d in (0, 200)]
    r0 = res[0]["predictors"]["prefix_history"]
    assert r0["history"]["mae"] == 0  # exact repeats once seen
    first = ~history_mask(feats, 0)
    assert first.sum() == 40 and r0["all"]["mae"] > 0
    assert res[1]["with_history"] < res[0]["with_history"]
    assert res[1]["predictors"]["prefix_history"]["all"]["mae"] > r0["all"]["mae"]
    assert res[0]["predictors"]["global_median"]["all"]["mae_vs_baseline"] == 1.0  # the baseline is always there


def test_eval_config_validates():
    for bad in (dict(predictors=()), dict(predictors=("nope",)), dict(predictors=("ensemble", "ensemble")),
                dict(delay=-1), dict(max_requests=0)):
        with pytest.raises(ValueError):
            EvalConfig(**bad)


def test_table_reports_both_subsets_and_a_trace_without_prefixes():
    reqs = [TraceRequest(float(i), 100 + i, 10 + i % 7) for i in range(50)]
    res = evaluate_trace(reqs, EvalConfig(("prefix_history",), max_requests=40))
    assert res["requests"] == 40 and res["with_history"] == 0
    text = table(res)
    assert "global_median" in text and "prefix_history" in text and "no request has prefix history" in text


# ----------------------------------------------------------------------------- acceptance on the shared traces


@pytest.mark.skipif(not MOONCAKE.is_file(), reason=f"shared trace not present at {MOONCAKE}")
def test_mooncake_prefix_history_halves_the_global_median_error_on_requests_with_history():
    res = evaluate_trace(load_trace(MOONCAKE), EvalConfig(("prefix_history", "ensemble")))
    hist = {k: v["history"] for k, v in res["predictors"].items()}
    assert res["with_history"] > 1000
    assert hist["prefix_history"]["mae"] <= 0.5 * hist["global_median"]["mae"]
    assert hist["ensemble"]["mae"] <= 0.5 * hist["global_median"]["mae"]
    assert res["predictors"]["ensemble"]["all"]["mae"] < res["predictors"]["global_median"]["all"]["mae"]
    assert hist["prefix_history"]["kendall_tau"] > 0.4


@pytest.mark.skipif(not AZURE.is_file(), reason=f"shared trace not present at {AZURE}")
def test_azure_code_ensemble_is_no_worse_than_the_global_median():
    """No prefix information and lengths nearly independent of prompt length: the best a
    predictor can do is not to lose to the median."""
    res = evaluate_trace(load_trace(AZURE), EvalConfig(("ensemble",)))
    p = res["predictors"]
    assert p["ensemble"]["all"]["mae"] <= 1.02 * p["global_median"]["all"]["mae"]


# ----------------------------------------------------------------------------- kvfleet's own workloads


@pytest.mark.parametrize("labels", [True, False], ids=["tenant-labels", "prefix-only"])
def test_generated_tenant_skewed_workload_is_learned(labels):
    """Tenants with their own output profiles, told apart by name or only by their system prompt."""
    res = evaluate_trace(workload("tenant-skewed", 1500, 5, seed=3, tenant_labels=labels),
                         EvalConfig(("prefix_history", "online_regressor", "ensemble")))
    p = res["predictors"]
    for name in ("prefix_history", "online_regressor", "ensemble"):
        assert p[name]["all"]["mae_vs_baseline"] < 0.75, name
        assert p[name]["all"]["kendall_tau"] > 0.5, name


@pytest.mark.parametrize("kind", ["agentic", "chat"])
def test_generated_workload_without_signal_costs_little(kind):
    """loadgen's generator draws output lengths independently of the prompt: nothing to learn,
    and the gated predictors must not do much worse than the median."""
    res = evaluate_trace(workload(kind, 1500, 6, seed=2), EvalConfig(("prefix_history", "ensemble")))
    p = res["predictors"]
    assert p["prefix_history"]["all"]["mae_vs_baseline"] < 1.04
    assert p["ensemble"]["all"]["mae_vs_baseline"] < 1.03


# ----------------------------------------------------------------------------- CLI


def test_cli_eval_on_the_bundled_trace_and_errors(tmp_path, capsys):
    from kvfleet.cmd_predict import main

    bundled = ROOT / "loadgen" / "data" / "agentic_small.jsonl"
    assert main(["eval", "--trace", str(bundled), "--predictors", "prefix_history,ensemble",
                 "--delay", "4", "--out", str(tmp_path), "--label", "small"]) == 0
    out = capsys.readouterr().out
    assert "| ensemble |" in out and "requests with prefix history" in out
    data = json.loads((tmp_path / "small.json").read_text())
    assert data["delay"] == 4 and set(data["predictors"]) == {"global_median", "prefix_history", "ensemble"}
    assert {"mae", "median_rel_err", "kendall_tau", "bucket_acc", "coverage_p10_p90", "mae_vs_baseline"} \
        <= set(data["predictors"]["ensemble"]["all"])
    assert (tmp_path / "small.md").read_text().startswith("**all requests")

    assert main(["eval", "--generate", "chat", "--num-requests", "200", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "chat-seed0.json").is_file()

    assert main(["eval", "--trace", str(bundled), "--predictors", "oracle", "--out", str(tmp_path)]) == 2
    assert main(["eval", "--trace", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2
    assert "oracle" in capsys.readouterr().err
