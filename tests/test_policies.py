"""Routing policies: the contract every policy keeps, the factory, and each policy's behaviour.

The sglang_cache_aware tree has its own file (test_policy_sglang_cache_aware.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import subprocess
import sys
from collections import Counter, deque

import pytest
import xxhash

from balancer.policies import POLICIES, make_policy, policy_names, policy_options
from balancer.policies.base import Decision, ReplicaLoad, ReplicaView, RoutingRequest
from balancer.policies.chwbl import build_ring, chwbl_hash, load_ok
from balancer.policies.dynamo_kv import softmax_probabilities
from balancer.policies.preble_e2 import PrebleE2Config, prefill_time_s

ALL = sorted(POLICIES)
BS = 16


def req(
    prompt: str = "hello",
    *,
    tokens: int | None = None,
    blocks: int | None = None,
    matched: dict[str, int] | None = None,
    now: float = 0.0,
    rid: str | None = None,
    first_user: str | None = None,
    seed: int | None = None,
    max_tokens: int | None = None,
    predicted: float | None = None,
    offloaded: dict[str, int] | None = None,
) -> RoutingRequest:
    tokens = tokens if tokens is not None else max(1, len(prompt) // 4)
    blocks = blocks if blocks is not None else tokens // BS
    return RoutingRequest(
        request_id=rid or f"req-{xxhash.xxh64_hexdigest(prompt.encode())}-{now}",
        prompt_text=prompt,
        prompt_tokens=tokens,
        block_hashes=tuple(range(1, blocks + 1)),
        block_size=BS,
        matched_blocks=matched or {},
        max_tokens=max_tokens,
        predicted_output_tokens=predicted,
        first_user_message=first_user,
        now=now,
        rng_seed=seed if seed is not None else xxhash.xxh64_intdigest(prompt.encode()),
        offloaded_blocks=offloaded or {},
    )


def view(rid: str, inflight: int = 0, **kw) -> ReplicaView:
    return ReplicaView(replica_id=rid, inflight_requests=inflight, **kw)


def words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 8))) for _ in range(n))


# ---------------------------------------------------------------------------------------------
# contract, over every policy


class Fleet:
    """The caller's bookkeeping for a tiny simulated fleet: in flight per replica, a load report
    that mirrors it every step, and requests that finish a few steps after they are sent."""

    def __init__(self, ids: list[str], hold_steps: int = 6) -> None:
        self.ids = ids
        self.inflight = {rid: 0 for rid in ids}
        self.cached = {rid: 0 for rid in ids}
        self.running: deque[tuple[int, RoutingRequest, str]] = deque()
        self.hold_steps = hold_steps
        self.step = 0

    def views(self, ids: list[str] | None = None) -> list[ReplicaView]:
        out = []
        for rid in ids or self.ids:
            n = self.inflight[rid]
            out.append(
                ReplicaView(
                    replica_id=rid,
                    inflight_requests=n,
                    inflight_tokens=n * 600,
                    load=ReplicaLoad(
                        num_running=n,
                        num_waiting=n,
                        queued_prefill_tokens=n * 512,
                        running_decode_tokens=n * 512,
                        free_blocks=4096 - n * 32,
                        total_blocks=4096,
                        kv_usage=min(1.0, n / 64),
                        age_s=0.0,
                    ),
                    cached_blocks=self.cached[rid],
                )
            )
        return out

    def route(self, policy, request: RoutingRequest, candidates: list[str] | None = None) -> Decision:
        decision = policy.select(request, self.views(candidates))
        policy.on_routed(request, decision)
        self.inflight[decision.replica_id] += 1
        self.cached[decision.replica_id] += len(request.block_hashes)
        self.running.append((self.step, request, decision.replica_id))
        self.step += 1
        while self.running and self.running[0][0] <= self.step - self.hold_steps:
            _, done, rid = self.running.popleft()
            self.inflight[rid] -= 1
            policy.on_complete(done, rid, True)
        return decision


def mixed_requests(n: int, ids: list[str], seed: int = 7) -> list[RoutingRequest]:
    """Requests with shared system prompts, chat-style first messages and cached blocks."""
    rng = random.Random(seed)
    systems = [words(rng, 60) for _ in range(3)]
    out = []
    for i in range(n):
        user = words(rng, rng.randint(5, 40))
        prompt = rng.choice(systems) + " " + user
        tokens = len(prompt) // 4
        blocks = tokens // BS
        matched = {rid: rng.randint(0, blocks) for rid in ids if rng.random() < 0.5}
        out.append(
            req(prompt, tokens=tokens, blocks=blocks, matched=matched, now=i * 0.05, rid=f"m{i}", first_user=user,
                max_tokens=rng.choice([None, 64, 256]))
        )
    return out


@pytest.mark.parametrize("name", ALL)
def test_contract_returns_only_candidates(name):
    ids = [f"r{i}" for i in range(6)]
    rng = random.Random(1)
    fleet = Fleet(ids)
    policy = make_policy(name)
    for request in mixed_requests(200, ids):
        candidates = sorted(rng.sample(ids, rng.randint(1, len(ids))))
        decision = fleet.route(policy, request, candidates)
        assert decision.replica_id in candidates
        assert set(decision.scores) == set(candidates), "one score breakdown per candidate"
        assert decision.reason
        if rng.random() < 0.05:
            gone = rng.choice(ids)
            policy.on_replica_removed(gone)


@pytest.mark.parametrize("name", ALL)
def test_contract_spreads_unique_prompts(name):
    ids = [f"r{i}" for i in range(4)]
    rng = random.Random(2)
    fleet = Fleet(ids)
    policy = make_policy(name)
    counts: Counter[str] = Counter()
    for i in range(300):
        prompt = words(rng, 80)  # unique; nothing cached anywhere
        request = req(prompt, tokens=512, blocks=32, now=i * 0.05, rid=f"u{i}")
        counts[fleet.route(policy, request).replica_id] += 1
    assert min(counts[rid] for rid in ids) >= 30, counts


def _history(policy, ids, extra_selects: bool) -> list[Decision]:
    fleet = Fleet(ids)
    decisions = []
    for request in mixed_requests(80, ids, seed=11):
        if extra_selects:  # `explain` calls: must change nothing
            policy.select(request, fleet.views())
            policy.select(request, fleet.views())
        decisions.append(fleet.route(policy, request))
    probe = mixed_requests(1, ids, seed=99)[0]
    decisions.append(policy.select(probe, fleet.views()))
    return decisions


@pytest.mark.parametrize("name", ALL)
def test_contract_deterministic_across_instances(name):
    ids = [f"r{i}" for i in range(4)]
    first = _history(make_policy(name), ids, extra_selects=False)
    second = _history(make_policy(name), ids, extra_selects=False)
    assert first == second


@pytest.mark.parametrize("name", ALL)
def test_contract_select_does_not_mutate(name):
    ids = [f"r{i}" for i in range(4)]
    policy = make_policy(name)
    fleet = Fleet(ids)
    for request in mixed_requests(30, ids, seed=5):
        fleet.route(policy, request)
    probe = mixed_requests(1, ids, seed=6)[0]
    described = policy.describe()
    assert policy.select(probe, fleet.views()) == policy.select(probe, fleet.views())
    assert policy.describe() == described
    # and a whole history with explain calls interleaved decides exactly like one without
    assert _history(make_policy(name), ids, extra_selects=True) == _history(make_policy(name), ids, extra_selects=False)


@pytest.mark.parametrize("name", ALL)
def test_contract_candidate_order_does_not_matter(name):
    ids = [f"r{i}" for i in range(5)]
    fleet = Fleet(ids)
    policy = make_policy(name)
    for request in mixed_requests(20, ids, seed=3):
        fleet.route(policy, request)
    probe = mixed_requests(1, ids, seed=4)[0]
    views = fleet.views()
    assert policy.select(probe, views).replica_id == policy.select(probe, list(reversed(views))).replica_id


# ---------------------------------------------------------------------------------------------
# factory


def test_factory_names_and_fresh_instances():
    assert policy_names() == tuple(POLICIES)
    assert set(policy_names()) == {
        "round_robin", "random", "least_request", "power_of_two", "chwbl",
        "sglang_cache_aware", "dynamo_kv", "llmd_scorer", "preble_e2", "precise_prefix", "predictive",
    }
    for name in policy_names():
        a, b = make_policy(name), make_policy(name)
        assert a is not b and a.name == name
        assert a.describe()["name"] == name


def test_factory_table_is_immutable():
    with pytest.raises(TypeError):
        POLICIES["mine"] = object  # type: ignore[index]


def test_factory_unknown_policy_lists_valid_names():
    with pytest.raises(ValueError) as err:
        make_policy("cache_aware")
    for name in policy_names():
        assert name in str(err.value)


def test_factory_unknown_option_lists_valid_options():
    with pytest.raises(ValueError) as err:
        make_policy("chwbl", {"loadFactor": 1.5})
    assert "loadFactor" in str(err.value) and "load_factor" in str(err.value)
    with pytest.raises(ValueError, match="none"):
        make_policy("round_robin", {"x": 1})


@pytest.mark.parametrize(
    "name, options",
    [
        ("chwbl", {"load_factor": 0.9}),
        ("chwbl", {"replication": 0}),
        ("chwbl", {"prefix_chars": "100"}),
        ("sglang_cache_aware", {"cache_threshold": 1.5}),
        ("sglang_cache_aware", {"balance_rel_threshold": 0.5}),
        ("sglang_cache_aware", {"max_tree_size": 0}),
        ("dynamo_kv", {"router_temperature": -1.0}),
        ("dynamo_kv", {"overlap_score_weight": float("nan")}),
        ("llmd_scorer", {"prefix_weight": -3}),
        ("llmd_scorer", {"prefix_weight": 0, "queue_weight": 0, "kv_cache_weight": 0}),
        ("preble_e2", {"window_s": 0}),
        ("preble_e2", {"prefill_coeffs_ms": (1.0, 2.0)}),
    ],
)
def test_factory_rejects_bad_values(name, options):
    with pytest.raises(ValueError):
        make_policy(name, options)


def test_factory_options_reach_the_policy_and_configs_are_frozen():
    policy = make_policy("sglang_cache_aware", {"cache_threshold": 0.5, "balance_abs_threshold": 32})
    assert policy.describe()["cache_threshold"] == 0.5
    assert policy.describe()["balance_abs_threshold"] == 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.config.cache_threshold = 0.1  # type: ignore[misc]
    assert policy_options("dynamo_kv") == {"overlap_score_weight": 1.0, "router_temperature": 0.0,
                                           "host_cache_hit_weight": 0.75, "disk_cache_hit_weight": 0.25}


def test_published_defaults():
    assert policy_options("chwbl") == {"load_factor": 1.25, "replication": 256, "prefix_chars": 100}
    assert policy_options("sglang_cache_aware") == {
        "cache_threshold": 0.3, "balance_abs_threshold": 64, "balance_rel_threshold": 1.5,
        "eviction_interval_s": 120.0, "max_tree_size": 2**26,
    }
    assert policy_options("llmd_scorer") == {"prefix_weight": 3.0, "queue_weight": 2.0, "kv_cache_weight": 2.0,
                                             "cpu_weight": 0.8, "storage_weight": 0.3}
    assert policy_options("preble_e2")["window_s"] == 180.0


def test_policies_import_no_torch():
    code = "import sys, balancer.policies; assert 'torch' not in sys.modules, 'torch imported'"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# ---------------------------------------------------------------------------------------------
# round_robin, random, least_request, power_of_two


def test_round_robin_cycles_and_skips_missing():
    policy = make_policy("round_robin")
    ids = ["r0", "r1", "r2"]
    seen = []
    for i in range(5):
        request = req(f"p{i}")
        d = policy.select(request, [view(r) for r in ids])
        policy.on_routed(request, d)
        seen.append(d.replica_id)
    assert seen == ["r0", "r1", "r2", "r0", "r1"]
    # r2's turn, but r2 is unhealthy: the turn passes to r0, then r1
    request = req("x")
    d = policy.select(request, [view("r0"), view("r1")])
    assert d.replica_id == "r0"
    policy.on_routed(request, d)
    assert policy.select(req("y"), [view(r) for r in ids]).replica_id == "r1"


def test_round_robin_orders_ids_naturally_and_select_does_not_advance():
    policy = make_policy("round_robin")
    ids = ["replica-10", "replica-2", "replica-1"]
    assert policy.select(req("a"), [view(r) for r in ids]).replica_id == "replica-1"
    assert policy.select(req("a"), [view(r) for r in ids]).replica_id == "replica-1"
    order = []
    for i in range(3):
        request = req(f"q{i}")
        d = policy.select(request, [view(r) for r in ids])
        policy.on_routed(request, d)
        order.append(d.replica_id)
    assert order == ["replica-1", "replica-2", "replica-10"]


def test_random_follows_the_request_seed():
    policy = make_policy("random")
    views = [view(f"r{i}") for i in range(4)]
    assert len({policy.select(req("same prompt"), views).replica_id for _ in range(10)}) == 1
    hits = Counter(policy.select(req(f"prompt {i}"), views).replica_id for i in range(400))
    assert set(hits) == {"r0", "r1", "r2", "r3"} and min(hits.values()) > 60


def test_least_request_picks_fewest_in_flight_with_seeded_ties():
    policy = make_policy("least_request")
    assert policy.select(req(), [view("a", 3), view("b", 1), view("c", 2)]).replica_id == "b"
    tied = [view("a", 1, inflight_tokens=900), view("b", 1, inflight_tokens=100), view("c", 1, inflight_tokens=100)]
    picks = Counter(policy.select(req(f"p{i}"), tied).replica_id for i in range(100))
    assert set(picks) == {"b", "c"}  # never a: more tokens in flight
    assert len({policy.select(req("same"), tied).replica_id for _ in range(5)}) == 1


def test_power_of_two_takes_the_less_loaded_of_its_draw():
    policy = make_policy("power_of_two")
    # with two replicas both are always drawn: the less loaded wins whatever the seed
    for i in range(20):
        assert policy.select(req(f"s{i}"), [view("a", 5), view("b", 2)]).replica_id == "b"
    # with many, the most loaded replica can never win (it would have to beat the other draw)
    views = [view("hot", 100)] + [view(f"r{i}", i % 3) for i in range(5)]
    picks = Counter(policy.select(req(f"t{i}"), views).replica_id for i in range(200))
    assert "hot" not in picks
    d = policy.select(req("z"), views)
    drawn = {rid for rid, s in d.scores.items() if s["drawn"] > 0}
    assert len(drawn) == 2 and d.replica_id in drawn


# ---------------------------------------------------------------------------------------------
# chwbl


def test_chwbl_load_bound_is_kubeais_formula():
    assert load_ok(5, 0, 4, 1.25)  # nothing in flight: anyone is fine
    # (load + 1) <= (total + 1) / n * factor
    assert load_ok(0, 4, 4, 1.25)  # 1 <= 1.5625
    assert not load_ok(1, 4, 4, 1.25)  # 2 > 1.5625
    assert not load_ok(2, 7, 4, 1.25)  # 3 > 8 / 4 * 1.25 = 2.5
    assert load_ok(2, 11, 4, 1.25)  # 3 <= 12 / 4 * 1.25 = 3.75


def test_chwbl_same_key_same_replica():
    policy = make_policy("chwbl")
    views = [view(f"r{i}") for i in range(5)]
    first = "Summarize the attached quarterly report for the board. " * 3  # > 100 characters
    a = policy.select(req("sys A\n" + first + "tail one", first_user=first), views)
    b = policy.select(req("sys B\n" + first + "tail two", first_user=first + " and more after 100 chars"), views)
    assert a.replica_id == b.replica_id
    # completions (no chat messages): the prompt's first 100 characters
    c = policy.select(req("x" * 100 + "suffix 1"), views)
    d = policy.select(req("x" * 100 + "suffix 2"), views)
    assert c.replica_id == d.replica_id
    # keys spread over the ring
    owners = Counter(policy.select(req(f"prompt number {i}"), views).replica_id for i in range(500))
    assert len(owners) == 5 and min(owners.values()) > 50


def test_chwbl_walks_the_ring_when_the_owner_is_over_the_bound():
    policy = make_policy("chwbl")
    ids = [f"r{i}" for i in range(4)]
    request = req("a prompt about consistent hashing")
    idle = policy.select(request, [view(r) for r in ids])
    owner = idle.replica_id
    walk = sorted(ids, key=lambda r: idle.scores[r]["ring_rank"])
    assert walk[0] == owner
    # owner holds 10, others 0: bound (10 + 1) / 4 * 1.25 = 3.4375; 11 > 3.4375 -> next on the ring
    busy = policy.select(request, [view(r, 10 if r == owner else 0) for r in ids])
    assert busy.replica_id == walk[1]
    assert busy.scores[owner]["acceptable"] == 0.0 and busy.scores[walk[1]]["acceptable"] == 1.0
    assert busy.scores[owner]["bound"] == pytest.approx(3.4375)
    # the next one is over too: skip it as well
    over = policy.select(request, [view(r, 10 if r in (owner, walk[1]) else 0) for r in ids])
    assert over.replica_id == walk[2]
    # everyone over (1 each, bound 1.5625 < 2): KubeAI keeps the hash owner
    assert policy.select(request, [view(r, 1) for r in ids]).replica_id == owner


def test_chwbl_ring_matches_kubeai_layout():
    hashes, owners = build_ring(["a", "b"], 256)
    assert len(hashes) == 512 and hashes == sorted(hashes)
    assert chwbl_hash("a0") in hashes and chwbl_hash("b255") in hashes  # fmt "%s%d"
    assert owners[hashes.index(chwbl_hash("b7"))] == "b"


# ---------------------------------------------------------------------------------------------
# dynamo_kv


def test_dynamo_argmin_cost_exact_numbers():
    # 128-token prompt, block 16 (Dynamo's worked example): cost = 1.0 * prefill_blocks + decode_blocks
    policy = make_policy("dynamo_kv")
    request = req(tokens=128, blocks=8, matched={"w1": 2, "w2": 5, "w3": 8})
    views = [
        view("w1", load=ReplicaLoad(running_decode_tokens=160)),  # 6 + 10 = 16
        view("w2", load=ReplicaLoad(running_decode_tokens=80)),  # 3 + 5 = 8
        view("w3", load=ReplicaLoad(running_decode_tokens=144)),  # 0 + 9 = 9
    ]
    d = policy.select(request, views)
    assert d.replica_id == "w2"
    assert {r: s["cost"] for r, s in d.scores.items()} == {"w1": 16.0, "w2": 8.0, "w3": 9.0}
    assert d.scores["w1"]["prefill_blocks"] == 6.0 and d.scores["w1"]["decode_blocks"] == 10.0


def test_dynamo_counts_queued_prefill_and_what_was_sent_since_the_report():
    policy = make_policy("dynamo_kv", {"overlap_score_weight": 2.0})
    request = req(tokens=100, blocks=6, matched={"a": 6})
    a = view("a", load=ReplicaLoad(queued_prefill_tokens=64, running_decode_tokens=320), sent_tokens_since_report=32)
    b = view("b", load=ReplicaLoad(running_decode_tokens=32))
    d = policy.select(request, [a, b])
    # a: new 100 - 96 = 4; prefill (4 + 64 + 32) / 16 = 6.25; decode (320 + 32) / 16 = 22; 2*6.25 + 22 = 34.5
    # b: prefill 100 / 16 = 6.25; decode 2; 2*6.25 + 2 = 14.5
    assert d.scores["a"]["cost"] == 34.5 and d.scores["b"]["cost"] == 14.5
    assert d.replica_id == "b"


def test_dynamo_credits_host_tier_blocks_at_its_published_weight():
    # Dynamo's tiered overlap: device + 0.75 x host (KvRouterConfig::default host_cache_hit_weight)
    policy = make_policy("dynamo_kv")
    request = req(tokens=128, blocks=8, matched={"w1": 2, "w2": 2}, offloaded={"w2": 4})
    d = policy.select(request, [view("w1"), view("w2")])
    assert d.scores["w1"]["prefill_blocks"] == 6.0  # (128 - 2 x 16) / 16
    assert d.scores["w2"]["overlap_blocks"] == 5.0 and d.scores["w2"]["prefill_blocks"] == 3.0  # 2 + 0.75 x 4
    assert d.replica_id == "w2"
    none = make_policy("dynamo_kv", {"host_cache_hit_weight": 0.0}).select(request, [view("w1"), view("w2")])
    assert none.scores["w2"]["prefill_blocks"] == 6.0


def test_dynamo_credits_disk_blocks_at_the_disk_weight_and_the_rest_at_the_host_one():
    # KvRouterConfig::default disk_cache_hit_weight 0.25: of w2's 4 lower-tier blocks 3 are on disk
    # only (RoutingRequest.offloaded_disk_blocks), so 2 + 0.75 x 1 + 0.25 x 3 = 3.5 effective blocks.
    policy = make_policy("dynamo_kv")
    request = dataclasses.replace(req(tokens=128, blocks=8, matched={"w1": 2, "w2": 2, "w3": 2},
                                      offloaded={"w2": 4, "w3": 4}), offloaded_disk_blocks={"w2": 3})
    d = policy.select(request, [view("w1"), view("w2"), view("w3")])
    assert d.scores["w2"]["overlap_blocks"] == 3.5 and d.scores["w2"]["prefill_blocks"] == 4.5
    assert d.scores["w3"]["overlap_blocks"] == 5.0  # all 4 in host memory: 2 + 0.75 x 4
    assert d.replica_id == "w3"
    heavier = make_policy("dynamo_kv", {"disk_cache_hit_weight": 0.75}).select(request, [view("w2")])
    assert heavier.scores["w2"]["overlap_blocks"] == 5.0
    with pytest.raises(ValueError, match="disk_cache_hit_weight"):
        make_policy("dynamo_kv", {"disk_cache_hit_weight": -1.0})


def test_dynamo_ties_go_to_the_smaller_cache():
    policy = make_policy("dynamo_kv")
    request = req(tokens=64, blocks=4)
    views = [view("a", cached_blocks=900), view("b", cached_blocks=10), view("c", cached_blocks=500)]
    assert {policy.select(req(f"t{i}", tokens=64, blocks=4), views).replica_id for i in range(20)} == {"b"}
    assert policy.select(request, views).scores["a"]["cost"] == policy.select(request, views).scores["b"]["cost"]


def test_dynamo_temperature_samples_the_softmax():
    probs = softmax_probabilities([0.0, 3.0, 9.0], 1.0)
    weights = [1.0, math.exp(-3 / 9), math.exp(-1.0)]
    assert probs == pytest.approx([w / sum(weights) for w in weights])
    assert softmax_probabilities([5.0, 5.0], 0.5) == [0.5, 0.5]

    policy = make_policy("dynamo_kv", {"router_temperature": 1.0})
    views = [view("a"), view("b", load=ReplicaLoad(running_decode_tokens=48)), view("c", load=ReplicaLoad(running_decode_tokens=144))]
    picks = Counter(policy.select(req(f"s{i}", tokens=32, blocks=2), views).replica_id for i in range(3000))
    for rid, p in zip("abc", probs):
        assert picks[rid] / 3000 == pytest.approx(p, abs=0.03)
    d = policy.select(req("s0", tokens=32, blocks=2), views)
    assert sum(s["probability"] for s in d.scores.values()) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# llmd_scorer


def test_llmd_weighted_sum_exact_numbers():
    policy = make_policy("llmd_scorer")
    request = req(tokens=160, blocks=10, matched={"a": 10, "b": 5})
    views = [
        view("a", load=ReplicaLoad(num_waiting=4, kv_usage=0.5)),
        view("b", load=ReplicaLoad(num_waiting=1, kv_usage=0.2), sent_since_report=1),
        view("c", load=ReplicaLoad(num_waiting=0, kv_usage=0.0)),
    ]
    d = policy.select(request, views)
    # prefix 1.0 / 0.5 / 0; queue (4-q)/(4-0): 0 / 0.5 / 1; kv 0.5 / 0.8 / 1.0
    # a = 3*1 + 2*0 + 2*0.5 = 4.0; b = 3*0.5 + 2*0.5 + 2*0.8 = 4.1; c = 0 + 2 + 2 = 4.0
    assert d.scores["a"]["total"] == pytest.approx(4.0)
    assert d.scores["b"]["total"] == pytest.approx(4.1)
    assert d.scores["c"]["total"] == pytest.approx(4.0)
    assert d.replica_id == "b"
    assert (d.scores["b"]["prefix"], d.scores["b"]["queue"], d.scores["b"]["kv_cache"]) == pytest.approx((0.5, 0.5, 0.8))


def test_llmd_weighs_cpu_blocks_as_llm_d_kv_cache_does():
    # LongestPrefixScorer with the default backends gpu 1.0, cpu 0.8: 4 GPU + 5 CPU blocks of 10
    policy = make_policy("llmd_scorer")
    d = policy.select(req(tokens=160, blocks=10, matched={"a": 4, "b": 8}, offloaded={"a": 5}), [view("a"), view("b")])
    assert d.scores["a"]["prefix"] == pytest.approx((4 + 0.8 * 5) / 10)
    assert d.scores["b"]["prefix"] == pytest.approx(0.8)


def test_llmd_weighs_disk_blocks_at_the_storage_weight():
    # DefaultKVCacheBackendConfig "storage" 0.3 (vLLM's disk-backed tier): of a's 5 lower-tier
    # blocks 2 are on disk only, so 4 + 0.8 x 3 + 0.3 x 2 of 10.
    request = dataclasses.replace(req(tokens=160, blocks=10, matched={"a": 4}, offloaded={"a": 5}),
                                  offloaded_disk_blocks={"a": 2})
    d = make_policy("llmd_scorer").select(request, [view("a")])
    assert d.scores["a"]["prefix"] == pytest.approx((4 + 0.8 * 3 + 0.3 * 2) / 10)


def test_llmd_equal_queues_score_one_and_ties_are_random():
    policy = make_policy("llmd_scorer")
    views = [view(r, load=ReplicaLoad(num_waiting=3, kv_usage=0.25)) for r in ("a", "b", "c")]
    d = policy.select(req("x", tokens=64, blocks=4), views)
    assert all(s["queue"] == 1.0 and s["total"] == pytest.approx(2 + 1.5) for s in d.scores.values())
    picks = {policy.select(req(f"p{i}", tokens=64, blocks=4), views).replica_id for i in range(60)}
    assert picks == {"a", "b", "c"}


# ---------------------------------------------------------------------------------------------
# preble_e2


def test_preble_prefill_model_is_prebles_equation():
    coeffs = PrebleE2Config().prefill_coeffs_ms
    expected_ms = 28.931389307785594 + 0.182233431 * 600 + 4.00365142e-03 * 1000 + 2.55050069e-06 * 600 * 1000
    assert prefill_time_s(600, 1000, coeffs) == pytest.approx(expected_ms / 1e3)
    assert prefill_time_s(0, 1000, coeffs) == 0.0


def test_preble_exploits_a_mostly_cached_prompt():
    policy = make_policy("preble_e2")
    # load r0 heavily first (unique prompts, nothing cached)
    for i in range(10):
        r = req(f"warm {i}", tokens=2000, blocks=125, now=1.0, rid=f"w{i}")
        policy.on_routed(r, Decision("r0"))
    # 1000 tokens, r0 holds 700 of them (700 > 300): exploit -> r0 despite its load
    request = req("q", tokens=1000, blocks=62, matched={"r0": 43, "r1": 10}, now=2.0)  # 688 vs 160 tokens
    d = policy.select(request, [view("r0"), view("r1")])
    assert d.replica_id == "r0" and d.scores["r0"]["exploit"] == 1.0
    # two holders of the longest prefix: the one with the lower load cost
    both = req("q2", tokens=1000, blocks=62, matched={"r0": 43, "r1": 43}, now=2.0)
    assert policy.select(both, [view("r0"), view("r1")]).replica_id == "r1"


def test_preble_explores_by_window_load_plus_prefill_cost():
    policy = make_policy("preble_e2")
    coeffs = PrebleE2Config().prefill_coeffs_ms
    # idle fleet: 400 of 1000 tokens cached on r0 (400 <= 600: explore); r0's prefill is cheaper
    request = req("q", tokens=1000, blocks=62, matched={"r0": 25}, now=0.0)  # 400 tokens
    d = policy.select(request, [view("r0"), view("r1")])
    assert d.scores["r0"]["exploit"] == 0.0 and d.replica_id == "r0"
    assert d.scores["r0"]["explore_cost_s"] == pytest.approx(prefill_time_s(600, 1000, coeffs))
    assert d.scores["r1"]["explore_cost_s"] == pytest.approx(prefill_time_s(1000, 1000, coeffs))
    # r0 received heavy prefill work in the window: explore moves the request to r1
    for i in range(3):
        warm = req(f"warm {i}", tokens=4000, blocks=250, now=10.0, rid=f"w{i}", max_tokens=0)
        policy.on_routed(warm, Decision("r0"))
    later = req("q", tokens=1000, blocks=62, matched={"r0": 25}, now=20.0)
    d = policy.select(later, [view("r0"), view("r1")])
    assert d.replica_id == "r1"
    assert d.scores["r0"]["window_prefill_s"] == pytest.approx(3 * prefill_time_s(4000, 4000, coeffs))
    # once the window (180 s) has passed, that work no longer counts
    much_later = req("q", tokens=1000, blocks=62, matched={"r0": 25}, now=10.0 + 181.0)
    assert policy.select(much_later, [view("r0"), view("r1")]).replica_id == "r0"


def test_preble_decode_cost_lasts_while_requests_run():
    policy = make_policy("preble_e2", {"tpot_s": 0.1})
    running = req("long answer", tokens=16, blocks=1, now=0.0, rid="run", max_tokens=500)
    policy.on_routed(running, Decision("r0"))
    d = policy.select(req("next", tokens=16, blocks=1, now=1.0), [view("r0"), view("r1")])
    assert d.scores["r0"]["running_decode_s"] == pytest.approx(50.0) and d.replica_id == "r1"
    policy.on_complete(running, "r0", True)
    d = policy.select(req("next", tokens=16, blocks=1, now=1.0), [view("r0"), view("r1")])
    assert d.scores["r0"]["running_decode_s"] == 0.0


# ---------------------------------------------------------------------------------------------
# precise_prefix


def test_precise_prefix_longest_match_then_least_loaded():
    policy = make_policy("precise_prefix")
    request = req(tokens=160, blocks=10, matched={"a": 3, "b": 7, "c": 7})
    views = [view("a", 0), view("b", 4), view("c", 2)]
    d = policy.select(request, views)
    assert d.replica_id == "c"  # b and c hold 7 blocks; c has fewer in flight
    # same in flight: less queued prefill
    views = [view("a", 0), view("b", 2, sent_tokens_since_report=100), view("c", 2, load=ReplicaLoad(queued_prefill_tokens=500))]
    assert policy.select(request, views).replica_id == "b"
    # a longer match beats any load
    assert policy.select(req(tokens=160, blocks=10, matched={"a": 8}), [view("a", 50), view("b", 0)]).replica_id == "a"
    # a miss goes to the least loaded
    assert policy.select(req(tokens=160, blocks=10), [view("a", 3), view("b", 1), view("c", 2)]).replica_id == "b"
    # a lower-tier hit is no hit: device blocks only
    assert policy.select(req(tokens=160, blocks=10, matched={"a": 2}, offloaded={"b": 9}),
                         [view("a", 0), view("b", 0)]).replica_id == "a"


def test_registry_views_carry_every_field_by_name():
    """Registry.views builds ReplicaView/ReplicaLoad positionally (hot path): each value must land
    in the field of its name."""
    from balancer.config import BreakerConfig, HealthConfig, ReplicaSpec
    from balancer.registry import Registry

    now = [100.0]
    reg = Registry(BreakerConfig(), HealthConfig(), lambda: now[0])
    spec = ReplicaSpec(url="http://127.0.0.1:9001")
    reg.add(spec)
    r = reg.get(spec.replica_id)
    reg.on_load(spec.replica_id, ReplicaLoad(num_running=1, num_waiting=2, queued_prefill_tokens=3,
                                             running_decode_tokens=4, free_blocks=5, total_blocks=6, kv_usage=0.5,
                                             age_s=0.0))
    reg.on_sent(r, tokens=70, uncached_tokens=30)
    now[0] += 0.25
    (v,) = reg.views([r], lambda rid: 42 if rid == spec.replica_id else -1)
    assert (v.replica_id, v.inflight_requests, v.inflight_tokens, v.sent_since_report, v.cached_blocks) == (
        spec.replica_id, 1, 70, 1, 42)
    assert v.sent_tokens_since_report == r.sent_tokens_since_report
    assert v.load == ReplicaLoad(1, 2, 3, 4, 5, 6, 0.5, 0.25)
    assert reg.views([r], lambda rid: 7)[0] == v._replace(cached_blocks=7)


def test_a_report_made_before_a_send_reached_the_replica_does_not_erase_it():
    """A send is in the replica's reports only from in_transit_s after it: a report sooner than
    that (or one made earlier and delivered late) keeps it counted as sent since the report, so
    two requests routed between two reports both see the first one's work (no herding)."""
    from balancer.config import BreakerConfig, HealthConfig, ReplicaSpec
    from balancer.registry import Registry

    now = [10.0]
    reg = Registry(BreakerConfig(), HealthConfig(), lambda: now[0], in_transit_s=0.005)
    spec = ReplicaSpec(url="http://127.0.0.1:9001")
    reg.add(spec)
    r = reg.get(spec.replica_id)
    empty = ReplicaLoad(total_blocks=100)
    reg.on_sent(r, tokens=500, uncached_tokens=300)       # t = 10.000
    now[0] += 0.002
    reg.on_load(spec.replica_id, empty)                    # made at 10.002: the send is still on its way
    assert (r.sent_since_report, r.sent_tokens_since_report) == (1, 300)
    reg.on_sent(r, tokens=200, uncached_tokens=100)       # t = 10.002
    now[0] += 0.004
    reg.on_load(spec.replica_id, empty)                    # 10.006: holds the first send, not the second
    assert (r.sent_since_report, r.sent_tokens_since_report) == (1, 100)
    now[0] += 0.050
    reg.on_load(spec.replica_id, empty, age_s=0.046)      # made at 10.010, delivered late: holds both
    assert (r.sent_since_report, r.sent_tokens_since_report) == (0, 0)
    reg.on_sent(r, tokens=10, uncached_tokens=10)
    now[0] += 0.001
    reg.on_load(spec.replica_id, empty, age_s=0.5)        # an old report holds nothing sent since
    assert r.sent_since_report == 1
    with pytest.raises(ValueError, match="in_transit_s"):
        Registry(BreakerConfig(), HealthConfig(), lambda: 0.0, in_transit_s=-1)
