"""kvfleet's predictive policy and its online step-time learner."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
import pytest

from balancer.policies import make_policy
from balancer.policies.base import Decision, ReplicaLoad, ReplicaView, RoutingRequest
from balancer.policies.predictive import PredictivePolicy
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
        # context_tokens as the engine counts it: every sequence's computed + new tokens
        out.append(Step(t0 + i, float(np.dot(theta, [1, p, d, dctx, pctx])), p, d, d + (p > 0), dctx + pctx + p + d, dctx))
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


def test_learner_keeps_the_prefill_cost_through_long_decode_only_stretches():
    # A replica that mostly decodes: one prefill step in 500. Durations follow the simulator's
    # step model, whose prefill attention term (new × context) the learner's features lack.
    theta = np.array([0.0068, 3.2e-5, 3.2e-5, 5.6e-8, 1e-6])
    quad = 1.07e-9  # llama3-8b-h100 preset, per (new token × context token)
    rng = random.Random(1)
    learner, steps, t = StepLearner(), [], 0.0
    for i in range(40_000):
        if i % 500 == 0:
            p, pctx, d, dctx = rng.randint(500, 8000), rng.randint(0, 20_000), 0, 0
        else:
            p, pctx, d = 0, 0, rng.randint(1, 8)
            dctx = d * rng.randint(2000, 20_000)
        dur = float(np.dot(theta, [1, p, d, dctx, pctx])) + quad * p * (pctx + p / 2)
        steps.append(Step(t, dur, p, d, d + (p > 0), dctx + pctx + p + d, dctx))
        t += dur
    learner.observe("a", steps)
    got = learner.coefficients("a")
    cold_8k = theta[0] + theta[1] * 8000 + quad * 8000 * 4000  # one 8k-token prefill step, no cache
    assert got[0] + got[1] * 8000 == pytest.approx(cold_8k, rel=0.25)
    assert got[3] == pytest.approx(theta[3], rel=0.1)  # decode context: well excited, exact


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


def test_the_queue_ahead_takes_its_blocks_first():
    # Free blocks hold our request but not the queue ahead of it too: the queue is admitted
    # first, so our sequence is the newest when the cache runs out (preempted, recomputed).
    queued = view("a", free_blocks=400, num_waiting=3, queued_prefill_tokens=6_000)
    for default in (make_policy("predictive"), make_policy("predictive", {"queue_in_memory": True})):
        assert default.select(request({}, prompt=4096), [queued]).scores["a"]["memory"] > 0
    own_only = make_policy("predictive", {"queue_in_memory": False})
    assert own_only.select(request({}, prompt=4096), [queued]).scores["a"]["memory"] == 0


def test_a_replica_that_only_saw_short_steps_is_priced_with_the_fleets_step_budget():
    # b has only run 500-token steps: its largest step is not its budget. Pricing a long prompt
    # there in 500-token steps made equal replicas look unequal (long prompts avoided b for good).
    p = make_policy("predictive")
    big = [Step(float(i), 0.3, 8000, 4, 5, 9000, 1000) for i in range(50)]
    small = [Step(float(i), 0.03, 500, 4, 5, 1500, 1000) for i in range(50)]
    p.observe_steps("a", big)
    p.observe_steps("b", small)
    assert p.learner.step_budget("b", 2048) == p.learner.step_budget("a", 2048) == 8004
    s = p.select(request({}, prompt=32_000), [view("a"), view("b")]).scores
    assert s["a"]["ttft"] - s["a"]["busy"] == pytest.approx(s["b"]["ttft"] - s["b"]["busy"])  # busy: a's last step
    assert StepLearner().step_budget("x", 2048) == 2048  # nothing seen yet


def test_stale_reports_fall_back_to_inflight_bookkeeping(policy):
    stale_a = ReplicaView("a", inflight_requests=5, inflight_tokens=20_000, load=ReplicaLoad())
    stale_b = ReplicaView("b", inflight_requests=0, inflight_tokens=0, load=ReplicaLoad())
    assert policy.select(request({}), [stale_a, stale_b]).replica_id == "b"


def test_others_weight_trades_ttft_for_total_latency():
    # a: idle queue but many decoding requests; b: a short queue and nothing decoding
    a = view("a", num_running=60, running_decode_tokens=120_000)
    b = view("b", num_running=0, running_decode_tokens=0, queued_prefill_tokens=3000)
    ttft_first = make_policy("predictive", {"others_weight": 0.0})
    total = make_policy("predictive")  # default 1: the sum of everyone's latency
    for p in (ttft_first, total):
        p.observe_steps("a", synthetic_steps(np.array([0.02, 1.8e-4, 3e-4, 8e-9, 4e-6])))
    assert total.select(request({}, out=300), [a, b]).replica_id == "b"
    d = ttft_first.select(request({}, out=300), [a, b])
    assert d.replica_id == "a"
    assert d.scores["a"]["ttft"] < d.scores["b"]["ttft"]
    assert d.scores["a"]["others"] > d.scores["b"]["others"] == 0.0


def test_ttft_slack_keeps_a_request_where_its_own_wait_is_within_the_factor():
    # The same pair as above: the total-latency cost sends the request to b, whose TTFT (a
    # 3,000-token queue ahead) is half again a's; a slack of 0.25 (at most 1.25× the lowest TTFT)
    # leaves only a, a slack wide enough leaves the cost to decide again.
    a = view("a", num_running=60, running_decode_tokens=120_000)
    b = view("b", num_running=0, running_decode_tokens=0, queued_prefill_tokens=3000)
    tight, loose = make_policy("predictive", {"ttft_slack": 0.25}), make_policy("predictive", {"ttft_slack": 100.0})
    for p in (tight, loose):
        p.observe_steps("a", synthetic_steps(np.array([0.02, 1.8e-4, 3e-4, 8e-9, 4e-6])))
    d = tight.select(request({}, out=300), [a, b])
    assert d.scores["b"]["ttft"] > 1.25 * d.scores["a"]["ttft"]
    assert d.replica_id == "a"
    assert loose.select(request({}, out=300), [a, b]).replica_id == "b"
    with pytest.raises(ValueError, match="ttft_slack"):
        make_policy("predictive", {"ttft_slack": -1})


def test_decode_excess_charges_only_the_running_sequences_above_the_fleets_mean():
    # a holds the prefix and runs 14 decodes, b and c run 10 and 4 (fleet mean 28/3): charged for
    # all of D, the decodes on a outweigh the recompute; charged for the excess (14/3 on a, 2/3 on
    # b, none on c), the cache wins.
    loads = {"a": 14, "b": 10, "c": 4}
    views = [view(r, num_running=n, running_decode_tokens=n * 9000) for r, n in loads.items()]
    theta = np.array([0.02, 1.8e-4, 3e-4, 8e-9, 4e-6])
    full, excess = (make_policy("predictive", {"decode_excess": False, "recompute_waste": False, "replicate": False}),
                   make_policy("predictive", {"decode_excess": True, "recompute_waste": False, "replicate": False}))
    for p in (full, excess):
        p.observe_steps("a", synthetic_steps(theta))
    req = request({"a": 250}, prompt=4096, out=400)
    d_full, d_excess = full.select(req, views), excess.select(req, views)
    assert d_full.replica_id == "c" and d_excess.replica_id == "a"
    assert d_excess.scores["c"]["others"] == 0.0 < d_full.scores["c"]["others"]
    assert d_excess.scores["a"]["others"] == pytest.approx(d_full.scores["a"]["others"] * (14 - 28 / 3) / 14)


def test_recompute_waste_charges_the_decodes_stalled_by_tokens_another_replica_holds():
    # The decode_excess pair: a holds 4,000 of the 4,096 prompt tokens and runs 14 decodes, c holds
    # nothing and runs 4. Charged for the decodes alone, c wins; charged also for the 4,000 tokens
    # c would recompute in the steps of its 4 running decodes (the best-cached replica wastes
    # nothing), the cache wins.
    loads = {"a": 14, "b": 10, "c": 4}
    views = [view(r, num_running=n, running_decode_tokens=n * 9000) for r, n in loads.items()]
    plain, waste = (make_policy("predictive", {"recompute_waste": False, "replicate": False}),
                    make_policy("predictive", {"recompute_waste": True, "replicate": False}))
    for p in (plain, waste):
        p.observe_steps("a", synthetic_steps(np.array([0.02, 1.8e-4, 3e-4, 8e-9, 4e-6])))
    req = request({"a": 250}, prompt=4096, out=400)
    d_plain, d_waste = plain.select(req, views), waste.select(req, views)
    assert d_plain.replica_id == "c" and d_waste.replica_id == "a"
    assert d_waste.scores["a"]["others"] == pytest.approx(d_plain.scores["a"]["others"])
    t_tok = waste.learner.theta("c")[1]
    assert d_waste.scores["c"]["others"] - d_plain.scores["c"]["others"] == pytest.approx(4 * t_tok * 4000)
    # where no replica holds more of the prompt than another, nothing changes
    cold = request({}, prompt=4096, out=400)
    assert waste.select(cold, views).scores == plain.select(cold, views).scores


def test_decode_delay_counts_only_the_overlap_with_running_sequences():
    # What we have running on a is short: its sequences share at most ~10 of our 300 steps.
    # (All of a's decodes are charged: with one replica there is no excess over the fleet's mean.)
    policy = make_policy("predictive", {"decode_excess": False})
    policy.observe_steps("a", synthetic_steps(seed=sum(map(ord, "a"))))
    a = view("a", num_running=8, running_decode_tokens=16_000)
    for i in range(8):
        policy.on_routed(dataclasses.replace(request({}, out=20), request_id=f"s{i}"), Decision("a"))
    short = policy.select(request({}, out=300), [a]).scores["a"]["others"]
    long = make_policy("predictive", {"decode_excess": False})
    long.learner = policy.learner
    unknown = long.select(request({}, out=300), [a]).scores["a"]["others"]  # assumed like this request
    assert 0 < short < unknown / 10


def test_waiting_requests_cached_prefixes_are_not_queued_work(policy):
    # Three requests we routed to a wait there; the index held 200 of their 256 blocks. The
    # replica reports their whole prompts as queued until it admits them and finds the prefix.
    for i in range(3):
        r = dataclasses.replace(request({"a": 200}), request_id=f"w{i}")
        policy.on_routed(r, Decision("a"))
    a = view("a", num_waiting=3, queued_prefill_tokens=3 * 4096)
    d = policy.select(request({}), [a, view("b")])
    assert d.scores["a"]["queued_tokens"] == 3 * (4096 - 200 * 16)
    # Two were admitted since (FCFS: the oldest); the one left waiting is the newest we sent.
    one = view("a", num_waiting=1, queued_prefill_tokens=4096)
    assert policy.select(request({}), [one]).scores["a"]["queued_tokens"] == 4096 - 200 * 16
    # A request sent after the report is counted apart (its uncached tokens), not as waiting.
    sent = ReplicaView("a", sent_since_report=1, sent_tokens_since_report=896, load=one.load)
    policy.on_routed(dataclasses.replace(request({"a": 200}), request_id="w3"), Decision("a"))
    assert policy.select(request({}), [sent]).scores["a"]["queued_tokens"] == 2 * (4096 - 200 * 16)


def test_a_step_in_flight_delays_the_first_token():
    learner = StepLearner()
    steps = synthetic_steps(t0=0.0)
    learner.observe("a", steps)
    last = steps[-1]
    mid = last.start + last.duration / 4
    assert learner.busy_for("a", mid) == pytest.approx(0.75 * last.duration)
    assert learner.busy_for("a", last.start + last.duration + 1) == 0.0
    assert learner.busy_for("a", -1e9) == pytest.approx(last.duration)  # clock offset: at most one step
    assert learner.busy_for("unknown", mid) == 0.0
    p = PredictivePolicy(learner=learner)
    during = p.select(dataclasses.replace(request({}), now=mid), [view("a"), view("b")]).scores
    after = p.select(dataclasses.replace(request({}), now=last.start + last.duration), [view("a")]).scores
    assert during["a"]["busy"] == pytest.approx(0.75 * last.duration) and during["b"]["busy"] == 0.0
    assert during["a"]["ttft"] - after["a"]["ttft"] == pytest.approx(0.75 * last.duration, rel=1e-6)


def test_a_full_kv_cache_delays_admission_until_running_sequences_finish(policy):
    # Both replicas have the same queue; on a the queue and our prompt do not fit in its free
    # blocks, so the queue waits for running sequences to finish and free theirs.
    queued = dict(num_waiting=6, queued_prefill_tokens=12_000, num_running=12, running_decode_tokens=60_000)
    full, roomy = view("a", free_blocks=100, **queued), view("b", free_blocks=5000, **queued)
    d = policy.select(request({}), [full, roomy])
    assert d.replica_id == "b"
    assert d.scores["a"]["kv_wait"] > 0 and d.scores["b"]["kv_wait"] == 0
    assert d.scores["a"]["ttft"] > d.scores["b"]["ttft"]
    # The longer the running sequences still have to go, the longer the wait.
    short = policy.select(request({}, out=10), [full, roomy]).scores["a"]["kv_wait"]
    long = policy.select(request({}, out=1000), [full, roomy]).scores["a"]["kv_wait"]
    assert long > short > 0
    # Nothing running: nothing to wait for (the shortfall is the memory term's business).
    idle = view("a", free_blocks=100, num_running=0, running_decode_tokens=0, num_waiting=6,
                queued_prefill_tokens=12_000)
    assert policy.select(request({}), [idle, roomy]).scores["a"]["kv_wait"] == 0


def test_native_rls_step_matches_its_python_oracle():
    from balancer.step_learner import NATIVE, PRIOR, _RLS

    if not NATIVE:
        pytest.skip("balancer._rls not built (no C compiler at install)")
    native, oracle = _RLS(PRIOR, 1e-2, 0.999), _RLS(PRIOR, 1e-2, 0.999, native=False)
    rng = random.Random(3)
    for i in range(3000):
        # decode-only stretches, prefills, idle steps, and a few absurd samples
        p = rng.choice([0, 0, 0, rng.randint(1, 8192)])
        x = (1.0, p, rng.randint(0, 256), rng.randint(0, 2_000_000), rng.randint(0, 50_000) if p else 0)
        y = rng.choice([rng.uniform(1e-3, 0.5), 1e300 if i % 997 == 5 else rng.uniform(1e-3, 0.5)])
        native.update(x, y)
        oracle.update(x, y)
    np.testing.assert_allclose(np.frombuffer(native.theta), np.frombuffer(oracle.theta), rtol=1e-9, atol=0)
    np.testing.assert_allclose(np.frombuffer(native.p), np.frombuffer(oracle.p), rtol=1e-9, atol=1e-12)
    assert np.isfinite(native.coef()).all()
    # With the load time as a sixth feature (update6 in C, _update_n in Python).
    native.add_load_feature(1e-2)
    oracle.add_load_feature(1e-2)
    for i in range(2000):
        p = rng.choice([0, 0, rng.randint(1, 8192)])
        loaded = rng.choice([0, rng.randint(16, 8192)]) if p else 0
        x = (1.0, p, rng.randint(0, 256), rng.randint(0, 2_000_000), (rng.randint(0, 50_000) if p else 0) + loaded, loaded)
        y = rng.uniform(1e-3, 0.5) if i % 701 != 3 else 1e300
        native.update(x, y)
        oracle.update(x, y)
    np.testing.assert_allclose(np.frombuffer(native.theta), np.frombuffer(oracle.theta), rtol=1e-9, atol=0)
    np.testing.assert_allclose(np.frombuffer(native.p), np.frombuffer(oracle.p), rtol=1e-9, atol=1e-12)
    assert len(native.theta) == 6 and np.isfinite(native.coef()).all()


# --- lower KV tiers (issue #19 part 2) ----------------------------------------------------------


@dataclass
class LoadingStep(Step):
    loaded_tokens: int = 0


def loading_steps(theta_load: float, theta=THETA, n=400, seed=0):
    """`synthetic_steps` where one prefill step in three also loaded part of its context from a
    lower tier: duration = θ·x + θload·loaded, the loaded tokens being context of the chunk."""
    rng = random.Random(seed)
    out = []
    for s in synthetic_steps(theta, n, seed):
        loaded = rng.randint(64, 4096) if s.prefill_tokens and rng.random() < 0.33 else 0
        duration = s.duration + (theta_load + theta[4]) * loaded
        out.append(LoadingStep(s.start, duration, s.prefill_tokens, s.decode_tokens,
                               s.num_seqs, s.context_tokens + loaded, s.decode_context_tokens, loaded))
    return out


def test_learner_fits_the_load_time_per_token_from_step_reports():
    learner = StepLearner()
    assert learner.load_cost("a") == pytest.approx(1e-5)  # the prior, before any load
    learner.observe("a", loading_steps(3e-6))
    assert learner.load_cost("a") == pytest.approx(3e-6, rel=0.1)
    assert learner.load_cost("other") == learner.load_cost("a")  # fleet-wide, like θ
    # A load is not mistaken for prefill work: the compute coefficients are still θ.
    np.testing.assert_allclose(learner.coefficients("a")[:2], THETA[:2], rtol=0.1)
    # Per-replica models (heterogeneous fleets) fit their own θload: a replica with a slower link.
    from balancer.step_learner import LearnerConfig

    own = StepLearner(LearnerConfig(per_replica=True, min_samples=100))
    own.observe("fast", loading_steps(3e-6, seed=1))
    own.observe("slow", loading_steps(3e-5, seed=2))
    assert own.load_cost("fast") == pytest.approx(3e-6, rel=0.2)
    assert own.load_cost("slow") == pytest.approx(3e-5, rel=0.2)


def test_steps_without_loads_leave_the_compute_model_exactly_as_before():
    plain, tiered = StepLearner(), StepLearner()
    steps = synthetic_steps()
    plain.observe("a", steps)
    tiered.observe("a", [LoadingStep(*dataclasses.astuple(s), 0) for s in steps])
    assert plain.theta("a") == tiered.theta("a")


def tier_request(device: dict[str, int], lower: dict[str, int], prompt: int = 8192) -> RoutingRequest:
    return RoutingRequest("r", "", prompt, tuple(range(prompt // 16)), 16, device, predicted_output_tokens=100,
                          offloaded_blocks=lower)


def test_prefers_a_host_tier_hit_over_recompute_when_loading_is_cheaper():
    # b holds the prompt's first 448 blocks in host memory (its device holds 32 of them) and has
    # a little more queued; a holds nothing. Loading 7k tokens at the learned 3 µs each beats
    # computing them at 180 µs each.
    policy = make_policy("predictive")
    for rid in ("a", "b"):
        policy.observe_steps(rid, loading_steps(3e-6, seed=sum(map(ord, rid))))
    req = tier_request({"b": 32}, {"b": 416})
    views = [view("a"), view("b", queued_prefill_tokens=2000)]
    d = policy.select(req, views)
    assert d.replica_id == "b"
    assert d.scores["b"]["loaded_tokens"] == 416 * 16
    assert d.scores["b"]["uncached_tokens"] == 8192 - 448 * 16
    assert d.scores["b"]["tier_load"] == pytest.approx(416 * 16 * policy.learner.load_cost("b"))
    assert "lower KV tier" in d.reason
    # Tier-blind (tier_aware false), the host hit is a recompute: b's bigger queue loses.
    blind = make_policy("predictive", {"tier_aware": False})
    blind.learner = policy.learner
    d = blind.select(req, views)
    assert d.replica_id == "a" and d.scores["b"]["loaded_tokens"] == 0


def test_a_slow_tier_learned_from_step_reports_loses_to_recompute():
    # The same request and fleet, but the replicas' reports show loads costing 1 ms per token
    # (a disk far slower than recompute): the policy now computes the prefix on a instead.
    policy = make_policy("predictive")
    for rid in ("a", "b"):
        policy.observe_steps(rid, loading_steps(1e-3, seed=sum(map(ord, rid))))
    assert policy.learner.load_cost("b") == pytest.approx(1e-3, rel=0.1)
    d = policy.select(tier_request({"b": 32}, {"b": 416}), [view("a"), view("b", queued_prefill_tokens=2000)])
    assert d.replica_id == "a"
    assert d.scores["b"]["tier_load"] > d.scores["a"]["ttft"]


def test_replicate_stays_on_the_cache_and_warms_the_replica_it_would_have_moved_to():
    # The decode_excess pair: a holds 4,000 of the 4,096 prompt tokens and runs 14 decodes, c
    # holds nothing and runs 4; charged for the decodes, the request moves to c and pays the
    # recompute itself. With `replicate` it stays within 2x its lowest TTFT (on a) and c gets a
    # warm-up of the 250 blocks a holds, once: the next such request finds one in flight.
    loads = {"a": 14, "b": 10, "c": 4}
    views = [view(r, num_running=n, running_decode_tokens=n * 9000) for r, n in loads.items()]
    theta = np.array([0.02, 1.8e-4, 3e-4, 8e-9, 4e-6])
    move = make_policy("predictive", {"recompute_waste": False, "replicate": False})
    rep = make_policy("predictive", {"recompute_waste": False, "replicate": True})
    for p in (move, rep):
        p.observe_steps("a", synthetic_steps(theta))
    req = request({"a": 250}, prompt=4096, out=400)
    d_move, d_rep = move.select(req, views), rep.select(req, views)
    assert d_move.replica_id == "c" and d_move.warm is None
    assert d_rep.replica_id == "a" and d_rep.warm == ("c", 250)
    assert d_rep.scores["c"]["ttft"] > 2 * min(s["ttft"] for s in d_rep.scores.values())
    rep.on_routed(req, d_rep)
    again = dataclasses.replace(req, request_id="r2")
    assert rep.select(again, views).warm == ("c", 250)  # asked for, not booked yet
    warm_rr = RoutingRequest("r/warm", "", 4000, req.block_hashes[:250], 16, {}, max_tokens=1, warmup=True)
    rep.on_routed(warm_rr, Decision("c"))  # the router booked it (Router.book)
    assert rep.select(again, views).warm is None  # one warm-up of a prefix at a time
    rep.on_complete(warm_rr, "c", True)
    assert rep.select(again, views).warm == ("c", 250)
    # a move that recomputes little of what another replica holds is left alone
    small = make_policy("predictive", {"recompute_waste": False, "replicate": True, "replicate_min_tokens": 5000})
    small.learner = rep.learner
    assert small.select(req, views).replica_id == "c"


@dataclass
class TieredStep(LoadingStep):
    loaded_disk_tokens: int = 0
    prefill_attention: float = 0.0


def mooncake_like_steps(n=6000, seed=0, disk_share=0.0):
    """Steps timed by the simulator's own step model and tier links (llama3-8b-h100: PCIe Gen5 to
    host memory, NVMe for the disk), shaped like Mooncake's: a step that loads has a long
    loaded context and a short uncached tail, a later chunk of a long prompt is full. Returns
    the steps and the true seconds per loaded token per medium."""
    from replica.step_model import StepFeatures, get_preset

    preset = get_preset("llama3-8b-h100")
    per_token = {m: preset.tier_cost.seconds(m, "GPU", 1) / preset.block_size for m in ("CPU", "STORAGE")}
    rng = random.Random(seed)
    chunk, out, t = 8192, [], 0.0
    while len(out) < n:
        d = rng.randint(0, 64)
        dctx = sum(rng.randint(500, 30_000) for _ in range(d))
        new = ctx = loaded = disk = 0
        if rng.random() < 0.4:  # one prefill chunk
            kind = rng.random()
            if kind < 0.5:  # the first chunk after a lower-tier hit (and a small device one)
                loaded = 16 * rng.randint(1, 1500)
                disk = 16 * rng.randint(0, loaded // 16) if rng.random() < disk_share else 0
                ctx, new = loaded + rng.choice([0, 0, 0, 16 * rng.randint(1, 30)]), rng.randint(16, 1500)
            elif kind < 0.8:  # a later chunk of a long prompt
                ctx, new = chunk * rng.randint(1, 4), rng.randint(chunk // 2, chunk - d)
            else:  # a cold prompt
                ctx, new = rng.choice([0, 16 * rng.randint(1, 30)]), rng.randint(chunk // 2, chunk - d)
        if not new and not d:
            continue
        attention = new * (ctx + new / 2)
        feats = StepFeatures(new + d, attention, ctx, dctx, d + (new > 0))
        duration = (preset.model.duration(feats) + (loaded - disk) * per_token["CPU"] + disk * per_token["STORAGE"])
        out.append(TieredStep(t, duration, new, d, d + (new > 0), dctx + ctx + new + d, dctx, loaded, disk, attention))
        t += duration
    return out, per_token


def feed(learner, rid, steps, per_report=16):
    for i in range(0, len(steps), per_report):  # as load reports bring them
        learner.observe(rid, steps[i:i + per_report])


def test_learned_load_time_is_the_links_on_mooncake_shaped_steps():
    # The five compute features have no attention term; a loading step's context (short tail,
    # little attention per context token) looks dearer to them than it is, and the old sixth
    # coefficient came out at 0 here: a host hit priced as free. The tier model has the
    # attention term and lands on the link's 2.56 µs per token (16 × 128 KiB over ~51 GB/s).
    steps, true = mooncake_like_steps()
    learner = StepLearner()
    feed(learner, "a", steps)
    assert true["CPU"] == pytest.approx(2.56e-6, rel=0.01)
    assert learner.load_cost("a") == pytest.approx(true["CPU"], rel=0.05)
    assert learner.load_cost("a", "STORAGE") == pytest.approx(9e-5)  # no disk load seen: the prior


def test_each_medium_gets_its_own_learned_load_time():
    steps, true = mooncake_like_steps(disk_share=0.3, seed=1)
    learner = StepLearner()
    feed(learner, "a", steps)
    assert learner.load_cost("a", "CPU") == pytest.approx(true["CPU"], rel=0.05)
    assert learner.load_cost("a", "STORAGE") == pytest.approx(true["STORAGE"], rel=0.05)
    assert true["STORAGE"] > 8 * true["CPU"]  # NVMe against PCIe Gen5


def test_native_rls_step_of_any_size_matches_its_python_oracle():
    from balancer.step_learner import _TIER_PRIOR, _TIER_SCALE, NATIVE, _RLS, _update_any_native

    if not NATIVE or _update_any_native is None:
        pytest.skip("balancer._rls not built (no C compiler at install)")
    native = _RLS(_TIER_PRIOR, 1e-2, 0.9999, scale=_TIER_SCALE)
    oracle = _RLS(_TIER_PRIOR, 1e-2, 0.9999, native=False, scale=_TIER_SCALE)
    steps, _ = mooncake_like_steps(n=1500, seed=2, disk_share=0.5)
    for i, s in enumerate(steps):
        if i == 700:
            native.add_load_feature(1e-2, 9e-5)
            oracle.add_load_feature(1e-2, 9e-5)
        x = (1.0, s.prefill_tokens, s.decode_tokens, s.decode_context_tokens, s.context_tokens, s.prefill_attention,
             1.0, s.loaded_tokens - s.loaded_disk_tokens, s.loaded_disk_tokens)[: len(native.theta)]
        y = s.duration if i % 499 != 7 else 1e300  # and a few absurd samples, refused by both
        native.update(x, y)
        oracle.update(x, y)
    assert len(native.theta) == 9
    np.testing.assert_allclose(np.frombuffer(native.theta), np.frombuffer(oracle.theta), rtol=1e-9, atol=0)
    np.testing.assert_allclose(np.frombuffer(native.p), np.frombuffer(oracle.p), rtol=1e-9, atol=1e-12)


def test_a_disk_hit_is_priced_at_the_disks_learned_load_time():
    # b holds the prompt's 416 blocks after its device prefix in a lower tier; the reports show
    # host loads at 3 µs per token and disk loads at 1 ms (far slower than recompute). Held in
    # host memory, b wins; the same blocks on b's disk only, a recomputes them.
    policy = make_policy("predictive")
    steps = []
    for s in loading_steps(3e-6, seed=3, n=800):
        disk = s.loaded_tokens // 2 if s.loaded_tokens and random.Random(s.start).random() < 0.5 else 0
        steps.append(TieredStep(*dataclasses.astuple(s)[:7], s.loaded_tokens, disk, 0.0))
        if disk:
            steps[-1].duration += disk * (1e-3 - 3e-6)
    for rid in ("a", "b"):
        policy.observe_steps(rid, steps)
    assert policy.learner.load_cost("b", "STORAGE") == pytest.approx(1e-3, rel=0.1)
    views = [view("a"), view("b", queued_prefill_tokens=2000)]
    host = tier_request({"b": 32}, {"b": 416})
    assert policy.select(host, views).replica_id == "b"
    on_disk = dataclasses.replace(host, offloaded_disk_blocks={"b": 416})
    d = policy.select(on_disk, views)
    assert d.replica_id == "a"
    assert d.scores["b"]["tier_load"] == pytest.approx(416 * 16 * policy.learner.load_cost("b", "STORAGE"))
