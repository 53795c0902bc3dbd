"""Compact cache digests (issue #17 part 2): the filter (no false negatives, false positives
within the bound, bounded size), the wire codec, the block pool's choice under a size bound,
the publisher and the digest feed over real ZMQ sockets, and the router reading digests."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import zmq
import zmq.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.approx_index import ApproxIndex
from balancer.config import BalancerConfig, BreakerConfig, HealthConfig, ReplicaSpec
from balancer.digest_feed import DigestFeed, DigestFeedConfig
from balancer.digest_index import DigestIndex
from balancer.policies import make_policy
from balancer.prefix_index import PrefixIndex
from balancer.registry import Registry
from balancer.router import Router
from protocol.digest import (
    DEFAULT_DIGEST_TOPIC,
    DIGEST_REQUEST,
    FILTER_KINDS,
    BlockFilter,
    CacheDigest,
    bytes_per_block,
    decode_digest,
    filter_bytes,
    encode_digest,
    max_blocks_for,
)
from protocol.events import EventDecodeError, pack, unpack
from protocol.hashing import hash_blocks, root_hash
from protocol.load import DEFAULT_LOAD_TOPIC, LoadReport, encode_extras_message, encode_load
from protocol.openai_api import GenerationRequest
from protocol.tokenizer import ByteTokenizer
from replica.kv_cache_manager import KVCacheManager
from replica.publisher import KVEventPublisher, PublisherConfig

U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
KINDS = sorted(FILTER_KINDS)
# The filters' published false-positive rates (Graf & Lemire 2022): 2**-8 and 2**-16.
FP_RATE = {"binary_fuse8": 2 ** -8, "binary_fuse16": 2 ** -16}


def _keys(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << 64, size=n, dtype=np.uint64, endpoint=False)


# --- the filter ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=60, deadline=None)
@given(keys=st.lists(U64, max_size=300))
def test_no_false_negatives_before_and_after_the_wire(kind, keys):
    f = BlockFilter.build(kind, keys)
    g = BlockFilter.from_bytes(f.kind_on_wire, f.num_keys, f.to_bytes())
    assert f.num_keys == len(set(keys)) == g.num_keys
    assert all(k in f and k in g for k in keys)
    assert g.prefix_len(keys) == len(keys)  # every key held: the whole chain is a prefix


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None)
@given(held=st.lists(U64, min_size=1, max_size=50, unique=True), tail=st.lists(U64, max_size=20))
def test_prefix_len_stops_at_the_first_block_the_filter_rejects(kind, held, tail):
    f = BlockFilter.build(kind, held)
    chain = held + tail
    n = f.prefix_len(chain)
    assert n >= len(held)
    assert all(h in f for h in chain[:n]) and (n == len(chain) or chain[n] not in f)


@pytest.mark.parametrize("kind", KINDS)
def test_false_positive_rate_within_the_bound(kind):
    f = BlockFilter.build(kind, _keys(100_000, seed=1))
    probes = _keys(400_000, seed=2).tolist()  # 2**-64 chance that a probe is a key
    rate = sum(p in f for p in probes) / len(probes)
    # 3 sigma above the published rate, and a floor of 8 hits for the 16-bit filter's tiny rate
    bound = FP_RATE[kind] + 3 * (FP_RATE[kind] / len(probes)) ** 0.5 + 8 / len(probes)
    assert rate <= bound, (kind, rate, bound)
    assert rate > 0 or kind == "binary_fuse16"  # a filter, not a set: it does err


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4099, 50_000, 300_001])
def test_the_size_bound_holds_and_is_tight(kind, n):
    size = len(BlockFilter.build(kind, _keys(n, seed=n)).to_bytes())
    assert size <= filter_bytes(kind, n) <= size * 1.1 + 64, (size, filter_bytes(kind, n))


def test_bytes_per_block_at_a_million():
    assert 1.12 < bytes_per_block("binary_fuse8") < 1.14 and 2.24 < bytes_per_block("binary_fuse16") < 2.28


def test_empty_filter_holds_nothing_and_travels_as_nothing():
    f = BlockFilter.build("binary_fuse8", [])
    assert f.kind_on_wire == "empty" and f.to_bytes() == b"" and 0 not in f and f.prefix_len([1, 2]) == 0
    with pytest.raises(ValueError, match="unknown digest filter"):
        BlockFilter.build("bloom", [1])


# --- the codec ----------------------------------------------------------------------------------

def _digest(n: int = 500, kind: str = "binary_fuse8", **kw) -> CacheDigest:
    keys = _keys(n, seed=7)
    kw = {"ts": 1234.5, "epoch": 99, "kv_seq": 41, "block_size": 16, "num_blocks": n, **kw}
    return CacheDigest(filter=BlockFilter.build(kind, keys), **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_codec_round_trip(kind):
    d = _digest(kind=kind)
    back = decode_digest(encode_digest(d))
    assert (back.ts, back.epoch, back.kv_seq, back.block_size, back.num_blocks) == (1234.5, 99, 41, 16, 500)
    assert back.filter.kind == kind and back.filter.num_keys == 500
    assert all(k in back.filter for k in _keys(500, seed=7).tolist())
    empty = decode_digest(encode_digest(_digest(n=0, kv_seq=None)))
    assert empty.kv_seq is None and empty.num_blocks == 0 and empty.filter.prefix_len([5]) == 0


def test_decoder_ignores_unknown_keys_and_refuses_bad_fields():
    raw = dict(unpack(encode_digest(_digest())))
    assert decode_digest(pack({**raw, "added_in_v2": [1, 2]})).num_blocks == 500
    bad = {
        "kind": "load", "ts": "now", "epoch": -1, "block_size": 0, "num_keys": None, "filter": "bloom",
        "data": raw["data"][:-10],
    }
    for key, value in bad.items():
        with pytest.raises(EventDecodeError):
            decode_digest(pack({**raw, key: value}))
    with pytest.raises(EventDecodeError):
        decode_digest(pack({**raw, "filter": "empty"}))  # an empty digest with data
    with pytest.raises(EventDecodeError):
        decode_digest(pack([1, 2, 3]))


def test_max_blocks_keeps_the_encoded_digest_under_max_bytes():
    for kind in KINDS:
        for max_bytes in (4096, 100_000):
            n = max_blocks_for(kind, max_bytes)
            assert n > 0 and len(encode_digest(_digest(n=n, kind=kind))) <= max_bytes


# --- the replica side ---------------------------------------------------------------------------

def test_block_pool_digests_everything_that_fits_and_else_what_it_keeps_longest():
    mgr = KVCacheManager(num_blocks=8, block_size=4, hash_root=root_hash("m"))
    a, b = list(range(1, 13)), list(range(100, 112))  # 3 full blocks each
    for rid, toks in (("a", a), ("b", b)):
        hit = mgr.get_computed_blocks(rid, toks)
        assert mgr.allocate_slots(rid, toks, hit.num_tokens, len(toks) - hit.num_tokens, hit)
    mgr.free("a")  # a's blocks go to the free list (tail first); b stays in use
    ha, hb = hash_blocks(a, 4, root_hash("m")), hash_blocks(b, 4, root_hash("m"))
    assert sorted(mgr.digest_hashes(100)) == sorted(list(ha) + list(hb))
    # 4 of 6: b's three in-use blocks, then a's most recently freed block (its head: freed last)
    assert mgr.digest_hashes(4) == list(hb) + [ha[0]]


def _pub(**kw) -> KVEventPublisher:
    return KVEventPublisher(PublisherConfig(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0",
                                            bind=True, **kw))


def test_publisher_config_rejects_bad_digest_settings():
    for kw in ({"digest_interval_s": -1}, {"digest_filter": "bloom"}, {"digest_max_bytes": 100},
               {"digest_topic": b"kvfleet.load"}, {"digest_topic": b""}):
        with pytest.raises(ValueError):
            PublisherConfig(**kw)


def test_publisher_answers_a_digest_request_and_publishes_it():
    pub = _pub(digest_interval_s=0)  # only on request
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    dealer = ctx.socket(zmq.DEALER)
    try:
        sub.connect(pub.endpoints.endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, b"kvfleet.digest")
        dealer.connect(pub.endpoints.replay_endpoint)
        time.sleep(0.2)  # the SUB's subscription reaches the PUB
        assert not pub.digest_due()
        pub.publish([])  # nothing
        dealer.send_multipart([b"", DIGEST_REQUEST])
        deadline = time.monotonic() + 10
        while not pub.digest_due():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        keys = _keys(300, seed=3).tolist()
        pub.publish_digest(keys, num_blocks=300, block_size=16)
        assert not pub.digest_due()
        assert dealer.poll(10_000) and sub.poll(10_000)
        empty, topic, seq, payload = dealer.recv_multipart()
        frames = sub.recv_multipart()
        assert (empty, topic, int.from_bytes(seq, "big")) == (b"", b"kvfleet.digest", 0)
        assert frames == encode_extras_message(b"kvfleet.digest", 0, payload)
        d = decode_digest(payload)
        assert d.epoch == pub.epoch and d.kv_seq is None and d.num_blocks == 300
        assert all(k in d.filter for k in keys)
        while pub.digests_sent == 0:  # counted by the publisher's thread just after sending
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert pub.digests_sent == 1 and pub.last_digest_bytes == len(payload)
        assert pub.sources_info()["sources"][0]["digest_topic"] == "kvfleet.digest"
    finally:
        sub.close(linger=0)
        dealer.close(linger=0)
        ctx.term()
        pub.close()


def test_publisher_publishes_periodically():
    pub = _pub(digest_interval_s=0.05)
    try:
        assert not pub.digest_due()  # the first one after one interval
        time.sleep(0.06)
        assert pub.digest_due()
        pub.publish_digest([1, 2, 3], 3, 16)
        assert not pub.digest_due()
    finally:
        pub.close()


# --- the balancer side --------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_digest_index_ages_refuses_other_block_sizes_and_overlays():
    clock = Clock()
    idx = DigestIndex(16, max_age_s=10, clock=clock)
    chain = _keys(6, seed=5).tolist()
    assert idx.update("a", _digest_of(chain[:4]))
    assert not idx.update("b", _digest_of(chain, block_size=32)) and idx.stats.refused == 1
    assert idx.match(chain) == {"a": 4} and idx.num_blocks("a") == 4
    matched = {"a": 6, "c": 2}
    idx.overlay(matched, chain, lambda rid: True)
    assert matched == {"a": 4, "c": 2}
    idx.update("c", _digest_of([]))
    idx.overlay(matched, chain, lambda rid: rid == "c")
    assert matched == {"a": 4}  # c's digest says none: c drops out
    clock.t += 11  # stale: no longer used, nor its block count
    assert idx.match(chain) == {} and idx.num_blocks("a") == 0 and idx.age_s("a") == 11
    idx.remove_replica("a")
    assert idx.latest("a") is None and idx.age_s("a") is None


def _digest_of(hashes, block_size: int = 16) -> CacheDigest:
    return CacheDigest(ts=time.time(), epoch=1, kv_seq=0, block_size=block_size, num_blocks=len(hashes),
                       filter=BlockFilter.build("binary_fuse8", hashes))


def test_router_reads_digests_for_the_replicas_that_use_them():
    clock = Clock()
    registry = Registry(BreakerConfig(), HealthConfig(), clock)
    urls = ["http://a:1", "http://b:1"]
    for u in urls:
        registry.add(ReplicaSpec(url=u))
    index, digests = PrefixIndex(16, "m"), DigestIndex(16, 30, clock)
    uses = {"http://a:1"}
    router = Router("m", 16, ByteTokenizer(), index, ApproxIndex(clock=clock), make_policy("precise_prefix", {}),
                    registry, has_events=lambda rid: True, clock=clock, digests=digests, uses_digest=uses.__contains__)
    tokens = list(range(1, 16 * 8 + 1))
    p = router.prepare_tokens(GenerationRequest(kind="completion", model="m", prompt_token_ids=None), tokens, "")
    assert p.block_hashes == tuple(hash_blocks(tokens, 16, root_hash("m")))
    digests.update("http://a:1", _digest_of(p.block_hashes[:5]))
    digests.update("http://b:1", _digest_of(p.block_hashes))  # b routes from events: ignored
    rr = router.routing_request(p, "r1")
    assert rr.matched_blocks == {"http://a:1": 5}
    assert router.route(p, "r1").replica_id == "http://a:1"
    assert router._cached_blocks("http://a:1") == 5 and router._cached_blocks("http://b:1") == 0


def test_balancer_config_index_source():
    assert BalancerConfig().index_source == "events"
    cfg = BalancerConfig.from_dict({"index_source": "digests", "digest_max_age_s": 12})
    assert (cfg.index_source, cfg.digest_max_age_s) == ("digests", 12)
    with pytest.raises(ValueError, match="index_source must be one of"):
        BalancerConfig(index_source="bloom")
    with pytest.raises(ValueError, match="positive"):
        BalancerConfig(digest_max_age_s=0)


def test_cli_flags_reach_the_configs():
    import argparse

    from kvfleet import cmd_balancer, cmd_replica

    p = argparse.ArgumentParser()
    cmd_balancer.add_arguments(p)
    cfg = cmd_balancer.build_config(p.parse_args(["--replica", "http://h:1", "--index-source", "both",
                                                  "--digest-max-age", "7"]))
    assert (cfg.index_source, cfg.digest_max_age_s) == ("both", 7)
    p = argparse.ArgumentParser()
    cmd_replica.add_arguments(p)
    rc = cmd_replica.replica_config(p.parse_args(["--kv-events-endpoint", "tcp://127.0.0.1:0", "--kv-digest-interval",
                                                  "2", "--kv-digest-filter", "binary_fuse16"]))
    assert (rc.publisher.digest_interval_s, rc.publisher.digest_filter) == (2, "binary_fuse16")


def test_feed_learns_digests_and_stops_asking_a_router_that_serves_none():
    """Against a kvfleet publisher the feed asks at start and gets a digest; against a ROUTER
    that answers every request with the replay end marker (vLLM) it stops asking."""

    async def main():
        ctx = zmq.asyncio.Context()
        pub = _pub(digest_interval_s=0)
        vllm = ctx.socket(zmq.ROUTER)
        vllm.linger = 0
        vllm.bind("tcp://127.0.0.1:0")
        idx = DigestIndex(16, 30, time.monotonic)
        feeds = [DigestFeed(DigestFeedConfig("k", pub.endpoints.endpoint, pub.endpoints.replay_endpoint,
                                             request_timeout_s=5), idx, context=ctx),
                 DigestFeed(DigestFeedConfig("v", pub.endpoints.endpoint, vllm.getsockopt_string(zmq.LAST_ENDPOINT),
                                             request_timeout_s=0.05), idx, context=ctx)]
        try:
            for f in feeds:
                f.start()
            client, _, body = await asyncio.wait_for(vllm.recv_multipart(), 10)
            assert body == DIGEST_REQUEST
            await vllm.send_multipart([client, b"", b"\xff" * 8, b""])
            deadline = time.monotonic() + 10
            while not (feeds[1].stats.supported is False and pub.digest_due()):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            pub.publish_digest([11, 12], 2, 16)
            while idx.latest("k") is None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            asked = feeds[1].stats.requests
            await asyncio.sleep(0.3)  # six request timeouts: no more requests to the vLLM router
            assert feeds[1].stats.requests == asked == 1
            assert idx.latest("k").filter.prefix_len([11, 12, 13]) >= 2 and feeds[0].stats.supported
        finally:
            await asyncio.gather(*(f.stop() for f in feeds))
            vllm.close(linger=0)
            pub.close()
            ctx.term()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_feed_counts_payloads_that_do_not_decode_and_passes_good_load_reports_on():
    """A digest or load report that does not decode is counted and skipped (the feed goes on);
    a good load report reaches `on_load`. Real PUB socket; frames re-sent until the SUB joins."""

    async def main():
        ctx = zmq.asyncio.Context()
        pub = ctx.socket(zmq.PUB)
        pub.linger = 0
        pub.bind("tcp://127.0.0.1:0")
        idx, loads = DigestIndex(16, 30, time.monotonic), []
        feed = DigestFeed(DigestFeedConfig("r", pub.getsockopt_string(zmq.LAST_ENDPOINT)), idx, loads.append,
                          context=ctx)
        feed.start()
        deadline = time.monotonic() + 10
        try:
            while feed.stats.decode_errors == 0:  # the slow joiner: publish until the feed reads one
                assert time.monotonic() < deadline
                await pub.send_multipart(encode_extras_message(DEFAULT_DIGEST_TOPIC, 0, b"not msgpack \xc1"))
                await asyncio.sleep(0.02)
            errors = feed.stats.decode_errors
            await pub.send_multipart(encode_extras_message(DEFAULT_LOAD_TOPIC, 0, pack({"kind": "load"})))
            good = LoadReport("r", time.time(), 2, 1, 100, 50, 3, 48, 16, 0.9)
            await pub.send_multipart(encode_extras_message(DEFAULT_LOAD_TOPIC, 1, encode_load(good)))
            while not loads:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert loads == [good] and feed.stats.decode_errors == errors + 1
            assert idx.latest("r") is None and feed.stats.received == 0
        finally:
            await feed.stop()
            pub.close(linger=0)
            ctx.term()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_simulate_command_runs_the_policies_on_digests(tmp_path, capsys):
    import argparse
    import json

    from kvfleet import cmd_simulate
    from loadgen.traces import TraceRequest, write_mooncake

    trace = tmp_path / "t.jsonl"
    write_mooncake(trace, [TraceRequest(arrival_s=0.2 * i, input_length=1000, output_length=4, hash_ids=(1, 2),
                                        hash_block_tokens=512) for i in range(12)])
    p = argparse.ArgumentParser()
    cmd_simulate.add_arguments(p)
    args = p.parse_args(["--trace", str(trace), "--replicas", "2", "--kv-blocks", "2000", "--policies",
                         "precise_prefix", "--predictor", "none", "--index-source", "digests", "--digest-interval",
                         "0.5", "--out", str(tmp_path / "out")])
    assert cmd_simulate.run(args) == 0
    assert "cache digest (binary_fuse8) every 0.5 s" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "simulate.json").read_text())["config"]
    assert (config["index_source"], config["digest_interval_s"]) == ("digests", 0.5)
