"""Tier-aware routing end to end: a real sim replica with a host-memory KV tier (a subprocess,
KV events and load reports over ZMQ) behind the real balancer. A prompt the device pool evicted
into the host tier shows up in the balancer's index as a lower-tier hit, `predictive` prices it
by the load time it learns from the replica's step reports, and the replica loads it back."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from balancer import serving
from balancer.app import BALANCER, create_app
from balancer.config import BalancerConfig, HealthConfig, ReplicaSpec
from balancer.step_learner import LOAD_PRIOR
from harness import procs
from tests.test_booking import settle

MODEL = "tiers-model"


async def scenario(url: str) -> dict:
    cfg = BalancerConfig(port=0, replicas=(ReplicaSpec.parse(url),), model=MODEL, policy="predictive",
                         health=HealthConfig(interval_s=0.2, timeout_s=0.5))
    app = create_app(cfg)
    listening = await serving.start(app, "127.0.0.1", 0)
    b = app[BALANCER]
    rng = random.Random(5)
    a, other = ([rng.randrange(256) for _ in range(512)] for _ in range(2))  # 32 blocks each
    out: dict = {}
    try:
        async with aiohttp.ClientSession() as s:
            await settle(b, 0.0)

            async def complete(prompt):
                async with s.post(listening.url + "/v1/completions",
                                  json={"model": MODEL, "prompt": prompt, "max_tokens": 2, "ignore_eos": True}) as r:
                    body = await r.json()
                    assert r.status == 200, body
                await settle(b, asyncio.get_running_loop().time())
                return body

            await complete(a)
            await complete(other)  # pushes most of a out of the 40-block device pool, into host memory
            async with s.post(listening.url + "/admin/explain", json={"model": MODEL, "prompt": a}) as r:
                out["explain"] = await r.json()
            out["body"] = await complete(a)
            out["load_cost"] = b.policy.learner.load_cost(next(iter(b.registry)).replica_id)
            out["cpu_blocks"] = b.index.num_entries("CPU")
    finally:
        await listening.close()
    return out


@pytest.mark.slow
def test_a_host_tier_hit_reaches_the_policy_and_is_loaded_back():
    rep = procs.start(["replica", "--engine", "sim", "--preset", "llama3-8b-h100", "--port", "0",
                       "--served-model-name", MODEL, "--num-blocks", "40", "--kv-offload-host-blocks", "200",
                       "--time-scale", "50", "--kv-events-endpoint", "tcp://127.0.0.1:0",
                       "--kv-events-replay-endpoint", "tcp://127.0.0.1:0"])
    try:
        got = asyncio.run(scenario(rep.replica_arg))
    finally:
        rep.stop()
    ex = got["explain"]
    (rid,) = ex["matched_blocks"].keys() | ex["offloaded_blocks"].keys()
    device, lower = ex["matched_blocks"].get(rid, 0), ex["offloaded_blocks"][rid]
    assert lower > 0 and device + lower == 32
    assert ex["scores"][rid]["loaded_tokens"] == min(lower * 16, 511 - device * 16)
    assert "lower KV tier" in ex["reason"]
    assert got["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 31 * 16  # loaded, not recomputed
    assert got["cpu_blocks"] > 0
    assert got["load_cost"] != LOAD_PRIOR  # learned from the replica's step reports
