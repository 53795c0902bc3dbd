"""kvfleet's predictive policy and its online step-time learner."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest

from balancer.policies import make_policy
from balancer.policies.base import ReplicaLoad, ReplicaView, RoutingRequest
from balancer.step_learner import StepLearner


@dataclass
class Step:
    start: float
    duration: float
    prefill_tokens: int
    decode_tokens: int
    num_seqs: int
    context_tokens: int
    decode_context_tokens: int


THETA = np.array([0.02, 1.8e-4, 3e-4, 8e-8, 4e-6])


def synthetic_steps(theta=THETA, n=400, seed=0, t0=0.0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, d = rng.choice([0, rng.randint(1, 2048)]), rng.randint(0, 64)
        dctx = d * rng.randint(100, 2000)
        pctx = rng.randint(0, 20_000) if p else 0
        out.append(Step(t0 + i, float(np.dot(theta, [1, p, d, dctx, pctx])), p, d, d + (p > 0), dctx + pctx, dctx))
    return out


def test_learner_recovers_step_coefficients_and_dedups():
    theta = THETA
    learner = StepLearner()
    steps = synthetic_steps(theta)
    assert learner.observe("a", steps) == 400
    assert learner.observe("a", steps[-10:]) == 0  # already seen (reports overlap)
    np.testing.assert_allclose(learner.coefficients("a"), theta, rtol=0.05, atol=1e-9)
    assert learner.max_step_tokens["a"] >= 2000
    # a replica with no samples of its own uses the fleet-wide model
    np.testing.assert_allclose(learner.coefficients("new"), learner.coefficients("a"), rtol=0.2)


def request(matched: dict[str, int], prompt: int = 4096, out: float | None = 100) -> RoutingRequest:
    return RoutingRequest("r", "", prompt, tuple(range(prompt // 16)), 16, matched, predicted_output_tokens=out)


def view(rid: str, **load) -> ReplicaView:
    base = dict(num_running=4, num_waiting=0, queued_prefill_tokens=0, running_decode_tokens=4000,
                free_blocks=5000, total_blocks=8000, kv_usage=0.3, age_s=0.05)
    base.update(load)
    return ReplicaView(rid, load=ReplicaLoad(**base))


@pytest.fixture
def policy():
    p = make_policy("predictive")
    for rid in ("a", "b", "c"):
        p.observe_steps(rid, synthetic_steps(seed=sum(map(ord, rid))))
    return p


def test_prefers_the_cached_prefix_when_loads_are_equal(policy):
    d = policy.select(request({"b": 200}), [view("a"), view("b"), view("c")])
    assert d.replica_id == "b"
    assert d.scores["b"]["uncached_tokens"] == 4096 - 200 * 16
    assert "TTFT" in d.reason


def test_does_not_queue_behind_a_hot_replica(policy):
    # b holds the prefix but has a long prefill queue: waiting there costs more than recomputing
    hot = view("b", queued_prefill_tokens=60_000, num_waiting=20)
    d = policy.select(request({"b": 256}), [view("a"), hot, view("c")])
    assert d.replica_id != "b"
    assert d.scores["b"]["ttft"] > d.scores[d.replica_id]["ttft"]


def test_counts_what_it_sent_since_the_last_report(policy):
    a, b = view("a"), view("b")
    first = policy.select(request({}), [a, b]).replica_id
    busy = ReplicaView(first, sent_since_report=3, sent_tokens_since_report=12_000, load=a.load)
    other = b if first == "a" else a
    assert policy.select(request({}), [busy, other]).replica_id == other.replica_id


def test_kv_pressure_is_a_cost(policy):
    full = view("a", free_blocks=10)
    d = policy.select(request({}), [full, view("b")])
    assert d.replica_id == "b" and d.scores["a"]["memory"] > 0 and d.scores["b"]["memory"] == 0


def test_stale_reports_fall_back_to_inflight_bookkeeping(policy):
    stale_a = ReplicaView("a", inflight_requests=5, inflight_tokens=20_000, load=ReplicaLoad())
    stale_b = ReplicaView("b", inflight_requests=0, inflight_tokens=0, load=ReplicaLoad())
    assert policy.select(request({}), [stale_a, stale_b]).replica_id == "b"


def test_others_weight_trades_ttft_for_total_latency():
    # a: idle queue but many decoding requests; b: a short queue and nothing decoding
    a = view("a", num_running=60, running_decode_tokens=120_000)
    b = view("b", num_running=0, running_decode_tokens=0, queued_prefill_tokens=3000)
    ttft_first = make_policy("predictive", {"others_weight": 0.0})
    total = make_policy("predictive", {"others_weight": 1.0})
    for p in (ttft_first, total):
        p.observe_steps("a", synthetic_steps(np.array([0.02, 1.8e-4, 3e-4, 8e-9, 4e-6])))
    assert total.select(request({}, out=300), [a, b]).replica_id == "b"
    d = ttft_first.select(request({}, out=300), [a, b])
    assert d.scores["a"]["others"] > d.scores["b"]["others"]
