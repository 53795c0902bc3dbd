"""Synthetic arrivals, lengths, shared prefixes, sessions, and the generated agentic traces."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadgen.generate import GenerateConfig, generate, generate_file
from loadgen.arrivals import gamma_arrivals
from loadgen.synthetic import LengthDist, SyntheticConfig, retime, synthesize
from loadgen.traces import TraceRequest, load_trace


def test_gamma_arrivals_mean_rate_and_burstiness():
    rng = np.random.default_rng(0)
    t = gamma_arrivals(2000, 10.0, 1.0, rng)
    assert t[-1] == pytest.approx(200.0)  # vLLM rescales so the last arrival is at n / rate
    assert np.all(np.diff(t) > 0)
    cv = lambda x: np.std(np.diff(x)) / np.mean(np.diff(x))  # noqa: E731
    assert 0.9 < cv(t) < 1.1  # Poisson: coefficient of variation 1
    assert cv(gamma_arrivals(2000, 10.0, 0.25, rng)) > 1.6  # burstier: cv = 1/sqrt(shape) = 2
    assert np.allclose(np.diff(gamma_arrivals(10, 4.0, math.inf)), 0.25)
    assert np.array_equal(gamma_arrivals(5, 2.0, 1.0, np.random.default_rng(1)),
                          gamma_arrivals(5, 2.0, 1.0, np.random.default_rng(1)))
    with pytest.raises(ValueError, match="rate"):
        gamma_arrivals(5, 0.0)


def test_length_distributions_parse_and_sample():
    rng = np.random.default_rng(0)
    assert LengthDist.parse("128").sample(rng, 3).tolist() == [128, 128, 128]
    u = LengthDist.parse("uniform:10:20").sample(rng, 1000)
    assert u.min() >= 10 and u.max() <= 20
    ln = LengthDist.parse("lognormal:200:100").sample(rng, 20000)
    assert 190 < ln.mean() < 210 and 90 < ln.std() < 110
    for bad in ("lognormal:1", "gauss:1:2", "uniform:5:1", "x"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def _lcp(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_prefix_groups_share_their_system_prompt_blocks():
    cfg = SyntheticConfig(num_requests=300, rate=10, input_len=LengthDist("fixed", 40), prefix_groups=3,
                          prefix_len=64, block_tokens=16, zipf_s=1.0, seed=2)
    reqs = synthesize(cfg)
    assert len(reqs) == 300
    by = {}
    for r in reqs:
        by.setdefault(r.tenant, []).append(r)
        assert r.input_length == 104 and len(r.hash_ids) == math.ceil(104 / 16)
    assert len(by) == 3
    assert len(by["group0"]) > len(by["group2"])  # Zipf popularity
    for group in by.values():
        assert all(_lcp(group[0].hash_ids, r.hash_ids) == 4 for r in group[1:])  # 64 tokens = 4 blocks
    assert _lcp(by["group0"][0].hash_ids, by["group1"][0].hash_ids) == 0


def test_sessions_extend_the_previous_prompt():
    cfg = SyntheticConfig(num_requests=60, rate=5, sessions=10, input_len=LengthDist("fixed", 20),
                          output_len=LengthDist("fixed", 10), block_tokens=16, think_time_s=1.0, seed=0)
    reqs = synthesize(cfg)
    assert len(reqs) == 60
    sessions = {}
    for r in reqs:
        sessions.setdefault(r.session_id, []).append(r)
    for turns in sessions.values():
        turns.sort(key=lambda r: r.turn)
        for prev, cur in zip(turns, turns[1:]):
            assert cur.arrival_s >= prev.arrival_s
            assert cur.input_length == prev.input_length + prev.output_length + 20
            assert _lcp(prev.hash_ids, cur.hash_ids) == prev.input_length // 16  # all full blocks shared


def test_retime_reaches_the_requested_rate():
    reqs = [TraceRequest(float(t), 10, 1) for t in (0, 1, 5, 6, 10)]
    out = retime(reqs, 1.0)
    assert out[-1].arrival_s == pytest.approx(5.0)
    assert [r.arrival_s for r in out] == pytest.approx([0, 0.5, 2.5, 3.0, 5.0])


def test_generated_agentic_trace_structure_and_determinism(tmp_path):
    cfg = GenerateConfig(num_requests=200, seed=5)
    reqs = generate(cfg)
    assert reqs == generate(cfg) and reqs != generate(GenerateConfig(num_requests=200, seed=6))
    assert len(reqs) == 200
    assert all(math.ceil(r.input_length / 512) == len(r.hash_ids) for r in reqs)
    sessions: dict[str, list[TraceRequest]] = {}
    for r in reqs:
        sessions.setdefault(r.session_id, []).append(r)
    # every request of a session extends the previous one's context (agent loops and turns alike)
    grew = 0
    for turns in sessions.values():
        for prev, cur in zip(turns, turns[1:]):
            assert cur.input_length > prev.input_length
            assert _lcp(prev.hash_ids, cur.hash_ids) >= prev.input_length // 512
            grew += 1
    assert grew > 100
    # sessions of one tenant share the tenant's system prompt; tenants do not share
    firsts: dict[str, list[TraceRequest]] = {}
    for turns in sessions.values():
        firsts.setdefault(turns[0].tenant, []).append(turns[0])
    multi = [f for f in firsts.values() if len(f) > 1]
    assert multi and all(_lcp(f[0].hash_ids, g.hash_ids) >= 4 for f in multi for g in f[1:])
    tenants = list(firsts)
    assert _lcp(firsts[tenants[0]][0].hash_ids, firsts[tenants[1]][0].hash_ids) == 0
    # agent loops: short tool-call outputs inside a turn
    assert any(a.turn == b.turn for t in sessions.values() for a, b in zip(t, t[1:]))
    p = tmp_path / "a.jsonl"
    assert generate_file(p, cfg) == 200
    back = load_trace(p)
    assert [(r.hash_ids, r.session_id, r.tenant) for r in back] == [(r.hash_ids, r.session_id, r.tenant) for r in reqs]


def test_generated_hot_prompt_trace():
    cfg = GenerateConfig(kind="hot", num_requests=400, tenants=5, hot_share=0.8, burstiness=0.5, seed=2)
    reqs = generate(cfg)
    assert reqs == generate(cfg) and len(reqs) == 400
    assert all(r.turn == 0 for r in reqs) and len({r.session_id for r in reqs}) == 400  # single-turn
    hot = [r for r in reqs if r.tenant == "tenant0"]
    assert 0.7 < len(hot) / len(reqs) < 0.9
    # the hot requests share the whole system prompt and nothing after it
    head = min(_lcp(hot[0].hash_ids, r.hash_ids) for r in hot[1:])
    assert head >= 4 and all(len(r.hash_ids) > head for r in hot)
    assert len({r.hash_ids[head] for r in hot}) == len(hot)
    with pytest.raises(ValueError, match="hot_share"):
        GenerateConfig(kind="hot", tenants=1, hot_share=0.5)


def test_class_mix_is_seeded_and_keeps_sessions_in_one_class():
    from loadgen.synthetic import assign_classes, parse_class_mix
    from loadgen.traces import TraceRequest

    assert parse_class_mix("interactive=1,batch=3") == {"interactive": 1.0, "batch": 3.0}
    for bad in ("x", "a=0", "a=-1", "=2", ""):
        with pytest.raises(ValueError, match="class mix|--class-mix"):
            parse_class_mix(bad)
    reqs = [TraceRequest(arrival_s=i, input_length=10, output_length=2, session_id=f"s{i % 5}") for i in range(400)]
    a = assign_classes(reqs, {"interactive": 1, "batch": 3}, seed=1)
    assert [r.tenant for r in a] == [r.tenant for r in assign_classes(reqs, {"interactive": 1, "batch": 3}, seed=1)]
    by_session = {}
    for r in a:
        assert by_session.setdefault(r.session_id, r.tenant) == r.tenant
    lone = assign_classes([TraceRequest(arrival_s=i, input_length=10, output_length=2) for i in range(400)],
                          {"interactive": 1, "batch": 3}, seed=2)
    share = sum(r.tenant == "batch" for r in lone) / 400
    assert 0.65 < share < 0.85
