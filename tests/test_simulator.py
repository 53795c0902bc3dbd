"""The simulator: step-time model, bounds, determinism, and the offline fleet."""

from __future__ import annotations

import pytest

from loadgen.traces import TraceRequest
from replica.step_model import PRESETS, StepFeatures, StepTimeModel, get_preset
from simulator.bounds import infinite_cache_hits
from simulator.run import SimulateConfig, simulate


def test_step_model_fit_recovers_known_coefficients():
    truth = StepTimeModel(0.004, 1e-4, 2e-8, 0.0, 5e-7, 3e-4)
    rows = [StepFeatures(n, n * (c + n / 2), c, d, s) for n, c, d, s in
            [(1, 0, 100, 1), (512, 0, 0, 1), (512, 512, 0, 1), (32, 0, 4000, 32), (300, 100, 2000, 9),
             (8, 0, 900, 8), (1024, 2048, 0, 1), (64, 0, 12000, 64), (128, 256, 500, 5)]]
    fitted = StepTimeModel.fit(rows, [truth.duration(r) for r in rows])
    for r in rows:
        assert fitted.duration(r) == pytest.approx(truth.duration(r), rel=1e-6)
    assert all(c >= 0 for c in fitted.coefficients())


def test_presets_are_sane():
    for name, p in PRESETS.items():
        m = p.model
        assert m.prefill_time(1000) > m.prefill_time(100) > 0, name
        # a decode step of 32 sequences is far cheaper than prefilling 2k tokens
        assert m.decode_step_time(32, 1000) < m.prefill_time(2048), name
    with pytest.raises(ValueError, match="unknown sim preset"):
        get_preset("nope")


def test_infinite_cache_hits():
    chains = [[1, 2, 3], [1, 2, 4], [5], [1, 2, 3, 6], [2, 3]]
    assert infinite_cache_hits(chains, 16) == [0, 32, 0, 48, 32]


def small_trace(n: int = 60) -> list[TraceRequest]:
    # Four tenants sharing a 6-block system prompt (hash blocks of 64 tokens), then unique blocks.
    out = []
    for i in range(n):
        tenant = i % 4
        hashes = tuple(range(100 * tenant, 100 * tenant + 6)) + (10_000 + 2 * i, 10_001 + 2 * i)
        out.append(TraceRequest(arrival_s=0.05 * i, input_length=len(hashes) * 64 - 10, output_length=8 + i % 5,
                                hash_ids=hashes, hash_block_tokens=64, tenant=f"t{tenant}"))
    return out


def run_small(policies=("round_robin", "precise_prefix"), seed=0):
    cfg = SimulateConfig(replicas=3, preset=get_preset("llama3-8b-h100"), policies=policies, load=0.7, seed=seed)
    return simulate(small_trace(), cfg)


def test_same_seed_identical_results():
    a, b = run_small(seed=3), run_small(seed=3)
    for pa, pb in zip(a["policies"], b["policies"]):
        pa, pb = dict(pa), dict(pb)
        pa.pop("wall_s"), pb.pop("wall_s")
        assert pa == pb
    ra, rb = a["_results"]["precise_prefix"].records, b["_results"]["precise_prefix"].records
    assert [(r.replica, r.first_token, r.finish) for r in ra] == [(r.replica, r.first_token, r.finish) for r in rb]


def test_cache_aware_policy_hits_more_and_bounds_hold():
    out = run_small()
    by = {p["policy"]: p for p in out["policies"]}
    assert by["precise_prefix"]["cache_hit_rate"] > by["round_robin"]["cache_hit_rate"]
    bound = out["bounds"]
    for p in out["policies"]:
        assert p["completed"] == 60
        assert p["cache_hit_rate"] <= bound["infinite_cache_hit_rate"] + 1e-9
        assert p["mean_ttft_s"] >= bound["ideal_mean_ttft_s"] - 1e-9
