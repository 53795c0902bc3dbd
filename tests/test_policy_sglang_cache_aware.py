"""sglang_cache_aware: the approximate character tree and the routing rule around it."""

from __future__ import annotations

import random

import pytest

from balancer.policies import make_policy
from balancer.policies.base import Decision, ReplicaView, RoutingRequest
from balancer.policies.sglang_cache_aware import ApproxTree, shared_prefix_len


def req(text: str, now: float = 0.0, seed: int = 0) -> RoutingRequest:
    return RoutingRequest(
        request_id=f"{hash(text)}-{now}",
        prompt_text=text,
        prompt_tokens=max(1, len(text) // 4),
        block_hashes=(),
        block_size=16,
        matched_blocks={},
        now=now,
        rng_seed=seed,
    )


def views(**inflight: int) -> list[ReplicaView]:
    return [ReplicaView(replica_id=rid, inflight_requests=n) for rid, n in inflight.items()]


def route_to(policy, text: str, replica_id: str, now: float = 0.0) -> None:
    policy.on_routed(req(text, now), Decision(replica_id))


def lcp(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------------------------------------
# the tree


def test_shared_prefix_len():
    assert shared_prefix_len("abcdef", "xxabcdef", 2) == 6
    assert shared_prefix_len("abcdef", "xxabcxyz", 2) == 3
    assert shared_prefix_len("abcdef", "xxabc", 2) == 3  # text ends inside the edge
    assert shared_prefix_len("a", "ab", 0) == 1
    long_edge = "q" * 5000 + "r"
    assert shared_prefix_len(long_edge, "q" * 4000 + "s", 0) == 4000
    assert shared_prefix_len("héllo wörld", "héllo world", 0) == 7  # characters, not bytes


def test_tree_matches_brute_force_longest_common_prefix():
    rng = random.Random(0)
    tree = ApproxTree()
    held: dict[str, list[str]] = {"a": [], "b": [], "c": []}
    corpus = ["".join(rng.choices("xyz", k=rng.randint(0, 12))) for _ in range(60)]
    for tick, text in enumerate(corpus, start=1):
        tenant = rng.choice(sorted(held))
        tree.insert(text, tenant, tick)
        held[tenant].append(text)
        tree.check_integrity()
        probe = "".join(rng.choices("xyz", k=rng.randint(0, 14)))
        expected = {t: max((lcp(probe, s) for s in texts), default=0) for t, texts in held.items()}
        got = tree.match(probe)
        assert {t: got.get(t, 0) for t in held} == expected
    # a tenant's character count is the size of the union of its strings' prefixes
    for tenant, texts in held.items():
        prefixes = {s[:i] for s in texts for i in range(1, len(s) + 1)}
        assert tree.tenant_chars[tenant] == len(prefixes)


def test_tree_evicts_least_recently_used_leaves_first():
    tree = ApproxTree()
    tree.insert("system prompt|question one", "r0", 1)
    tree.insert("system prompt|question two", "r0", 2)
    tree.insert("system prompt|question one", "r0", 3)  # touch "one" again
    tree.insert("other", "r1", 4)
    size = tree.tenant_chars["r0"]
    assert size == len("system prompt|question ") + len("one") + len("two")
    freed = tree.evict("r0", size - 1)
    assert freed == 3  # "two" went: it is the least recently used leaf
    assert tree.match("system prompt|question two")["r0"] == len("system prompt|question ")
    assert tree.match("system prompt|question one")["r0"] == len("system prompt|question one")
    assert tree.tenant_chars["r1"] == 5  # other tenants untouched
    tree.check_integrity()
    # evicting deeper takes the leaf, then the shared head it exposed
    tree.evict("r0", 0)
    assert tree.tenant_chars["r0"] == 0 and "r0" not in tree.match("system prompt|question one")
    tree.check_integrity()
    assert tree.evict("r1", 5) == 0  # at the bound: nothing to do


def test_tree_keeps_nodes_another_tenant_still_holds():
    tree = ApproxTree()
    tree.insert("shared prefix A", "r0", 1)
    tree.insert("shared prefix B", "r1", 2)
    tree.evict("r0", 0)
    assert tree.match("shared prefix B") == {"r1": len("shared prefix B")}
    tree.check_integrity()
    tree.remove_tenant("r1")
    assert tree.match("shared prefix B") == {} and tree.node_count() == 0
    tree.check_integrity()


# ---------------------------------------------------------------------------------------------
# the policy


SYSTEM = "You are a careful assistant that answers questions about invoices. " * 4


def test_goes_to_the_longest_text_match_above_the_threshold():
    policy = make_policy("sglang_cache_aware")
    route_to(policy, SYSTEM + "Question: what is the total of invoice 17?", "r1")
    route_to(policy, "Something unrelated entirely. " * 10, "r0")
    d = policy.select(req(SYSTEM + "Question: who issued invoice 18?"), views(r0=0, r1=5, r2=0))
    assert d.replica_id == "r1"
    assert d.scores["r1"]["match_rate"] > 0.3 and d.scores["r0"]["matched_chars"] == 0
    assert "prefix match" in d.reason


def test_below_the_threshold_goes_to_the_smallest_tree():
    policy = make_policy("sglang_cache_aware")
    route_to(policy, "a" * 100, "r0")
    route_to(policy, "b" * 40, "r1")
    d = policy.select(req("abc" + "z" * 97), views(r0=0, r1=3, r2=9))  # 1/100 matched on r0
    assert d.replica_id == "r2" and d.scores["r2"]["tree_chars"] == 0
    route_to(policy, "c" * 10, "r2")
    assert policy.select(req("z" * 100), views(r0=0, r1=0, r2=0)).replica_id == "r2"  # 10 < 40 < 100 chars


def test_imbalanced_fleet_goes_to_the_least_loaded():
    policy = make_policy("sglang_cache_aware")
    route_to(policy, SYSTEM + "q1", "r0")
    probe = req(SYSTEM + "q2")
    # 100 - 10 = 90 > 64 and 100 > 1.5 * 10: imbalanced, cache affinity ignored
    d = policy.select(probe, views(r0=100, r1=10, r2=30))
    assert d.replica_id == "r1" and d.scores["r1"]["imbalanced"] == 1.0
    # 74 - 10 = 64, not > 64: balanced, so the match wins
    assert policy.select(probe, views(r0=74, r1=10, r2=30)).replica_id == "r0"
    # 200 - 130 = 70 > 64 and 200 > 1.5 * 130 = 195: imbalanced
    assert policy.select(probe, views(r0=200, r1=130)).replica_id == "r1"
    # 190 - 127 = 63, not > 64: balanced
    assert policy.select(probe, views(r0=190, r1=127)).replica_id == "r0"


def test_counts_characters_not_bytes():
    policy = make_policy("sglang_cache_aware", {"cache_threshold": 0.5})
    route_to(policy, "日本語のシステムプロンプト" * 10, "r0")
    d = policy.select(req("日本語のシステムプロンプト" * 10 + "質問"), views(r0=0, r1=0))
    assert d.replica_id == "r0"
    assert d.scores["r0"]["matched_chars"] == len("日本語のシステムプロンプト") * 10


def test_eviction_bounds_each_replica_tree():
    # interval 0: trimmed to the bound after every routed request
    policy = make_policy("sglang_cache_aware", {"max_tree_size": 500, "eviction_interval_s": 0})
    rng = random.Random(3)
    for i in range(200):
        text = "".join(rng.choices("abcdefgh", k=rng.randint(20, 120)))
        route_to(policy, text, f"r{i % 3}", now=float(i))
        assert all(size <= 500 for size in policy.tree.tenant_chars.values())
    policy.tree.check_integrity()


def test_eviction_runs_on_the_interval_and_a_runaway_tree_is_trimmed_at_once():
    policy = make_policy("sglang_cache_aware", {"max_tree_size": 1000, "eviction_interval_s": 120})
    rng = random.Random(4)
    for i in range(30):  # 30 x 60 chars, same clock time: no interval elapses
        route_to(policy, "".join(rng.choices("abcdefgh", k=60)), "r0", now=0.0)
        assert policy.tree.tenant_chars["r0"] <= 2000  # the hard bound (2 x max_tree_size)
    assert policy.tree.tenant_chars["r0"] > 1000  # over the soft bound until the next cycle
    route_to(policy, "x" * 10, "r1", now=121.0)  # a cycle: every tenant back to the bound
    assert policy.tree.tenant_chars["r0"] <= 1000
    policy.tree.check_integrity()


def test_removed_replica_is_forgotten():
    policy = make_policy("sglang_cache_aware")
    route_to(policy, SYSTEM + "q", "r0")
    policy.on_replica_removed("r0")
    d = policy.select(req(SYSTEM + "q"), views(r0=0, r1=0))
    assert d.scores["r0"]["matched_chars"] == 0 and d.scores["r0"]["tree_chars"] == 0


@pytest.mark.parametrize("n_replicas", [1, 8])
def test_long_prompts_route_and_match(n_replicas):
    policy = make_policy("sglang_cache_aware")
    rng = random.Random(5)
    head = "".join(rng.choices("abcdefghij ", k=8000))
    ids = [f"r{i}" for i in range(n_replicas)]
    for i in range(40):
        text = head + "".join(rng.choices("abcdefghij ", k=24000))  # 32k characters
        d = policy.select(req(text, seed=i), views(**{rid: 0 for rid in ids}))
        policy.on_routed(req(text), d)
    d = policy.select(req(head + "tail"), views(**{rid: 0 for rid in ids}))
    assert d.scores[d.replica_id]["matched_chars"] >= 8000
    policy.tree.check_integrity()
