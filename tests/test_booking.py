"""The routing transaction: the proxy and the simulator book the same replicas for the same
request stream, and a booking's work is released exactly once whatever happens to the request.

The agreement test runs one request stream twice: through the real balancer in front of three
`--engine sim` replica subprocesses (KV events and load reports over ZMQ, HTTP in between), and
through `FleetSimulation` (the same engines on a virtual clock). Requests go one at a time and
the balancer's view is let to settle between them (the replicas idle, their events and a later
load report in), so both sides decide on the same index and load; then every booking must
match: replica, predicted cached tokens, in-flight work, and the cache hit the engine reported.
"""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from balancer import serving
from balancer.app import BALANCER, create_app
from balancer.config import BalancerConfig, HealthConfig, ReplicaSpec
from harness import procs
from harness.fleet import settle
from replica.step_model import get_preset
from simulator.fleet import MODEL, FleetConfig, FleetSimulation, SimRequest

BLOCKS = 48  # per replica: small enough that the stream evicts
OUT = 3


def request_stream(n: int = 36, seed: int = 3) -> list[list[int]]:
    """Prompts (byte-sized token ids) drawn from a few shared prefixes, some long enough to
    push others out of a 48-block cache."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(256) for _ in range(rng.choice((64, 160, 320)))] for _ in range(5)]
    out = []
    for _ in range(n):
        p = rng.choice(prefixes)[: rng.choice((48, 100, 400))]
        out.append(p + [rng.randrange(256) for _ in range(rng.randrange(5, 40))])
    return out


def record_bookings(router) -> list:
    """Every booking `router.route` makes from now on, in order."""
    bookings = []
    original = router.route

    def route(*a, **kw):
        booking = original(*a, **kw)
        bookings.append(booking)
        return booking

    router.route = route
    return bookings


def simulated(prompts: list[list[int]], policy: str) -> list[tuple]:
    sim = FleetSimulation(FleetConfig(replicas=3, preset=get_preset("llama3-8b-h100"), policy=policy,
                                      kv_blocks=BLOCKS, client_max_tokens=True))
    bookings = record_bookings(sim.router)
    reqs = [SimRequest(1000.0 * i, (lambda p=p: p), OUT, len(p)) for i, p in enumerate(prompts)]
    res = sim.run(reqs)
    ids = sorted(res.replica_ids)
    return [(ids.index(b.replica_id), b.matched_tokens, b.tokens, b.uncached_tokens, rec.cached_tokens)
            for b, rec in zip(bookings, res.records)]


async def live(prompts: list[list[int]], policy: str, urls: list[str]) -> list[tuple]:
    cfg = BalancerConfig(port=0, replicas=tuple(ReplicaSpec.parse(u) for u in urls), model=MODEL, policy=policy,
                         health=HealthConfig(interval_s=0.2, timeout_s=0.5))
    app = create_app(cfg)
    listening = await serving.start(app, "127.0.0.1", 0)
    b = app[BALANCER]
    bookings = record_bookings(b.router)
    rows = []
    try:
        async with aiohttp.ClientSession() as s:
            await settle(b, 0.0)
            ids = sorted(r.replica_id for r in b.registry)
            for p in prompts:
                async with s.post(listening.url + "/v1/completions",
                                  json={"model": MODEL, "prompt": p, "max_tokens": OUT, "ignore_eos": True}) as r:
                    body = await r.json()
                    assert r.status == 200, body
                done = asyncio.get_running_loop().time()
                await settle(b, done)
                booking = bookings[-1]
                rows.append((ids.index(booking.replica_id), booking.matched_tokens, booking.tokens,
                             booking.uncached_tokens, body["usage"]["prompt_tokens_details"]["cached_tokens"]))
    finally:
        await listening.close()
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["precise_prefix", "dynamo_kv"])
def test_proxy_and_simulator_make_the_same_bookings(policy):
    prompts = request_stream()
    expected = simulated(prompts, policy)
    assert len({row[0] for row in expected}) > 1 and any(row[1] for row in expected)  # the stream tests something
    reps = procs.start_all([["replica", "--engine", "sim", "--preset", "llama3-8b-h100", "--port", "0",
                             "--served-model-name", MODEL, "--num-blocks", str(BLOCKS), "--time-scale", "50",
                             "--kv-events-endpoint", "tcp://127.0.0.1:0", "--kv-events-replay-endpoint",
                             "tcp://127.0.0.1:0"]] * 3)
    try:
        got = asyncio.run(live(prompts, policy, [r.replica_arg for r in reps]))
    finally:
        for r in reps:
            r.stop()
    assert got == expected


def _router(policy_name: str = "least_request"):
    from balancer.approx_index import ApproxIndex
    from balancer.config import BreakerConfig
    from balancer.policies import make_policy
    from balancer.prefix_index import PrefixIndex
    from balancer.registry import Registry
    from balancer.router import Router
    from protocol.tokenizer import ByteTokenizer

    registry = Registry(BreakerConfig(), HealthConfig(), clock=lambda: 0.0)
    for port in (1, 2):
        registry.add(ReplicaSpec(url=f"http://r{port}:80"))
    policy = make_policy(policy_name)
    seen = []
    policy.on_complete = lambda rr, rid, ok: seen.append((rid, ok))
    router = Router(MODEL, 16, ByteTokenizer(), PrefixIndex(16, MODEL), ApproxIndex(clock=lambda: 0.0), policy, registry,
                    has_events=lambda rid: False, clock=lambda: 0.0)
    return router, registry, seen


def _request(prompt: str = "a shared prompt " * 8, max_tokens: int = 10):
    from protocol.openai_api import GenerationRequest

    return GenerationRequest(kind="completion", model=MODEL, prompt=prompt, max_tokens=max_tokens)


def test_booking_records_the_work_and_releases_it_once():
    router, registry, seen = _router()
    p = router.prepare(_request())
    booking = router.route(p, "r1")
    r = booking.replica
    assert (r.inflight_requests, r.inflight_tokens) == (1, len(p.token_ids) + 10)
    assert r.sent_since_report == 1 and r.sent_tokens_since_report == booking.uncached_tokens == len(p.token_ids)
    booking.finish(7)
    booking.finish(7)
    booking.fail()
    assert (r.inflight_requests, r.inflight_tokens) == (0, 0)
    assert seen == [(booking.replica_id, True)]


def test_failed_booking_is_released_and_reported_as_failed():
    router, registry, seen = _router()
    booking = router.route(router.prepare(_request()), "r1")
    booking.fail()
    booking.finish(3)
    assert all(r.inflight_requests == 0 and r.inflight_tokens == 0 for r in registry)
    assert seen == [(booking.replica_id, False)]


def test_route_excludes_and_records_the_approximate_index():
    router, registry, _ = _router("precise_prefix")
    p = router.prepare(_request())
    first = router.route(p, "a")
    # A replica without KV events: the approximate index now guesses it holds the prompt.
    assert router.approx.match(p.block_hashes, 0.0) == {first.replica_id: len(p.block_hashes)}
    assert router.route(p, "b").replica_id == first.replica_id
    other = router.route(p, "c", exclude=frozenset({first.replica_id}))
    assert other.replica_id != first.replica_id
    assert router.route(p, "d", exclude=frozenset(r.replica_id for r in registry)) is None


def test_choose_records_nothing():
    router, registry, seen = _router("precise_prefix")
    p = router.prepare(_request())
    rr, candidates, d = router.choose(p, "explain")
    assert len(candidates) == 2 and d.replica_id in {r.replica_id for r in registry}
    assert all(r.inflight_requests == 0 and r.sent_since_report == 0 for r in registry)
    assert router.approx.match(p.block_hashes, 0.0) == {} and seen == []


def test_n_samples_and_a_batch_count_their_decodes_and_prompts_in_the_booking():
    from protocol.openai_api import parse_for_routing

    router, registry, seen = _router()
    req = parse_for_routing({"model": MODEL, "prompt": ["a shared prompt " * 8, [1, 2, 3, 4, 5]], "n": 3,
                             "max_tokens": 10}, "completion")
    p = router.prepare(req)
    assert p.extra_prompt_tokens == 5  # the batch's second prompt, routed by the first
    booking = router.route(p, "r1")
    assert booking.rr.sequences == 6 and booking.rr.extra_prefill_tokens == 5
    assert booking.tokens == len(p.token_ids) + 5 + 10 * 6  # prefill once per prompt, decode n per prompt
    assert booking.uncached_tokens == len(p.token_ids) + 5
    booking.finish(None)
    assert all(r.inflight_tokens == 0 for r in registry)


def test_a_request_routed_by_load_counts_while_in_flight_and_the_policy_never_sees_it():
    router, registry, seen = _router()
    first = router.route_by_load(None, "e1")
    second = router.route_by_load(None, "e2")
    assert first.replica_id != second.replica_id  # fewest in flight: an idle fleet takes turns
    assert first.replica.inflight_requests == 1
    first.finish(None)
    second.fail()
    assert all(r.inflight_requests == 0 for r in registry) and seen == []


def test_each_model_goes_to_the_replicas_that_serve_it_and_the_list_follows_health():
    router, registry, _ = _router()
    a, b = list(registry)
    registry.set_models(a, frozenset({"m-a"}))
    assert registry.served_models() == ["m-a"]
    registry.set_models(b, frozenset({"m-b", "m-a"}))
    assert registry.served_models() == ["m-a", "m-b"]
    assert [r.replica_id for r in registry.usable(model="m-b")] == [b.replica_id]
    assert len(registry.usable(model="m-a")) == 2 and registry.usable(model="m-z") == []
    for _ in range(registry.health_cfg.unhealthy_after):
        registry.record_poll(b, ok=False)
    assert registry.served_models() == ["m-a"]  # b is down: m-b is served by nobody now
    registry.drain(a.replica_id)
    assert registry.served_models() == []
    registry.undrain(a.replica_id)
    assert registry.served_models() == ["m-a"]


def test_routing_request_carries_each_replicas_lower_tier_hit():
    """The router hands policies the device prefix and, beside it, the blocks after it that a
    replica holds in host memory (events with medium CPU), as PrefixIndex reports them."""
    from protocol.events import BlockRemoved, BlockStored
    from protocol.hashing import hash_blocks, root_hash

    router, registry, _ = _router("predictive")
    p = router.prepare(_request("tiered prompt " * 12))
    hashes = list(p.block_hashes)
    tokens = list(p.token_ids[: len(hashes) * 16])
    assert hashes == hash_blocks(tokens, 16, root_hash(MODEL))
    url = "http://r1:80"
    router.index.apply(url, BlockStored(tuple(hashes), None, tuple(tokens), 16))
    router.index.apply(url, BlockStored(tuple(hashes[2:]), hashes[1], tuple(tokens[32:]), 16, medium="CPU"))
    router.index.apply(url, BlockRemoved(tuple(hashes[2:])))  # evicted from the GPU, kept on the host
    rr, _, decision = router.choose(p, "q1")
    assert rr.matched_blocks == {url: 2} and rr.offloaded_blocks == {url: len(hashes) - 2}
    assert decision.scores[url]["loaded_tokens"] == (len(hashes) - 2) * 16


def _warming(policy, blocks: int):
    """`policy`'s select, asking for a warm-up of the prompt's first `blocks` blocks on a replica
    other than the chosen one (what predictive's `replicate` decides under decode load)."""
    from balancer.policies.base import Decision

    select = policy.select

    def warm_select(rr, views):
        d = select(rr, views)
        other = next(v.replica_id for v in views if v.replica_id != d.replica_id)
        return Decision(d.replica_id, d.reason, d.scores, warm=(other, blocks))

    policy.select = warm_select


def test_a_warm_up_is_booked_on_its_replica_and_released_once():
    router, registry, seen = _router()
    _warming(router.policy, 2)
    p = router.prepare(_request())
    unsent = router.route(p, "r0")  # a caller that sends no warm-ups (the picker, failover)
    assert unsent.warm is None and sum(r.inflight_requests for r in registry) == 1
    unsent.finish(3)
    seen.clear()
    booking = router.route(p, "r1", warmups=True)
    warm = booking.warm
    assert warm is not None and warm.booking.replica_id != booking.replica_id
    assert warm.prepared.token_ids == p.token_ids[:32] and warm.prepared.request.model == MODEL
    assert warm.prepared.request.max_tokens == 1 and warm.booking.rr.warmup
    w = warm.booking.replica
    assert (w.inflight_requests, w.inflight_tokens) == (1, 33)
    assert w.sent_tokens_since_report == 32
    warm.booking.finish(1)
    warm.booking.finish(1)
    assert (w.inflight_requests, w.inflight_tokens) == (0, 0)
    assert seen == [(w.replica_id, True)]
    booking.finish(3)
    assert all(r.inflight_requests == 0 for r in registry)
    # choose (explain, the agreement check) books nothing, warm-ups included
    sent = [r.sent_since_report for r in registry]
    router.choose(p, "explain")
    assert all(r.inflight_requests == 0 for r in registry) and [r.sent_since_report for r in registry] == sent


@pytest.mark.slow
def test_a_warm_up_computes_the_prefix_on_the_other_replica_live():
    """Through the real balancer and two `--engine sim` replica subprocesses: the request is
    answered by its replica, the warm-up makes the other replica cache the prefix (its KV events
    reach the index), the warm-up is counted, and nothing stays booked."""
    reps = [procs.start(["replica", "--engine", "sim", "--preset", "llama3-8b-h100", "--port", "0",
                         "--served-model-name", MODEL, "--num-blocks", "64", "--time-scale", "50",
                         "--kv-events-endpoint", "tcp://127.0.0.1:0", "--kv-events-replay-endpoint",
                         "tcp://127.0.0.1:0"]) for _ in range(2)]

    async def run():
        cfg = BalancerConfig(port=0, replicas=tuple(ReplicaSpec.parse(r.replica_arg) for r in reps), model=MODEL,
                             policy="predictive", health=HealthConfig(interval_s=0.2, timeout_s=0.5))
        app = create_app(cfg)
        listening = await serving.start(app, "127.0.0.1", 0)
        b = app[BALANCER]
        try:
            await settle(b, 0.0)
            _warming(b.router.policy, 4)
            bookings = record_bookings(b.router)
            prompt = [random.Random(5).randrange(256) for _ in range(100)]
            async with aiohttp.ClientSession() as s:
                async with s.post(listening.url + "/v1/completions",
                                  json={"model": MODEL, "prompt": prompt, "max_tokens": OUT}) as r:
                    assert r.status == 200, await r.text()
            booking = bookings[0]
            warm_replica = booking.warm.booking.replica_id
            assert warm_replica != booking.replica_id
            loop = asyncio.get_running_loop()
            await settle(b, loop.time())
            matched = b.index.match(booking.rr.block_hashes)
            assert matched.get(warm_replica, 0) == 4  # the warm-up's 4 blocks, no more
            assert matched.get(booking.replica_id, 0) >= 4
            ok = b.metrics.warmups.labels("ok")._value.get()
            assert ok == 1
        finally:
            await listening.close()

    try:
        asyncio.run(run())
    finally:
        for r in reps:
            r.stop()
