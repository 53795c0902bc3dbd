"""The prefill/decode pair selector (balancer/disagg.py): what a caller sees of its choices,
and the routing transaction's pair stage (`Router.route(..., split=True)`) on a real Router and
Registry: its bookings, sticky sessions, LoRA narrowing, its decision, one routing per request."""

from __future__ import annotations

import pytest

from balancer.approx_index import ApproxIndex
from balancer.config import BreakerConfig, HealthConfig, ReplicaSpec
from balancer.disagg import BOTH, DECODE, PREFILL, PairConfig, PairSelector, check_role
from balancer.policies import make_policy
from balancer.policies.base import ReplicaLoad, ReplicaView, RoutingRequest
from balancer.prefix_index import PrefixIndex
from balancer.registry import Registry
from balancer.router import Booking, PairBooking, Router
from balancer.sessions import SessionConfig, Sessions
from protocol.events import BlockStored
from protocol.openai_api import GenerationRequest
from protocol.tokenizer import ByteTokenizer

BS = 16
MODEL = "m"


def load(running=0, waiting=0, queued=0, decode_tokens=0, free=1000, total=1000) -> ReplicaLoad:
    return ReplicaLoad(num_running=running, num_waiting=waiting, queued_prefill_tokens=queued,
                       running_decode_tokens=decode_tokens, free_blocks=free, total_blocks=total,
                       kv_usage=1 - free / total, age_s=0.0)


def view(rid: str, **kw) -> ReplicaView:
    return ReplicaView(rid, load=load(**kw))


def request(prompt_tokens=1024, matched=None, out=200) -> RoutingRequest:
    return RoutingRequest("q", "", prompt_tokens, tuple(range(prompt_tokens // BS)), BS, matched or {},
                          predicted_output_tokens=out)


ROLES = {"p1": PREFILL, "p2": PREFILL, "d1": DECODE, "d2": DECODE}


def test_prefill_goes_to_the_prefix_hit_unless_its_queue_is_longer_than_the_saving():
    sel = PairSelector()
    views = [view("p1"), view("p2"), view("d1"), view("d2")]
    hit = request(matched={"p2": 60})  # 960 of 1024 tokens cached on p2
    assert sel.select(hit, views, ROLES).prefill == "p2"
    # p2 has 20k prompt tokens queued: computing 1024 on idle p1 is sooner.
    busy = [view("p1"), view("p2", waiting=10, queued=20_000), view("d1"), view("d2")]
    d = sel.select(hit, busy, ROLES)
    assert d.prefill == "p1"
    assert d.prefill_scores["p2"]["queued_tokens"] == 20_000


def test_decode_goes_where_memory_is_free_and_fewer_sequences_decode():
    sel = PairSelector()
    req = request()
    # d1 decodes 100 sequences, d2 10: d2.
    views = [view("p1"), view("d1", running=100, decode_tokens=100_000), view("d2", running=10, decode_tokens=10_000)]
    assert sel.select(req, views, ROLES).decode == "d2"
    # Equal decode load, but d2 is nearly full (prompt + output would not fit): d1.
    views = [view("p1"), view("d1", running=10, decode_tokens=10_000),
             view("d2", running=10, decode_tokens=10_000, free=5)]
    d = sel.select(req, views, ROLES)
    assert d.decode == "d1"
    assert d.decode_scores["d2"]["memory"] > 0 and d.decode_scores["d1"]["memory"] == 0


def test_roles_are_respected_and_no_pair_means_none():
    sel = PairSelector()
    req = request(matched={"d1": 64})  # the decode replica holds the prefix: still not a prefill candidate
    views = [view("p1", waiting=50, queued=100_000), view("d1"), view("d2")]
    d = sel.select(req, views, ROLES)
    assert d.prefill == "p1" and d.decode in ("d1", "d2") and not d.unified
    assert set(d.prefill_scores) == {"p1"} and set(d.decode_scores) == {"d1", "d2"}
    assert sel.select(req, [view("d1"), view("d2")], ROLES) is None  # nobody can prefill
    assert sel.select(req, [view("p1"), view("p2")], ROLES) is None  # nobody can decode


def test_a_unified_replica_keeps_its_kv_when_the_hand_over_costs_more_than_the_decode_load_saves():
    roles = {"u": BOTH, "d": DECODE}
    views = [view("u", running=2, decode_tokens=2000), view("d")]
    req = request(prompt_tokens=8192)
    # Free hand-over: the idle decode replica decodes it.
    assert PairSelector(PairConfig()).select(req, views, roles).decode == "d"
    # 1 ms per token to move (a slow link): 8 s of transfer, it stays on u.
    d = PairSelector(PairConfig(transfer_s_per_token=1e-3)).select(req, views, roles)
    assert d.unified and d.prefill == d.decode == "u"
    assert d.decode_scores["u"]["transfer"] == 0 and d.decode_scores["d"]["transfer_tokens"] == 8192
    # Only the tokens the decode replica does not already cache are moved.
    cached = request(prompt_tokens=8192, matched={"d": 500})
    assert PairSelector(PairConfig(transfer_s_per_token=1e-3)).select(cached, views, roles).decode_scores["d"][
        "transfer_tokens"] == 8192 - 500 * BS


def test_roles_and_config_are_validated():
    assert check_role("prefill") == "prefill"
    with pytest.raises(ValueError, match="prefill, decode, both"):
        check_role("encode")
    with pytest.raises(ValueError, match="transfer"):
        PairConfig(transfer_s_per_token=-1)


def test_the_registry_knows_whether_the_fleet_is_disaggregated_as_roles_and_members_change():
    """`Registry.disaggregated` (read per request, never a scan of the fleet): True while some
    replica has a single role, from its spec (`ROLE@URL`) or its load reports."""
    registry = Registry(BreakerConfig(), HealthConfig(), clock=lambda: 0.0)
    registry.add(ReplicaSpec(url="http://a:80"))
    assert not registry.disaggregated
    assert registry.set_role("http://a:80", DECODE) and registry.disaggregated
    assert registry.set_role("http://a:80", BOTH) and not registry.disaggregated
    registry.add(ReplicaSpec.parse(f"{PREFILL}@http://p:80"))
    assert registry.disaggregated and registry.roles() == {"http://a:80": BOTH, "http://p:80": PREFILL}
    registry.remove("http://p:80")
    assert not registry.disaggregated


def _router(policy="predictive", predictor=None, roles=None, sessions=None, pairs=True):
    """p1, p2, d1, d2 (their roles configured, as `ROLE@URL`; `roles` overrides them), routed by
    `policy` with the pair stage on."""
    registry = Registry(BreakerConfig(), HealthConfig(), clock=lambda: 0.0)
    for rid, role in (roles or ROLES).items():
        registry.add(ReplicaSpec(url=f"http://{rid}:80", role=None if role == BOTH else role))
    index = PrefixIndex(BS, MODEL)
    pol = make_policy(policy)
    router = Router(MODEL, BS, ByteTokenizer(), index, ApproxIndex(clock=lambda: 0.0), pol, registry,
                    has_events=lambda rid: True, clock=lambda: 0.0, predictor=predictor,
                    sessions=sessions, pairs=PairSelector(learner=getattr(pol, "learner", None)) if pairs else None)
    return router, registry, index


def test_the_pair_stage_books_both_sides_and_releases_each_once():
    from predictors.adapter import balancer_predictor

    learned = []
    predictor = balancer_predictor("global_median", MODEL)
    observe = predictor.observe_done
    predictor.observe_done = lambda rr, n: (learned.append((rr.request_id, n)), observe(rr, n))
    router, registry, index = _router(predictor=predictor)
    prompt = "a prompt that both sides will hold " * 6
    tokens = ByteTokenizer().encode(prompt)
    n = len(tokens) // BS
    index.apply("http://p2:80", BlockStored(tuple(range(1, n + 1)), None, tuple(tokens[: n * BS]), BS))
    p = router.prepare(GenerationRequest(kind="completion", model=MODEL, prompt=prompt, max_tokens=10))
    pair = router.route(p, "q1", split=True)
    assert isinstance(pair, PairBooking) and not pair.unified
    assert pair.prefill.replica_id == "http://p2:80" == pair.decision.prefill
    pre, dec = pair.prefill.replica, pair.decode.replica
    assert dec.replica_id == pair.decision.replica_id and dec.role == DECODE
    assert (pre.inflight_requests, pre.inflight_tokens) == (1, len(tokens))
    assert pre.sent_tokens_since_report == len(tokens) - n * BS  # only the uncached tail is computed
    assert (dec.inflight_requests, dec.inflight_tokens) == (1, len(tokens) + 10)
    # The next request sees the first one's decode booked: it decodes on the other decode replica.
    pair2 = router.route(p, "q2", split=True)
    assert pair2.decode.replica_id != pair.decode.replica_id
    pair.prefill.finish()
    pair.prefill.finish()
    assert pre.inflight_requests == (pair2.prefill.replica_id == pre.replica_id)  # q1's released once
    assert dec.inflight_requests == 1  # q1 still decodes
    pair.decode.finish(10)
    pair2.prefill.fail()
    pair2.decode.finish(10)
    pair2.decode.finish(10)
    assert all(r.inflight_requests == 0 and r.inflight_tokens == 0 for r in registry)
    assert learned == [("q1", 10), ("q2", 10)]  # the predictor learns each output length once
    # Without `split` (a request no pair can serve: n > 1, a retry) the same fleet routes it whole.
    whole = router.route(p, "q3")
    assert type(whole) is Booking


def test_a_pair_kept_whole_is_booked_like_a_routed_request():
    router, registry, _ = _router(roles={"u1": BOTH, "u2": BOTH, "d1": DECODE})
    p = router.prepare(GenerationRequest(kind="completion", model=MODEL, prompt="hi " * 40, max_tokens=5))
    # d1 is loaded: the decode side is the prefill replica itself, so the request stays whole.
    registry.on_load("http://d1:80", load(running=60, decode_tokens=60_000, free=10))
    pair = router.route(p, "q", split=True)
    assert pair.unified and pair.prefill is pair.decode and pair.prefill.by_policy
    assert pair.prefill.replica.inflight_requests == 1
    pair.decode.finish(5)
    assert pair.prefill.replica.inflight_requests == 0


def test_with_no_pair_possible_the_request_is_routed_once_by_the_policy():
    router, registry, _ = _router(policy="round_robin")
    p = router.prepare(GenerationRequest(kind="completion", model=MODEL, prompt="hi " * 40, max_tokens=5))
    looked = []
    match = router.index.match
    router.index.match = lambda hashes: (looked.append(1), match(hashes))[1]
    b = router.route(p, "q", exclude=frozenset({"http://p1:80", "http://p2:80"}), split=True)  # no prefill left
    assert type(b) is Booking and b.by_policy and b.replica.role == DECODE
    assert looked == [1]  # one lookup, one decision: the fallback is the same transaction's policy stage
    assert sum(r.inflight_requests for r in registry) == 1


def test_a_session_keeps_to_its_decode_replica_across_turns():
    sessions = Sessions(SessionConfig(enabled=True))
    router, registry, _ = _router(sessions=sessions)
    req = GenerationRequest(kind="completion", model=MODEL, prompt="a conversation, turn one " * 4, max_tokens=5)
    first = router.route(router.prepare(req, "s1"), "t1", split=True)
    home = first.decode.replica_id
    assert sessions.get("s1", 0.0).replica_id == home and sessions.routed["new"] == 1
    first.prefill.finish()
    # Load the home a little (not overloaded): without the session the pair stage would move the
    # decode side to the idle decode replica; the session keeps it.
    registry.on_load(home, load(running=2, decode_tokens=3000))
    free = router.route(router.prepare(req), "free", split=True)  # the same request outside the session
    assert free.decode.replica_id != home
    free.prefill.finish()
    free.decode.finish(5)
    second = router.route(router.prepare(req, "s1"), "t2", split=True)
    assert second.decode.replica_id == home and sessions.routed["stuck"] == 1
    assert "its home" in second.decision.reason


def test_a_lora_request_pairs_among_the_adapter_holders():
    router, registry, _ = _router(policy="round_robin", roles={"p1": PREFILL, "p2": PREFILL, "d1": DECODE,
                                                                 "d2": DECODE})
    for rid in ("p1", "p2", "d1", "d2"):
        registry.set_models(registry.get(f"http://{rid}:80"), frozenset({MODEL, "ad"}), {"ad": MODEL})
    for rid in ("p2", "d2"):  # only these hold the adapter resident
        registry.set_loras(f"http://{rid}:80", frozenset({"ad"}), 0.5)
    p = router.prepare(GenerationRequest(kind="completion", model="ad", prompt="hi " * 40, max_tokens=5))
    assert p.lora_name == "ad"
    pair = router.route(p, "q", split=True)
    assert (pair.prefill.replica_id, pair.decode.replica_id) == ("http://p2:80", "http://d2:80")


def test_explain_shows_the_pair_decision():
    router, _, _ = _router()
    p = router.prepare(GenerationRequest(kind="completion", model=MODEL, prompt="hi " * 40, max_tokens=5))
    _, _, d = router.choose(p, "explain", split=True)
    assert d.prefill.startswith("http://p") and d.decode == d.replica_id and d.decode.startswith("http://d")
    assert "prefill on" in d.reason and "decode on" in d.reason
    assert set(d.prefill_scores) == {"http://p1:80", "http://p2:80"}
    assert set(d.decode_scores) == {"http://d1:80", "http://d2:80"}


def test_a_unified_replica_is_charged_for_the_interference_between_its_prefills_and_decodes():
    sel = PairSelector()
    roles = {"u": BOTH, "p": PREFILL, "d": DECODE}
    req = request(prompt_tokens=4096)
    # u decodes 50 sequences; p has a little more queued: without the interference term u would
    # prefill (lower TTFT), with it the prefill goes to p.
    views = [view("u", running=50, decode_tokens=20_000), view("p", waiting=1, queued=512), view("d")]
    d = sel.select(req, views, roles)
    assert d.prefill_scores["u"]["ttft"] < d.prefill_scores["p"]["ttft"]
    assert d.prefill == "p" and d.prefill_scores["u"]["interference"] > 0 == d.prefill_scores["p"]["interference"]
    # Decode: u has 30k prefill tokens queued, which its decode steps would share; d has none.
    views = [view("u", queued=30_000, waiting=3), view("p"), view("d", running=2, decode_tokens=2000)]
    d = sel.select(req, views, roles)
    assert d.decode == "d" and d.decode_scores["u"]["interference"] > 0 == d.decode_scores["d"]["interference"]
