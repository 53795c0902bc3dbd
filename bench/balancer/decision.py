"""Part `routing`, in process: one routing decision for 8k-token prompts - Router.prepare (tokenize +
hash) + routing_request (exact and approximate index look-up) + decide (registry.usable + policy
over 16 replicas) - against a PrefixIndex of 16 replicas holding ~1M blocks (--blocks); each probe
is cached fully on 3 replicas and half on 3 more, so the look-up walks the whole chain."""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import random
import time

from bench.balancer import rig
from bench.balancer.goals import GOAL_DECISION_US
from bench.balancer.loadclient import pct
from bench.balancer.rig import MODEL
from bench.common import report

POLICIES = ("precise_prefix", "dynamo_kv", "llmd_scorer", "sglang_cache_aware", "predictive")
HEADERS = ["policy", "prompt tokens", "prepare p50", "lookup p50", "decide p50", "total p50", "total p99",
           "routed p50", "fully cached pick", f"<= {GOAL_DECISION_US} us"]


@contextlib.contextmanager
def _realtime(enabled: bool):
    """SCHED_RR priority 1 inside the block (when enabled), SCHED_OTHER after."""
    if enabled:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
    try:
        yield
    finally:
        if enabled:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def rows(policies: list[str], total_blocks: int, replicas: int, probes_n: int, rounds: int,
                  realtime: bool = False) -> list[list]:
    """p50/p99 of prepare + routing_request + decide for 8k-token prompts (see module docstring).
    With realtime, only the timed loops (about a second per policy) run as SCHED_RR."""
    import numpy as np

    from balancer.approx_index import ApproxIndex
    from balancer.config import BalancerConfig, ReplicaSpec
    from balancer.policies import make_policy
    from balancer.policies.base import ReplicaLoad
    from balancer.prefix_index import PrefixIndex
    from balancer.registry import Registry
    from balancer.router import Router
    from predictors.adapter import balancer_predictor
    from protocol.events import BlockStored
    from protocol.hashing import hash_blocks
    from protocol.openai_api import GenerationRequest
    from protocol.tokenizer import load_tokenizer

    cfg = BalancerConfig(model=MODEL)
    bs = cfg.block_size
    tokenizer = load_tokenizer(cfg.tokenizer)
    index = PrefixIndex(bs, MODEL)
    registry = Registry(cfg.breaker, cfg.health, time.monotonic)
    rids = []
    rng = random.Random(7)
    for i in range(replicas):
        spec = ReplicaSpec(url=f"http://127.0.0.1:{9100 + i}")  # never contacted
        registry.add(spec)
        rids.append(spec.replica_id)
        registry.on_load(spec.replica_id, ReplicaLoad(num_running=rng.randrange(8), num_waiting=rng.randrange(4),
                                                      queued_prefill_tokens=rng.randrange(20_000),
                                                      running_decode_tokens=rng.randrange(100_000),
                                                      free_blocks=rng.randrange(10_000), total_blocks=10_000,
                                                      kv_usage=rng.random(), age_s=0.0))

    # Fill: 40 system prompts of 32 blocks held by every replica, the rest per-replica chains of
    # 128 blocks stored as 32-block events (kvfleet replicas: engine hash == our hash).
    t0 = time.perf_counter()
    nrng = np.random.default_rng(3)

    def chain_events(n_blocks: int) -> list[BlockStored]:
        tokens = nrng.integers(1, 150_000, n_blocks * bs).tolist()
        ours = hash_blocks(tokens, bs, index.root)
        evs, parent = [], None
        for i in range(0, n_blocks, 32):
            j = min(i + 32, n_blocks)
            evs.append(BlockStored(tuple(ours[i:j]), parent, tuple(tokens[i * bs : j * bs]), bs))
            parent = ours[j - 1]
        return evs

    shared = [chain_events(32) for _ in range(40)]
    per_replica = (total_blocks - 40 * 32 * replicas) // replicas // 128
    for rid in rids:
        for evs in shared:
            for ev in evs:
                index.apply(rid, ev)
        for _ in range(per_replica):
            for ev in chain_events(128):
                index.apply(rid, ev)
    texts = [rig.text(8191, 100 + k) for k in range(probes_n)]
    for k, text in enumerate(texts):  # each probe: fully on 3 replicas, its first half on 3 more
        tokens = tokenizer.encode(text)
        ours = hash_blocks(tokens, bs, index.root)
        n = len(ours)
        for j in range(6):
            m = n if j < 3 else n // 2
            index.apply(rids[(k * 6 + j) % replicas], BlockStored(tuple(ours[:m]), None, tuple(tokens[: m * bs]), bs))
    held = sum(index.num_blocks(r) for r in rids)
    build_s = time.perf_counter() - t0
    print(f"routing: index of {held:,} held blocks ({index.num_entries():,} distinct) built in {build_s:.1f} s",
          flush=True)

    requests = [GenerationRequest(kind="completion", model=MODEL, prompt=t, max_tokens=128) for t in texts]
    rows = []
    for name in policies:
        policy = make_policy(name)
        approx = ApproxIndex(capacity_per_replica=cfg.approx_capacity_blocks, ttl_s=cfg.approx_ttl_s)
        # As the balancer runs it: its default output-length predictor (the router keeps it only
        # for a policy that reads predictions).
        predictor = balancer_predictor(cfg.predictor, MODEL)
        router = Router(MODEL, bs, tokenizer, index, approx, policy, registry, has_events=lambda rid: True,
                        predictor=predictor)
        for k, req in enumerate(requests):  # warm-up; text-tree policies learn the probes here
            p = router.prepare(req)
            rr = router.routing_request(p, f"warm-{k}")
            router.book(p, rr, router.decide(rr, registry.usable())).finish(16)
        samples: dict[str, list[float]] = {"prepare": [], "lookup": [], "decide": [], "total": [], "routed": []}
        hits = 0
        gc.collect()
        with _realtime(realtime):
            for r, (k, req) in itertools.product(range(rounds), enumerate(requests)):
                t0 = time.perf_counter()
                p = router.prepare(req)
                t1 = time.perf_counter()
                rr = router.routing_request(p, f"r{r}-{k}")
                t2 = time.perf_counter()
                d = router.decide(rr, registry.usable())
                t3 = time.perf_counter()
                router.book(p, rr, d).finish(16)
                t4 = time.perf_counter()
                samples["prepare"].append(t1 - t0)
                samples["lookup"].append(t2 - t1)
                samples["decide"].append(t3 - t2)
                samples["total"].append(t3 - t0)
                samples["routed"].append(t4 - t3)
                hits += rr.matched_blocks.get(d.replica_id, 0) == len(p.block_hashes)
        for v in samples.values():
            v.sort()
        us = {k: (pct(v, 0.5) * 1e6, pct(v, 0.99) * 1e6) for k, v in samples.items()}
        rows.append([name, len(requests[0].prompt) + 1, round(us["prepare"][0], 1), round(us["lookup"][0], 1),
                     round(us["decide"][0], 1), round(us["total"][0], 1), round(us["total"][1], 1),
                     round(us["routed"][0], 1), f"{hits}/{len(samples['total'])}",
                     "yes" if us["total"][0] <= GOAL_DECISION_US else "NO"])
    return rows


def print_report(args, rows: list[list], stem: str, extra: dict, sched: str) -> None:
    report(f"Routing decision for an 8k-token prompt, 16 replicas, ~{args.blocks / 1e6:.1f}M indexed blocks "
           f"(us; total = prepare + lookup + decide; routed = booking the decision and finishing it, after, not in total){sched}",
           HEADERS, rows, out=f"{stem}_routing.json", extra=extra)
