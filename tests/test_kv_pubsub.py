"""KV events over real ZMQ sockets on loopback: KVEventPublisher -> ReplicaEventSubscriber ->
PrefixIndex. Every test ends with the index equal to the publisher side's truth (the block
pool's cached hashes), whatever was lost, restarted or joined late on the way."""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
import time
from collections.abc import Callable

import msgpack
import pytest
import zmq
import zmq.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.kv_subscriber import ReplicaEventSubscriber, SubscriberConfig
from balancer.policies import make_policy
from balancer.policies.base import ReplicaView, RoutingRequest
from balancer.prefix_index import PrefixIndex
from protocol.events import AllBlocksCleared, BlockStored, encode_seq
from protocol.hashing import hash_blocks, prompt_hashes, root_hash
from protocol.load import LoadReport
from replica.kv_cache_manager import KVCacheManager
from replica.kv_offload import tier_specs
from replica.publisher import KVEventPublisher, PublisherConfig

BS = 4
MODEL = "tiny-model"
ROOT = root_hash(MODEL)
WAIT_S = 20.0  # an upper bound so a broken build fails instead of hanging; never asserted on


def pub_config(**kw) -> PublisherConfig:
    kw.setdefault("endpoint", "tcp://127.0.0.1:0")
    kw.setdefault("replay_endpoint", "tcp://127.0.0.1:0")
    return PublisherConfig(bind=True, **kw)


def sub_config(pub: KVEventPublisher, replica_id: str = "r0", **kw) -> SubscriberConfig:
    kw.setdefault("replay_timeout_s", 2.0)
    kw.setdefault("snapshot_timeout_s", 5.0)
    kw.setdefault("resync_interval_s", 0.05)
    kw.setdefault("replay_endpoint", pub.endpoints.replay_endpoint)
    return SubscriberConfig(replica_id, pub.endpoints.endpoint, topic=pub.config.topic, **kw)


async def wait_for(cond: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for: {what}")
        await asyncio.sleep(0.002)


class Engine:
    """A replica engine in miniature: a real KVCacheManager under a random workload of requests
    with shared prefixes, publishing its events once per step as the engine loop does."""

    def __init__(self, pub: KVEventPublisher, seed: int, num_blocks: int = 48) -> None:
        self.pub = pub
        self.mgr = KVCacheManager(num_blocks, BS, ROOT)
        self.rng = random.Random(seed)
        self.families = [[self.rng.randrange(1, 50_000) for _ in range(40)] for _ in range(3)]
        self.live: dict[str, list[int]] = {}
        self.n = 0
        self.batches = 0

    def step(self) -> None:
        rng, mgr = self.rng, self.mgr
        r = rng.random()
        if r < 0.45 or not self.live:
            self.n += 1
            rid = f"q{self.n}"
            fam = self.families[rng.randrange(3)]
            tokens = fam[: rng.randrange(0, 40)] + [rng.randrange(1, 50_000) for _ in range(rng.randrange(1, 24))]
            hit = mgr.get_computed_blocks(rid, tokens)
            if mgr.allocate_slots(rid, tokens, hit.num_tokens, len(tokens) - hit.num_tokens, hit):
                self.live[rid] = tokens
            else:
                mgr.free(rid)
        elif r < 0.8:
            rid = rng.choice(sorted(self.live))
            tokens = self.live[rid]
            for _ in range(rng.randrange(1, 9)):
                tokens.append(rng.randrange(1, 50_000))
                if not mgr.allocate_slots(rid, tokens, len(tokens) - 1, 1):
                    mgr.free(rid)  # preempted
                    del self.live[rid]
                    break
        else:
            rid = rng.choice(sorted(self.live))
            del self.live[rid]
            mgr.free(rid)
        if not self.live and rng.random() < 0.1:
            mgr.reset_prefix_cache()
        self.publish()

    def publish(self) -> None:
        events = self.mgr.take_events()
        if events:
            self.batches += 1
        self.pub.publish(events)

    def run_batches(self, k: int) -> None:
        target = self.batches + k
        while self.batches < target:
            self.step()

    def serve_snapshots(self) -> None:
        if self.pub.snapshot_requested():
            self.pub.publish_snapshot(self.mgr.snapshot_events())

    def truth(self) -> set[int]:
        return set(self.mgr.pool.cached_blocks())


async def serve_snapshots_forever(get_engine: Callable[[], Engine]) -> None:
    """The engine loop's between-steps duty, while the test itself is not stepping."""
    while True:
        get_engine().serve_snapshots()
        await asyncio.sleep(0.002)


class Harness:
    """One publisher + engine, an index, subscribers, and the snapshot-serving task."""

    def __init__(self, **pub_kw) -> None:
        self.pub = KVEventPublisher(pub_config(**pub_kw))
        self.engine = Engine(self.pub, seed=1)
        self.index = PrefixIndex(BS, MODEL)
        self.subs: list[ReplicaEventSubscriber] = []
        self.loads: list[LoadReport] = []
        self._server: asyncio.Task | None = None

    def subscribe(self, replica_id: str = "r0", **kw) -> ReplicaEventSubscriber:
        sub = ReplicaEventSubscriber(sub_config(self.pub, replica_id, **kw), self.index, self.loads.append)
        sub.start()
        self.subs.append(sub)
        if self._server is None:
            self._server = asyncio.get_running_loop().create_task(serve_snapshots_forever(lambda: self.engine))
        return sub

    def view(self, sub: ReplicaEventSubscriber) -> set[int]:
        return self.index.replica_block_hashes(sub.config.replica_id)

    async def converged(self, sub: ReplicaEventSubscriber) -> None:
        await wait_for(
            lambda: sub.in_sync and sub.last_seq == self.pub.last_seq and self.view(sub) == self.engine.truth(),
            f"{sub.config.replica_id} in sync with the publisher (stats {sub.stats})",
        )
        self.index.check_integrity()

    async def close(self) -> None:
        for sub in self.subs:
            await sub.stop()
        if self._server is not None:
            self._server.cancel()
            await asyncio.gather(self._server, return_exceptions=True)
        self.pub.close()


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


# --- the happy path -----------------------------------------------------------------------------


def test_index_equals_what_was_published_and_load_reports_arrive() -> None:
    async def main() -> None:
        h = Harness()
        try:
            sub = h.subscribe()
            await wait_for(lambda: sub.in_sync, "startup snapshot")
            for _ in range(10):
                h.engine.run_batches(20)
                await asyncio.sleep(0)
            h.pub.publish_load(LoadReport("r0", time.time(), 2, 1, 100, 50, 3, 48, BS, 0.9))
            await h.converged(sub)
            await wait_for(lambda: h.loads, "a load report")
            assert h.loads[0].epoch == h.pub.epoch == sub.epoch and h.loads[0].num_running == 2
            s = sub.stats
            assert s.snapshots == 1 and s.resyncs == {"startup": 1}
            assert s.decode_errors == s.unknown_events == s.replay_failures == 0
            assert s.foreign_messages == 0 and h.index.stats.unknown_parent == 0
            # What the balancer computes for a cached prompt finds this replica.
            some = next(iter(h.engine.live.values()), None)
            if some is not None:
                chain = prompt_hashes(some, BS, MODEL)
                cached = h.engine.truth()
                k = 0
                while k < len(chain) and chain[k] in cached:
                    k += 1
                assert h.index.match(chain).get("r0", 0) == k
        finally:
            await h.close()

    run(main())


# --- losses -------------------------------------------------------------------------------------


def test_a_lost_message_is_repaired_by_replay() -> None:
    async def main() -> None:
        h = Harness(drop_seqs=frozenset({6, 11}))
        try:
            sub = h.subscribe()
            await wait_for(lambda: sub.in_sync, "startup snapshot")
            h.engine.run_batches(3)
            await wait_for(lambda: sub.last_seq == 2, "first batches applied")  # SUB connected
            for _ in range(12):  # one at a time, so that each loss is its own gap
                h.engine.run_batches(1)
                seq = h.engine.batches - 1
                if seq not in h.pub.config.drop_seqs:
                    await wait_for(lambda seq=seq: sub.last_seq == seq, f"batch {seq} applied")
            await h.converged(sub)
            s = sub.stats
            assert s.gaps >= 2 and s.replays >= 2
            assert s.replay_failures == 0 and s.snapshots == 1 and s.resyncs == {"startup": 1}
        finally:
            await h.close()

    run(main())


def test_replay_that_cannot_cover_the_gap_falls_back_to_a_snapshot() -> None:
    async def main() -> None:
        h = Harness(buffer_steps=3, drop_seqs=frozenset(range(4, 10)))
        try:
            sub = h.subscribe()
            await wait_for(lambda: sub.in_sync, "startup snapshot")
            h.engine.run_batches(4)
            await wait_for(lambda: sub.last_seq == 3, "first batches applied")
            h.engine.run_batches(10)  # 4..9 lost; the replay buffer keeps only 3 batches
            await h.converged(sub)
            s = sub.stats
            assert s.replay_failures >= 1 and s.resyncs.get("replay_incomplete", 0) >= 1
            assert s.snapshots >= 2
        finally:
            await h.close()

    run(main())


def test_without_a_replay_endpoint_a_gap_drops_the_replica_and_relearns() -> None:
    async def main() -> None:
        h = Harness(drop_seqs=frozenset({200}))
        try:
            sub = h.subscribe(replay_endpoint=None)
            while sub.last_seq is None:  # until the SUB socket is connected
                h.engine.run_batches(1)
                await asyncio.sleep(0.005)
            h.engine.run_batches(210 - h.engine.batches)
            await wait_for(lambda: sub.last_seq == h.pub.last_seq == 209, "caught up")
            assert sub.stats.gaps == 1 and sub.stats.resyncs == {"gap_no_replay": 1}
            assert not sub.exact and h.view(sub) <= h.engine.truth()  # a subset: never a false hit
            h.index.check_integrity()
        finally:
            await h.close()

    run(main())


def test_unanswered_snapshot_requests_back_off_and_retry() -> None:
    async def main() -> None:
        h = Harness()
        serving = False
        real_engine = h.engine

        class Silent:  # an engine loop that does not serve snapshots yet
            def serve_snapshots(self) -> None:
                if serving:
                    real_engine.serve_snapshots()

        h.engine = Silent()  # type: ignore[assignment]
        try:
            real_engine.run_batches(10)  # before the subscriber: only a snapshot can bring them
            await wait_for(lambda: h.pub.last_seq == 9, "batches sent")
            sub = h.subscribe(snapshot_timeout_s=0.2)
            await wait_for(lambda: sub.stats.snapshot_timeouts >= 1, "a snapshot timeout")
            assert not sub.exact and sub._mode == "live"
            serving = True
            h.engine = real_engine
            real_engine.run_batches(5)
            await h.converged(sub)
            assert sub.stats.resyncs.get("snapshot_retry", 0) >= 1 and sub.stats.snapshots == 1
        finally:
            h.engine = real_engine
            await h.close()

    run(main())


# --- restarts and late joiners ------------------------------------------------------------------


def _rebind(config: PublisherConfig, endpoint: str, replay: str) -> KVEventPublisher:
    """A new publisher process on the old addresses (the old port may take a moment to free)."""
    end = time.monotonic() + 5
    while True:
        try:
            return KVEventPublisher(PublisherConfig(endpoint=endpoint, replay_endpoint=replay, bind=True,
                                                    buffer_steps=config.buffer_steps))
        except zmq.ZMQError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def test_publisher_restart_is_repaired_by_snapshot() -> None:
    async def main() -> None:
        h = Harness()
        try:
            sub = h.subscribe()
            h.engine.run_batches(30)
            await h.converged(sub)
            old = h.pub
            endpoints = old.endpoints
            old.close()
            h.pub = _rebind(old.config, endpoints.endpoint, endpoints.replay_endpoint)
            h.engine = Engine(h.pub, seed=2)  # a new process: empty cache, seq from 0
            for _ in range(5):
                h.engine.run_batches(3)
                await asyncio.sleep(0.01)

            async def heartbeat() -> None:
                # The periodic load reports carry the new epoch: they reveal the restart even
                # when every batch was sent before the SUB socket reconnected.
                while True:
                    h.pub.publish_load(LoadReport("r0", time.time(), 0, 0, 0, 0, 1, 48, BS, 0.0))
                    await asyncio.sleep(0.02)

            beat = asyncio.get_running_loop().create_task(heartbeat())
            try:
                await h.converged(sub)
            finally:
                beat.cancel()
                await asyncio.gather(beat, return_exceptions=True)
            assert sub.epoch == h.pub.epoch
            assert sub.stats.resyncs.get("restart", 0) + sub.stats.resyncs.get("epoch_changed", 0) >= 1
            assert sub.stats.snapshots >= 2
        finally:
            await h.close()

    run(main())


def test_late_joining_subscriber_starts_from_a_snapshot() -> None:
    async def main() -> None:
        h = Harness(buffer_steps=4)  # replay alone could never rebuild 60 batches
        try:
            h.engine.run_batches(60)
            sub = h.subscribe()
            await h.converged(sub)
            assert sub.last_seq == 59 and sub.stats.snapshots == 1 and sub.stats.resyncs == {"startup": 1}
            h.engine.run_batches(20)
            await h.converged(sub)
        finally:
            await h.close()

    run(main())


def test_snapshots_are_consistent_with_seq_under_concurrent_publishing() -> None:
    """The engine runs on its own thread, stepping and serving snapshots between steps, while
    subscribers join at different moments; each must end exactly at the engine's state."""

    async def main() -> None:
        h = Harness(buffer_steps=8)
        stop = threading.Event()
        lock = threading.Lock()

        def engine_loop() -> None:
            while not stop.is_set():
                with lock:
                    h.engine.step()
                    h.engine.serve_snapshots()
                time.sleep(0.0005)

        thread = threading.Thread(target=engine_loop)
        thread.start()
        try:
            subs = []
            for i in range(3):
                await asyncio.sleep(0.1)
                subs.append(ReplicaEventSubscriber(sub_config(h.pub, f"s{i}"), h.index))
                subs[-1].start()
            await wait_for(lambda: all(s.stats.snapshots for s in subs), "every subscriber got a snapshot")
            await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)
        try:
            for sub in subs:
                await wait_for(lambda sub=sub: sub.in_sync and sub.last_seq == h.pub.last_seq and
                               h.index.replica_block_hashes(sub.config.replica_id) == h.engine.truth(),
                               f"{sub.config.replica_id} converged ({sub.stats})")
            h.index.check_integrity()
            # Each joined mid-stream: a snapshot, then live batches on top of it.
            assert all(s.stats.snapshots >= 1 and s.stats.batches > 0 for s in subs)
        finally:
            for sub in subs:
                await sub.stop()
            h.pub.close()

    run(main())


# --- a plain vLLM / SGLang publisher: no snapshots, older layouts -------------------------------


class FakeOldPublisher:
    """vLLM <= 0.23 / SGLang on the wire: positional array events in a [ts, events] envelope,
    replay replies without a topic frame, no snapshots (a snapshot request reads as a replay
    past the end, answered by the end marker alone). Engine ids are sha256-based, as vLLM's."""

    def __init__(self, ctx: zmq.asyncio.Context, signed: bool) -> None:
        self.pub = ctx.socket(zmq.PUB)
        self.pub.linger = 0
        self.pub.bind("tcp://127.0.0.1:0")
        self.router = ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.bind("tcp://127.0.0.1:0")
        self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.signed = signed
        self.buffer: list[tuple[int, bytes]] = []
        self.cache: dict[int, tuple[int, ...]] = {}  # engine id -> token prefix
        self.seq = 0

    def engine_id(self, prefix: tuple[int, ...]) -> int:
        return int.from_bytes(hashlib.sha256(repr(prefix).encode()).digest()[:8], "big", signed=self.signed)

    def store(self, tokens: list[int]) -> list:
        n = len(tokens) // BS
        ids = [self.engine_id(tuple(tokens[: (i + 1) * BS])) for i in range(n)]
        start = 0
        while start < n and ids[start] in self.cache:
            start += 1
        if start == n:
            return []
        for i in range(start, n):
            self.cache[ids[i]] = tuple(tokens[: (i + 1) * BS])
        parent = ids[start - 1] if start else None
        return [["BlockStored", ids[start:], parent, tokens[start * BS : n * BS], BS, None]]

    def evict(self, rng: random.Random) -> list:
        leaves = [h for h, p in self.cache.items() if not any(len(q) > len(p) and q[: len(p)] == p for q in self.cache.values())]
        victim = rng.choice(leaves)
        del self.cache[victim]
        return [["BlockRemoved", [victim]]]

    async def publish(self, events: list) -> None:
        payload = msgpack.packb([time.time(), events], use_bin_type=True)
        await self.pub.send_multipart([b"", encode_seq(self.seq), payload])
        self.buffer.append((self.seq, payload))
        self.seq += 1

    async def serve_replays(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            start_seq = int.from_bytes(start, "big")
            for seq, payload in self.buffer:
                if seq >= start_seq:
                    await self.router.send_multipart([client, b"", encode_seq(seq), payload])
            await self.router.send_multipart([client, b"", b"\xff" * 8, b""])

    def truth(self) -> set[int]:
        return {prompt_hashes(list(p), BS, MODEL)[-1] for p in self.cache.values()}

    def close(self) -> None:
        self.pub.close(linger=0)
        self.router.close(linger=0)


@pytest.mark.parametrize("signed", [False, True], ids=["vllm-uint64", "sglang-int64"])
def test_plain_publisher_without_snapshots_is_learned_from_replay(signed: bool) -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context.instance()
        fake = FakeOldPublisher(ctx, signed)
        server = asyncio.get_running_loop().create_task(fake.serve_replays())
        rng = random.Random(7)
        prefixes = [[rng.randrange(1, 9999) for _ in range(24)] for _ in range(3)]

        async def workload(k: int) -> None:
            for _ in range(k):
                if fake.cache and rng.random() < 0.3:
                    await fake.publish(fake.evict(rng))
                else:
                    p = rng.choice(prefixes)
                    events = fake.store(p[: rng.randrange(4, 24)] + [rng.randrange(1, 9999) for _ in range(rng.randrange(0, 9))])
                    if events:
                        await fake.publish(events)

        index = PrefixIndex(BS, MODEL)
        sub = ReplicaEventSubscriber(
            SubscriberConfig("old", fake.endpoint, fake.replay_endpoint, replay_timeout_s=2.0, snapshot_timeout_s=5.0), index)
        try:
            await workload(30)  # before the subscriber exists
            sub.start()
            await wait_for(lambda: sub.snapshot_supported is False and sub.in_sync, "learned from replay")
            await asyncio.sleep(0.05)  # SUB connected (else the next batches arrive by replay)
            await workload(30)
            await wait_for(lambda: sub.last_seq == fake.seq - 1 and index.replica_block_hashes("old") == fake.truth(),
                           f"index equals the fake engine's cache ({sub.stats})")
            assert sub.exact and sub.stats.snapshots == 0 and index.stats.unknown_parent == 0
            index.check_integrity()
        finally:
            await sub.stop()
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)
            fake.close()

    run(main())


# --- what foreign readers see -------------------------------------------------------------------


def test_extras_stay_out_of_a_vllm_readers_way() -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context.instance()
        h = Harness(topic=b"kv@pod-1@tiny-model")
        topic_reader = ctx.socket(zmq.SUB)  # vLLM-ecosystem reader on the KV topic (llm-d style)
        all_reader = ctx.socket(zmq.SUB)  # a reader subscribed to every topic
        try:
            for sock, prefix in ((topic_reader, b"kv@"), (all_reader, b"")):
                sock.linger = 0
                sock.connect(h.pub.endpoints.endpoint)
                sock.setsockopt(zmq.SUBSCRIBE, prefix)
            sub = h.subscribe()
            await wait_for(lambda: sub.in_sync, "startup snapshot")
            await asyncio.sleep(0.1)  # the raw readers' subscriptions reach the PUB socket
            h.engine.run_batches(2)
            h.pub.publish_load(LoadReport("r0", time.time(), 1, 0, 0, 0, 40, 48, BS, 0.1))
            h.engine.run_batches(1)
            await h.converged(sub)
            await wait_for(lambda: h.loads, "load report at the kvfleet subscriber")

            async def drain(sock) -> list[list[bytes]]:
                out = []
                while await sock.poll(200):
                    out.append(await sock.recv_multipart())
                return out

            seen_by_topic_reader = await drain(topic_reader)
            seen_by_all_reader = await drain(all_reader)
            assert len(seen_by_topic_reader) == 3 and all(len(f) == 3 for f in seen_by_topic_reader)
            assert [int.from_bytes(f[1], "big") for f in seen_by_topic_reader] == [0, 1, 2]
            extras = [f for f in seen_by_all_reader if len(f) != 3]
            assert len(seen_by_all_reader) == 4 and len(extras) == 1 and extras[0][0] == b"kvfleet.load"
        finally:
            topic_reader.close(linger=0)
            all_reader.close(linger=0)
            await h.close()

    run(main())


# --- publisher API ------------------------------------------------------------------------------


def test_publisher_api_edges() -> None:
    pub = KVEventPublisher(pub_config(topic=b"kv@pod"))
    try:
        assert not pub.endpoints.endpoint.endswith(":0") and pub.endpoints.replay_endpoint.startswith("tcp://127.0.0.1:")
        (source,) = pub.sources_info()["sources"]
        assert source["endpoint"] == pub.endpoints.endpoint and source["topic"] == "kv@pod"
        assert source["replay_endpoint"] == pub.endpoints.replay_endpoint and source["data_parallel_rank"] == 0
        assert source["format"] == "vllm-0.33" and source["snapshots"] is True
        pub.publish([])  # nothing: no seq consumed
        with pytest.raises(zmq.ZMQError):
            KVEventPublisher(pub_config(endpoint=pub.endpoints.endpoint))  # port taken
    finally:
        pub.close()
        pub.close()
    with pytest.raises(RuntimeError):
        pub.publish([AllBlocksCleared()])
    assert pub.last_seq is None
    for bad in (dict(topic=b"kv", load_topic=b"kv.load"), dict(endpoint="http://x"), dict(buffer_steps=0),
                dict(load_topic=b"x", snapshot_topic=b"x"), dict(topic="text")):
        with pytest.raises(ValueError):
            PublisherConfig(**bad)
    with pytest.raises(ValueError):
        SubscriberConfig("r", "tcp://127.0.0.1:1", snapshot_topic=b"")


# --- property: a real block pool's random life, checked after every step ------------------------


class LoopThread:
    """An asyncio loop on its own thread, so hypothesis (synchronous) can drive a subscriber."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever)
        self.thread.start()

    def call(self, fn: Callable, *args):
        async def wrapper():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(WAIT_S)

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT_S)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture(scope="module")
def live_pair():
    loop = LoopThread()
    pub = KVEventPublisher(pub_config())
    index = PrefixIndex(BS, MODEL)
    sub = ReplicaEventSubscriber(sub_config(pub, "prop"), index)
    loop.call(sub.start)
    end = time.monotonic() + WAIT_S
    while not sub.in_sync:
        if pub.snapshot_requested():
            pub.publish_snapshot([])
        assert time.monotonic() < end, "subscriber never synced"
        time.sleep(0.001)
    published = {"seq": -1}  # the last KV seq the tests published (the thread assigns it later)
    yield pub, sub, index, loop, published
    loop.run(sub.stop())
    pub.close()
    loop.close()


FAMILIES = [[(f * 1000 + i) % 700 + 1 for i in range(24)] for f in range(3)]

op_strategy = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 2), st.integers(0, 24), st.lists(st.integers(1, 700), max_size=10)),
    st.tuples(st.just("decode"), st.integers(0, 20), st.integers(1, 6)),
    st.tuples(st.just("free"), st.integers(0, 20)),
    st.tuples(st.just("reset")),
)


def _publish_and_sync(live_pair, mgr: KVCacheManager):
    """publish(events) through the live pair, and sync(): wait until the subscriber applied the
    last batch, then check the index holds exactly the manager's blocks, per medium."""
    pub, sub, index, loop, published = live_pair

    def publish(events: list) -> None:
        pub.publish(events)
        if events:
            published["seq"] += 1

    def sync() -> None:
        end = time.monotonic() + WAIT_S
        while sub.last_seq != published["seq"]:
            assert time.monotonic() < end, f"subscriber stuck ({sub.stats})"
            time.sleep(0.0005)
        view = loop.call(index.replica_block_hashes, "prop")
        assert view == set(mgr.pool.cached_blocks())
        for tier in mgr.offload.tiers if mgr.offload is not None else ():
            assert loop.call(index.replica_block_hashes, "prop", tier.medium) == {b.block_hash for b in tier.held()}
        loop.call(index.check_integrity)

    return publish, sync


def test_index_tracks_offload_tiers(live_pair) -> None:
    """A replica with host and disk KV tiers (replica/kv_offload.py): the index's "CPU" and "STORAGE"
    tables follow the tiers step by step, spills, loads and evictions included."""
    mgr = KVCacheManager(8, BS, ROOT, tiers=tier_specs(4, 4))
    publish, sync = _publish_and_sync(live_pair, mgr)
    publish([AllBlocksCleared()])
    sync()
    rng = random.Random(7)
    for n in range(60):
        tokens = FAMILIES[rng.randrange(3)][: rng.choice((8, 16, 24))] + [rng.randrange(1, 700)]
        hit = mgr.get_computed_blocks(f"t{n}", tokens)
        assert mgr.allocate_slots(f"t{n}", tokens, hit.num_tokens, len(tokens) - hit.num_tokens, hit)
        mgr.free(f"t{n}")
        mgr.take_transfers()  # no bytes here: only the bookkeeping and its events
        publish(mgr.take_events())
        sync()
    tiers = {t.medium: t.stats for t in mgr.offload.tiers}
    assert tiers["CPU"].evicted_blocks > 0 and tiers["STORAGE"].evicted_blocks > 0
    assert tiers["CPU"].loaded_blocks > 0 and tiers["STORAGE"].loaded_blocks > 0
    assert live_pair[2].stats.unknown_parent == 0


def test_dynamo_kv_credits_host_blocks_at_075_and_disk_blocks_at_025_from_real_events(live_pair) -> None:
    """A replica's host and disk tiers spill a prompt's blocks (replica/kv_offload.py), the events go
    over ZMQ to the subscriber and the index, and the router's lookups (Router.routing_request:
    match, match_offloaded, match_disk) give dynamo_kv the lower-tier hit told by tier: Dynamo's
    KvRouterConfig credits a host block 0.75 of a device one and a disk block 0.25."""
    pub, sub, index, loop, published = live_pair
    mgr = KVCacheManager(4, BS, ROOT, tiers=tier_specs(1, 4))  # 4 device blocks, 1 in host memory, 4 on disk
    publish, sync = _publish_and_sync(live_pair, mgr)
    publish([AllBlocksCleared()])
    sync()
    a = list(range(1, 13)) + [99]  # 3 full blocks and one token
    for rid, tokens in (("a", a), ("b", list(range(200, 212)) + [98])):  # b evicts all of a's device blocks
        hit = mgr.get_computed_blocks(rid, tokens)
        assert mgr.allocate_slots(rid, tokens, hit.num_tokens, len(tokens) - hit.num_tokens, hit)
        mgr.free(rid)
        mgr.take_transfers()
    events = mgr.take_events()
    assert {e.medium for e in events} == {"GPU", "CPU", "STORAGE"}  # the media on the wire
    publish(events)
    sync()
    chain = prompt_hashes(a, BS, MODEL)
    held = {t.medium: {b.block_hash for b in t.held()} for t in mgr.offload.tiers}
    tier_of_block = ["CPU" if h in held["CPU"] else "STORAGE" if h in held["STORAGE"] else None for h in chain]
    assert not set(chain) & set(mgr.pool.cached_blocks()) and tier_of_block.count(None) == 0
    n_host, n_disk = tier_of_block.count("CPU"), tier_of_block.count("STORAGE")
    assert n_host >= 1 and n_disk >= 1, tier_of_block

    def lookups():
        device = index.match(chain)
        offloaded = index.match_offloaded(chain, device)
        return device, offloaded, index.match_disk(chain, device, offloaded)

    device, offloaded, on_disk = loop.call(lookups)
    assert device == {} and offloaded == {"prop": 3} and on_disk == {"prop": n_disk}
    request = RoutingRequest(request_id="r", prompt_text="", prompt_tokens=len(a), block_hashes=tuple(chain),
                             block_size=BS, matched_blocks=device, offloaded_blocks=offloaded,
                             offloaded_disk_blocks=on_disk)
    d = make_policy("dynamo_kv").select(request, [ReplicaView("prop"), ReplicaView("cold")])
    assert d.scores["prop"]["overlap_blocks"] == pytest.approx(0.75 * n_host + 0.25 * n_disk)
    assert d.scores["prop"]["new_prefill_tokens"] == pytest.approx(len(a) - (0.75 * n_host + 0.25 * n_disk) * BS)
    assert d.scores["cold"]["overlap_blocks"] == 0.0 and d.replica_id == "prop"


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(op_strategy, min_size=1, max_size=25))
def test_index_tracks_a_real_kv_cache_manager_step_by_step(live_pair, ops) -> None:
    pub, sub, index, loop, published = live_pair
    mgr = KVCacheManager(16, BS, ROOT)
    live: dict[str, list[int]] = {}
    n = 0

    publish, sync = _publish_and_sync(live_pair, mgr)
    publish([AllBlocksCleared()])  # a fresh replica for this example
    sync()
    for op in ops:
        if op[0] == "add":
            n += 1
            rid = f"q{n}"
            tokens = FAMILIES[op[1]][: op[2]] + op[3]
            hit = mgr.get_computed_blocks(rid, tokens)
            if tokens and mgr.allocate_slots(rid, tokens, hit.num_tokens, len(tokens) - hit.num_tokens, hit):
                live[rid] = tokens
                # The balancer's chain for this prompt is the engine's chain, block for block.
                chain = prompt_hashes(tokens, BS, MODEL)
                assert mgr.block_hashes(rid)[: len(chain)] == chain
            else:
                mgr.free(rid)
        elif op[0] == "decode" and live:
            rid = sorted(live)[op[1] % len(live)]
            for _ in range(op[2]):
                live[rid].append(len(live[rid]) % 700 + 1)
                if not mgr.allocate_slots(rid, live[rid], len(live[rid]) - 1, 1):
                    del live[rid]
                    mgr.free(rid)
                    break
        elif op[0] == "free" and live:
            rid = sorted(live)[op[1] % len(live)]
            del live[rid]
            mgr.free(rid)
        elif op[0] == "reset":
            for rid in list(live):
                del live[rid]
                mgr.free(rid)
            mgr.reset_prefix_cache()
        events = mgr.take_events()
        publish(events)
        mgr.check_integrity()
        sync()
        # Every hash the engine announced is the one the balancer computes from the same tokens.
        for e in events:
            if isinstance(e, BlockStored):
                parent = ROOT if e.parent_block_hash is None else e.parent_block_hash
                assert list(e.block_hashes) == hash_blocks(e.token_ids, BS, parent)
        for rid, tokens in live.items():
            chain = prompt_hashes(tokens, BS, MODEL)
            cached = set(mgr.pool.cached_blocks())
            k = 0
            while k < len(chain) and chain[k] in cached:
                k += 1
            assert loop.call(index.match, chain).get("prop", 0) == k
    assert sub.stats.decode_errors == 0 and index.stats.unknown_parent == 0


def test_an_idle_publisher_sleeps_in_its_poll() -> None:
    """After a wake-up the thread must read the wake byte: pyzmq's Poller names a plain socket by
    its fd, and a check by object never matched, so the thread spun on the unread byte (a whole
    core per replica, for good)."""
    pub = KVEventPublisher(PublisherConfig(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0"))
    try:
        for _ in range(3):
            pub.publish_load(LoadReport("r0", time.time(), 0, 0, 0, 0, 0, 48, BS, 0.0))
        time.sleep(0.3)
        before = pub.wakeups
        time.sleep(1.0)
        # The poll times out every 200 ms: about 5 wake-ups; a spinning loop makes 10^4 or more.
        assert pub.wakeups - before < 50, pub.wakeups - before
    finally:
        pub.close()
