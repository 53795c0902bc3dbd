"""Sticky sessions (balancer/sessions.py), through the real `Router`, `Registry` and `PrefixIndex`:
what a caller sees of the key, the table (TTL, release, the size bound), the overload rule,
and each outcome (new, stuck, followed, moved_overloaded, moved_gone). The live fleet's tests
are in tests/test_sessions_e2e.py."""

from __future__ import annotations

import argparse

import pytest

from balancer.approx_index import ApproxIndex
from balancer.config import BalancerConfig, BreakerConfig, HealthConfig, ReplicaSpec
from balancer.policies import make_policy
from balancer.policies.base import Decision, ReplicaLoad, ReplicaView
from balancer.prefix_index import PrefixIndex
from balancer.registry import Registry
from balancer.router import Router
from balancer.sessions import SessionConfig, Sessions, add_arguments, apply_arguments
from protocol.events import BlockStored
from protocol.openai_api import APIError, GenerationRequest
from protocol.tokenizer import ByteTokenizer

MODEL = "m"
BS = 16
URLS = [f"http://r{i}:80" for i in range(3)]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def fleet(policy: str = "round_robin", **cfg):
    clock = Clock()
    registry = Registry(BreakerConfig(), HealthConfig(), clock)
    for u in URLS:
        registry.add(ReplicaSpec(url=u))
    sessions = Sessions(SessionConfig(enabled=True, **cfg))
    index = PrefixIndex(BS, MODEL)
    router = Router(MODEL, BS, ByteTokenizer(), index, ApproxIndex(clock=clock), make_policy(policy), registry,
                    has_events=lambda rid: True, clock=clock, sessions=sessions)
    return router, registry, sessions, index, clock


def prepared(router, prompt: str, session: str | None = "s1"):
    return router.prepare(GenerationRequest(kind="completion", model=MODEL, prompt=prompt, max_tokens=4),
                          session=session)


def hold(index: PrefixIndex, replica: str, prompt: str) -> None:
    """`replica`'s KV events say it holds every full block of `prompt`."""
    tokens = ByteTokenizer().encode(prompt)
    n = len(tokens) // BS
    index.apply(replica, BlockStored(tuple(range(1000, 1000 + n)), None, tuple(tokens[: n * BS]), BS))


def route(router, prompt: str = "hello " * 20, session: str | None = "s1", **kw):
    b = router.route(prepared(router, prompt, session), "req", **kw)
    b.finish(4)
    return b


def report(registry, replica: str, running: int = 0, waiting: int = 0, queued: int = 0, kv: float = 0.1) -> None:
    registry.on_load(replica, ReplicaLoad(num_running=running, num_waiting=waiting, queued_prefill_tokens=queued,
                                          kv_usage=kv, total_blocks=100, free_blocks=90, age_s=0.0))


# ------------------------------------------------------------------------------ the key
def test_the_key_is_the_header_then_the_user_field_and_nothing_when_off():
    req = GenerationRequest(kind="chat", model=MODEL, messages=({"role": "user", "content": "hi"},), user="alice")
    on = Sessions(SessionConfig(enabled=True))
    assert on.key_of({"X-Session-Id": "conv-7"}.get, req) == "conv-7"
    assert on.key_of({}.get, req) == "alice"
    assert Sessions(SessionConfig(enabled=True, user_field=False)).key_of({}.get, req) is None
    assert Sessions(SessionConfig(enabled=True, header="X-Conv")).key_of({"X-Conv": "c"}.get, req) == "c"
    assert Sessions(SessionConfig()).key_of({"X-Session-Id": "conv-7"}.get, req) is None  # off by default
    with pytest.raises(APIError) as e:
        on.key_of({"X-Session-Id": "k" * 300}.get, req)
    assert e.value.status == 400 and "at most 256" in e.value.body()["error"]["message"]
    long_user = GenerationRequest(kind="completion", model=MODEL, prompt="x", user="u" * 300)
    assert on.key_of({}.get, long_user) is None
    assert [on.releases({"X-Session-Release": v}.get) for v in ("true", "1", "YES", "false", "0")] == \
        [True, True, True, False, False]
    assert on.releases({}.get) is False
    with pytest.raises(APIError, match="true or false"):
        on.releases({"X-Session-Release": "maybe"}.get)


def test_config_from_a_file_table_and_flags():
    cfg = BalancerConfig.from_dict({"sessions": {"enabled": True, "ttl_s": 60, "header": "X-Conv"}})
    assert cfg.sessions == SessionConfig(enabled=True, ttl_s=60, header="X-Conv")
    with pytest.raises(ValueError, match="its keys are"):
        BalancerConfig.from_dict({"sessions": {"ttl": 60}})
    with pytest.raises(ValueError, match="overload_factor"):
        SessionConfig(overload_factor=0.5)
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--sessions", "--session-ttl-s", "30", "--session-overload-factor", "3",
                         "--no-session-user-field"])
    got = apply_arguments(cfg, args).sessions
    assert (got.enabled, got.ttl_s, got.overload_factor, got.user_field, got.header) == (True, 30.0, 3.0, False,
                                                                                          "X-Conv")
    assert apply_arguments(cfg, p.parse_args([])) is cfg


# ------------------------------------------------------------------------------ outcomes
def test_a_session_sticks_to_its_replica_where_the_policy_would_rotate():
    router, registry, sessions, _, _ = fleet("round_robin")
    first = route(router).replica_id
    assert [route(router).replica_id for _ in range(5)] == [first] * 5
    assert sessions.routed == {"new": 1, "stuck": 5, "followed": 0, "moved_overloaded": 0, "moved_gone": 0}
    # other sessions and unkeyed requests are the policy's
    assert len({route(router, session=None).replica_id for _ in range(3)}) == 3
    assert len(sessions) == 1 and sessions.get("s1", 100.0).routed == 6


def test_an_overloaded_home_moves_the_session_and_the_new_home_is_remembered():
    router, registry, sessions, _, clock = fleet("round_robin", overload_min_requests=8)
    home = route(router).replica_id
    for u in URLS:
        report(registry, u, running=1)
    report(registry, home, running=9)  # 9 > 2 x mean (11/3) and >= 8
    b = route(router)
    assert b.replica_id != home and b.decision.outcome == "moved_overloaded" and b.decision.previous == home
    assert "overloaded" in b.decision.reason
    report(registry, home, running=0)  # recovered: the session stays where it went
    assert [route(router).replica_id for _ in range(3)] == [b.replica_id] * 3
    assert sessions.routed["moved_overloaded"] == 1 and sessions.routed["stuck"] == 3


def test_a_gone_home_moves_the_session_and_a_retry_does_too():
    router, registry, sessions, _, _ = fleet("round_robin")
    home = route(router).replica_id
    b = route(router, exclude=frozenset({home}))  # a retry after this replica failed the request
    assert b.replica_id != home and b.decision.outcome == "moved_gone"
    registry.remove(b.replica_id)
    c = route(router)
    assert c.replica_id not in (b.replica_id,) and c.decision.outcome == "moved_gone"
    assert route(router).replica_id == c.replica_id
    assert sessions.routed["moved_gone"] == 2


def test_every_other_replica_overloaded_keeps_the_session_home():
    router, registry, sessions, _, _ = fleet("round_robin")
    home = route(router).replica_id
    for u in URLS:
        report(registry, u, kv=0.99)  # all above the KV threshold: nowhere better to go
    b = route(router)
    assert b.replica_id == home and b.decision.outcome == "stuck" and "no other replica" in b.decision.reason


def test_an_unknown_session_finds_its_home_by_the_kv_events():
    """Another balancer routed the earlier turns: their blocks on r2 make it the home here too."""
    router, registry, sessions, index, _ = fleet("round_robin")
    turn1 = "system: be brief. user: tell me about paged attention. assistant: it pages KV. "
    hold(index, URLS[2], turn1)
    b = route(router, turn1 + "user: and prefix caching?")
    assert b.replica_id == URLS[2] and b.decision.outcome == "new" and "holds" in b.decision.reason


def test_a_prefix_shared_by_two_replicas_is_no_evidence_the_policy_places_the_session():
    router, registry, sessions, index, _ = fleet("least_request")
    prompt = "a shared system prompt. " * 4
    hold(index, URLS[1], prompt)
    hold(index, URLS[2], prompt)
    registry.on_sent(registry.get(URLS[0]), 0, 0)  # least_request would pick r1 or r2 anyway
    registry.on_sent(registry.get(URLS[1]), 0, 0)
    b = route(router, prompt + "question")
    assert b.replica_id == URLS[2] and "policy" in b.decision.reason


def test_a_stale_home_follows_the_session_to_the_replica_holding_more_of_it():
    """This balancer remembers r0; another moved the session to r1, whose events show its later turn."""
    router, registry, sessions, index, _ = fleet("round_robin")
    turns = "user: first question. assistant: first answer. "
    sessions.record(_decision(URLS[0]), 100.0)
    hold(index, URLS[0], turns)
    hold(index, URLS[1], turns + "user: second question. assistant: second answer. ")
    b = route(router, turns + "user: second question. assistant: second answer. user: third?")
    assert b.replica_id == URLS[1] and b.decision.outcome == "followed"
    assert sessions.get("s1", 100.0).replica_id == URLS[1]


def _decision(replica: str, key: str = "s1"):
    from balancer.sessions import SessionDecision

    return SessionDecision(replica, key, "new", None, "test")


# ------------------------------------------------------------------------------ the table
def test_ttl_expiry_release_and_the_size_bound():
    router, registry, sessions, _, clock = fleet("round_robin", ttl_s=10.0, max_sessions=2)
    route(router, session="a")
    clock.t += 6
    route(router, session="b")
    clock.t += 5  # a unused for 11 s: gone; b for 5 s: kept
    assert sessions.active(clock.t) == 1 and sessions.get("a", clock.t) is None
    assert sessions.ended["expired"] == 1
    assert route(router, session="a").decision.outcome == "new"
    route(router, session="c")  # a third session: the least recently used (b) goes
    assert sessions.ended["evicted"] == 1 and sessions.get("b", clock.t) is None
    assert [k for k, _ in sessions.homes(clock.t, 10)] == ["c", "a"]
    assert sessions.release("a").replica_id and sessions.release("a") is None
    assert sessions.ended["released"] == 1 and route(router, session="a").decision.outcome == "new"


def test_explain_records_nothing():
    router, registry, sessions, _, _ = fleet("round_robin")
    rr, _, d = router.choose(prepared(router, "hello " * 20), "explain")
    assert d.outcome == "new" and len(sessions) == 0 and sessions.routed["new"] == 0


# ------------------------------------------------------------------------------ overload
def test_the_overload_rule():
    s = Sessions(SessionConfig(overload_factor=2.0, overload_min_requests=4, overload_min_queued_tokens=1000,
                               overload_kv_usage=0.9))

    def v(rid, running=0, queued=0, kv=0.0, sent=0, inflight=0, reported=True):
        load = ReplicaLoad(num_running=running, queued_prefill_tokens=queued, kv_usage=kv,
                           age_s=0.0 if reported else float("inf"))
        return ReplicaView(rid, inflight_requests=inflight, sent_since_report=sent, load=load)

    assert s.overloaded([v("a", 3), v("b"), v("c")]) == set()  # 3 > 2 x 1 but under the minimum of 4
    assert s.overloaded([v("a", 4), v("b"), v("c")]) == {"a"}
    assert s.overloaded([v("a", 2, sent=2), v("b"), v("c")]) == {"a"}  # sends since the report count
    assert s.overloaded([v("a", 4), v("b", 4), v("c", 4)]) == set()  # evenly loaded: nobody is
    assert s.overloaded([v("a", queued=5000), v("b", queued=1000), v("c")]) == {"a"}
    assert s.overloaded([v("a", kv=0.95), v("b", kv=0.5)]) == {"a"}
    assert s.overloaded([v("a", inflight=6, reported=False), v("b", 1), v("c", 1)]) == {"a"}  # no report yet


# ------------------------------------------------------------------------------ the simulator
def test_the_simulator_keeps_chat_sessions_on_their_replicas():
    from collections import defaultdict

    from loadgen.generate import GenerateConfig, generate
    from replica.step_model import get_preset
    from simulator.fleet import FleetConfig, FleetSimulation
    from simulator.run import sim_requests

    trace = generate(GenerateConfig(kind="chat", num_requests=60, session_rate=2.0, tenants=2, seed=1))
    reqs = sorted(sim_requests(trace, 0), key=lambda r: r.arrival_s)
    homes = {}
    for on in (False, True):
        sim = FleetSimulation(FleetConfig(replicas=4, preset=get_preset("llama3-8b-h100"), policy="round_robin",
                                          sessions=SessionConfig(enabled=on)))
        res = sim.run(reqs)
        where = defaultdict(set)
        for rec, r in zip(sorted(res.records, key=lambda x: x.index), reqs):
            where[r.session].add(rec.replica)
        homes[on] = where
        if on:
            assert res.extra["sessions"]["stuck"] > res.extra["sessions"]["new"] > 0
    multi = [k for k, v in homes[False].items() if len(v) > 1]
    assert multi, "round robin spreads a session's turns"
    assert sum(len(v) for v in homes[True].values()) < sum(len(v) for v in homes[False].values())


def test_loadgen_sends_the_trace_session_as_the_user_field():
    import json

    from loadgen.client import LoadConfig, build_body
    from loadgen.traces import TraceRequest

    req = TraceRequest(arrival_s=0.0, input_length=20, output_length=4, session_id="t0-s3")
    assert "user" not in json.loads(build_body(req, 0, LoadConfig(model=MODEL)))
    body = json.loads(build_body(req, 0, LoadConfig(model=MODEL, session_user=True)))
    assert body["user"] == "t0-s3"
    assert Sessions(SessionConfig(enabled=True)).key_of({}.get, GenerationRequest(
        kind="completion", model=MODEL, prompt="x", user=body["user"])) == "t0-s3"


def test_a_session_placed_by_the_policy_keeps_the_warm_up_it_asks_for():
    """A new session is placed by the policy; a warm-up that decision asks for (predictive's
    `replicate`: Decision.warm) is booked with it, as for a request with no session. A request
    that stays home is the session rule's alone and warms nothing."""
    router, registry, sessions, _, _ = fleet("round_robin")

    def select(rr, views):  # a policy that places on the first view and warms the prompt's first block on the last
        return Decision(views[0].replica_id, "placed", warm=(views[-1].replica_id, 1))

    router.policy.select = select
    first = route(router, warmups=True)
    assert first.decision.outcome == "new" and first.decision.warm == (URLS[-1], 1)
    assert first.warm is not None and first.warm.booking.replica_id == URLS[-1]
    assert first.warm.booking.rr.warmup and first.warm.prepared.request.max_tokens == 1
    first.warm.booking.finish(1)
    again = route(router, warmups=True)
    assert again.decision.outcome == "stuck" and again.warm is None
    assert route(router, session="s2").warm is None  # a caller that sends no warm-ups gets none booked
