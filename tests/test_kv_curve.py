"""CURVE on the KV-event sockets: a subscriber that knows the replica's public key takes events
from that replica only. A rogue publisher - plain, or CURVE with another key - that the
subscriber reaches instead (e.g. it bound the replica's port) never gets an event into the
index; without CURVE the same rogue does (the threat is real)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import zmq
import zmq.asyncio

from balancer.kv_subscriber import ReplicaEventSubscriber, SubscriberConfig
from balancer.prefix_index import PrefixIndex
from protocol import curve
from protocol.events import BlockStored, EventBatch, encode_batch, encode_seq
from protocol.hashing import hash_blocks, root_hash
from replica.publisher import KVEventPublisher, PublisherConfig

BS = 4
MODEL = "tiny-model"
ROOT = root_hash(MODEL)


def stored(tokens: list[int]) -> BlockStored:
    hashes = hash_blocks(tokens, BS, ROOT)
    return BlockStored(block_hashes=tuple(hashes), parent_block_hash=None, token_ids=tuple(tokens), block_size=BS)


async def wait_until(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        await asyncio.sleep(0.01)
    return cond()


class RoguePublisher:
    """A PUB socket on its own, publishing well-formed BlockStored batches (seq 0, 1, ...)."""

    def __init__(self, ctx: zmq.Context, secret: bytes | None = None) -> None:
        self.sock = ctx.socket(zmq.PUB)
        self.sock.linger = 0
        if secret is not None:
            curve.make_server(self.sock, secret)
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.seq = 0

    def send(self, tokens: list[int]) -> None:
        payload = encode_batch(EventBatch(time.time(), (stored(tokens),), 0))
        self.sock.send_multipart([b"", encode_seq(self.seq), payload])
        self.seq += 1

    def close(self) -> None:
        self.sock.close(linger=0)


async def flood(rogue: RoguePublisher, seconds: float) -> None:
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        rogue.send([i % 251, 1, 2, 3, 4, 5, 6, 7])
        i += 1
        await asyncio.sleep(0.01)


def keypair_files(tmp_path, name: str) -> tuple[str, str]:
    return curve.write_keypair(str(tmp_path), name)


def test_key_files_round_trip(tmp_path):
    public_file, secret_file = keypair_files(tmp_path, "replica")
    public, secret = curve.load_secret_key(secret_file)
    assert curve.load_public_key(public_file) == public == zmq.curve_public(secret)
    assert curve.load_public_key(public.decode()) == public  # a bare Z85 key is itself
    assert oct(os.stat(secret_file).st_mode & 0o777) == "0o600"
    with pytest.raises(ValueError, match="no secret key"):
        curve.load_secret_key(public_file)
    with pytest.raises(ValueError):
        curve.load_public_key(str(tmp_path / "missing.key"))
    with pytest.raises(ValueError, match="exists"):
        keypair_files(tmp_path, "replica")  # never overwrites a key


@pytest.mark.parametrize("rogue_kind", ["plain", "other_curve_key"])
def test_rogue_publisher_never_reaches_the_index(rogue_kind):
    server_public, _ = zmq.curve_keypair()  # the genuine replica's key, which the rogue lacks
    rogue_secret = None if rogue_kind == "plain" else zmq.curve_keypair()[1]

    async def main():
        ctx = zmq.Context()
        actx = zmq.asyncio.Context()
        rogue = RoguePublisher(ctx, rogue_secret)
        index = PrefixIndex(BS, MODEL)
        keys = curve.client_keys(server_public.decode(), zmq.curve_keypair())
        sub = ReplicaEventSubscriber(SubscriberConfig("r0", rogue.endpoint, curve=keys), index, context=actx)
        # The control: a subscriber that trusts the rogue (no CURVE, or the rogue's own key).
        naive_index = PrefixIndex(BS, MODEL)
        trusting = None if rogue_secret is None else curve.client_keys(zmq.curve_public(rogue_secret).decode(),
                                                                       zmq.curve_keypair())
        naive = ReplicaEventSubscriber(SubscriberConfig("r0", rogue.endpoint, curve=trusting), naive_index,
                                       context=actx)
        sub.start()
        naive.start()
        try:
            await flood(rogue, 1.5)
            assert await wait_until(lambda: naive_index.num_blocks("r0") > 0)  # the threat is real
            assert index.num_blocks("r0") == 0 and sub.stats.batches == 0 and sub.stats.load_reports == 0
        finally:
            await sub.stop()
            await naive.stop()
            rogue.close()
            ctx.term()
            actx.term()

    asyncio.run(main())


def test_genuine_curve_publisher_is_heard_and_only_authorized_clients_when_configured(tmp_path):
    _, secret_file = keypair_files(tmp_path, "replica")
    server_public, server_secret = curve.load_secret_key(secret_file)
    allowed_dir = tmp_path / "allowed"
    allowed_dir.mkdir()
    curve.write_keypair(str(allowed_dir), "balancer")
    balancer_pair = curve.load_secret_key(str(allowed_dir / "balancer.key_secret"))

    async def main():
        ctx = zmq.Context()
        actx = zmq.asyncio.Context()
        pub = KVEventPublisher(PublisherConfig(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0",
                                               bind=True, curve_secret_key=server_secret,
                                               curve_authorized_clients=str(allowed_dir)), context=ctx)
        subs = {}
        indexes = {}
        try:
            for name, pair in (("allowed", balancer_pair), ("stranger", zmq.curve_keypair())):
                indexes[name] = PrefixIndex(BS, MODEL)
                cfg = SubscriberConfig("r0", pub.endpoints.endpoint, replay_endpoint=pub.endpoints.replay_endpoint,
                                       snapshot_timeout_s=1.0, curve=curve.client_keys(server_public.decode(), pair))
                subs[name] = ReplicaEventSubscriber(cfg, indexes[name], context=actx)
                subs[name].start()
            end = time.monotonic() + 10
            i = 0
            while indexes["allowed"].num_blocks("r0") == 0 and time.monotonic() < end:
                pub.publish([stored([i % 251, 9, 9, 9])])
                if pub.snapshot_requested():
                    pub.publish_snapshot([])
                i += 1
                await asyncio.sleep(0.02)
            assert indexes["allowed"].num_blocks("r0") > 0
            await asyncio.sleep(0.3)
            assert indexes["stranger"].num_blocks("r0") == 0 and subs["stranger"].stats.batches == 0
        finally:
            for s in subs.values():
                await s.stop()
            pub.close()
            ctx.term()
            actx.term()

    asyncio.run(main())


@pytest.mark.slow
def test_cli_replica_and_balancer_with_curve(tmp_path):
    """`kvfleet replica --kv-events-curve-secret-key-file` + `kvfleet balancer
    --kv-events-curve-server-key`: the index fills; a balancer given another key serves
    requests all the same but never takes an event from the replica."""
    import json
    import urllib.parse
    import urllib.request

    from harness import procs

    public_file, secret_file = keypair_files(tmp_path, "replica")
    other_public, _ = keypair_files(tmp_path, "other")
    rep = procs.start(["replica", "--port", "0", "--engine", "sim", "--model", "tiny", "--num-blocks", "512",
                       "--time-scale", "20", "--kv-events-endpoint", "tcp://127.0.0.1:0",
                       "--kv-events-replay-endpoint", "tcp://127.0.0.1:0",
                       "--kv-events-curve-secret-key-file", secret_file])
    started = [rep]
    try:
        for key in (public_file, other_public):
            started.append(procs.start(["balancer", "--port", "0", "--model", "tiny", "--replica", rep.replica_arg,
                                        "--kv-events-curve-server-key", key]))
        good, bad = started[1], started[2]
        body = json.dumps({"model": "tiny", "prompt": "x" * 200, "max_tokens": 2}).encode()
        for bal in (good, bad):
            req = urllib.request.Request(bal.url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.status == 200

        def index(bal):
            q = urllib.parse.quote(rep.url, safe="")
            with urllib.request.urlopen(f"{bal.url}/admin/index?replica={q}", timeout=10) as r:
                return json.loads(r.read())

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (index(good)["events_in_sync"] and index(good)["num_blocks"]):
            time.sleep(0.1)
        assert index(good)["events_in_sync"] and index(good)["num_blocks"] >= 200 // 16
        state = index(bad)
        assert state["num_blocks"] == 0 and not state["events_in_sync"], state
    finally:
        for p in reversed(started):
            p.stop()
