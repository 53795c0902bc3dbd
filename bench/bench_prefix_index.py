"""PrefixIndex benchmark (issue: KV-cache events over ZeroMQ).

Targets: ingest >= 500k block events/s on one core; lookup p50 <= 100 us for an 8k-token prompt
across 16 replicas with 1M indexed blocks (hashing excluded); <= 200 bytes per indexed block.

1. Ingest: BlockStored/BlockRemoved events applied to the index, in block events per second,
   for events of 1 block (decode-time stores) and 32 blocks (prefill chunks), with engine ids
   that differ from ours (vLLM) or equal them (kvfleet); plus the subscriber's whole path per
   batch (msgpack decode + apply).
2. Lookup: `match` of 8k- and 32k-token prompts (512 / 2048 blocks of 16) against an index of
   16 replicas holding 1M blocks in all; every probe is cached whole on 2 replicas and half on
   2 more, so the walk covers the whole chain (the worst case: it stops only when no replica is
   left). "warm": the same prompt again and again; "cold": 100 (8k) or 24 (32k) prompts in
   turn, far more than the CPU caches hold. With hashing = `prompt_hashes(tokens)` + `match`.
3. Memory: tracemalloc growth while building the 1M-block index, per held (replica, block).

    .venv/bin/python bench/bench_prefix_index.py [--blocks 1000000] [--replicas 16] [--dict-tables] [--out results/bench_prefix_index.json]

`--dict-tables`: the index keeps its tables in dicts even where balancer._blocktable is built
(the fallback path), to compare with the C tables in back-to-back runs. The table says which
paths ran.

Torch-free: it imports only the balancer and protocol packages.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import balancer.prefix_index as prefix_index  # noqa: E402
from balancer.prefix_index import PrefixIndex  # noqa: E402
from protocol.hashing import NATIVE as NATIVE_HASH  # noqa: E402
from protocol.hashing import hash_blocks  # noqa: E402
from bench.common import table  # noqa: E402
from protocol.events import BlockRemoved, BlockStored, EventBatch, decode_batch, encode_batch  # noqa: E402
from protocol.hashing import prompt_hashes, root_hash  # noqa: E402

BS = 16
MODEL = "bench-model"
ROOT = root_hash(MODEL)


from bench.common import machine  # noqa: E402


def engine_ids(ours: list[int], kvfleet: bool, rng: random.Random) -> list[int]:
    return list(ours) if kvfleet else [rng.getrandbits(64) for _ in ours]


def make_chain_events(rng: random.Random, n_blocks: int, per_event: int, kvfleet: bool,
                      parent_our: int = ROOT, parent_eng: int | None = None) -> tuple[list[BlockStored], list[int], list[int]]:
    """One chain of n_blocks fresh blocks, as BlockStored events of per_event blocks each."""
    tokens = [rng.randrange(1, 150_000) for _ in range(n_blocks * BS)]
    ours = hash_blocks(tokens, BS, parent_our)
    eng = engine_ids(ours, kvfleet, rng)
    events = []
    parent = parent_eng
    for i in range(0, n_blocks, per_event):
        j = min(i + per_event, n_blocks)
        events.append(BlockStored(tuple(eng[i:j]), parent, tuple(tokens[i * BS : j * BS]), BS))
        parent = eng[j - 1]
    return events, eng, tokens


def bench_ingest(per_event: int, kvfleet: bool, total_blocks: int = 400_000) -> tuple[float, float]:
    """(store block events/s, remove block events/s)."""
    rng = random.Random(per_event * 2 + kvfleet)
    chains = []
    n_chain = 256
    for _ in range(total_blocks // n_chain):
        events, eng, _ = make_chain_events(rng, n_chain, per_event, kvfleet)
        chains.append((events, eng))
    index = PrefixIndex(BS, MODEL)
    replicas = [f"r{i}" for i in range(16)]
    work = [(replicas[k % 16], ev) for k, (events, _) in enumerate(chains) for ev in events]
    removals = [(replicas[k % 16], BlockRemoved(tuple(eng[i : i + per_event])))
                for k, (_, eng) in enumerate(chains) for i in range(0, n_chain, per_event)]
    gc.collect()
    apply = index.apply
    t0 = time.perf_counter()
    for rid, ev in work:
        apply(rid, ev)
    t1 = time.perf_counter()
    for rid, ev in removals:
        apply(rid, ev)
    t2 = time.perf_counter()
    n = len(chains) * n_chain
    assert index.stats.blocks_stored == n and index.stats.blocks_removed == n, index.stats
    return n / (t1 - t0), n / (t2 - t1)


def bench_wire_ingest(per_event: int, events_per_batch: int = 8, total_blocks: int = 200_000) -> float:
    """Block events/s through decode_batch + apply (what the subscriber does per message)."""
    rng = random.Random(5)
    payloads = []
    n = 0
    while n < total_blocks:
        events, _, _ = make_chain_events(rng, per_event * events_per_batch, per_event, kvfleet=False)
        payloads.append(encode_batch(EventBatch(time.time(), tuple(events), 0)))
        n += per_event * events_per_batch
    index = PrefixIndex(BS, MODEL)
    apply = index.apply
    gc.collect()
    t0 = time.perf_counter()
    for k, payload in enumerate(payloads):
        rid = f"r{k % 16}"
        for ev in decode_batch(payload).events:
            apply(rid, ev)
    return n / (time.perf_counter() - t0)


PROBES = {8192: 100, 32768: 24}  # prompt length in tokens -> number of distinct probe prompts


def probe_events(rng: random.Random, n_tokens: int, count: int, rids: list[str], kvfleet: bool):
    """Probe prompts, each held whole by 2 replicas and its first half by 2 others, so that a
    lookup walks the whole chain. Returns (prompts, [(replica, event)])."""
    prompts, plan = [], []
    for k in range(count):
        tokens = [rng.randrange(1, 150_000) for _ in range(n_tokens)]
        ours = hash_blocks(tokens, BS, ROOT)
        n = len(ours)
        for j in range(4):
            rid = rids[(k * 4 + j) % len(rids)]
            m = n if j < 2 else n // 2
            eng = engine_ids(ours[:m], kvfleet, rng)
            plan.append((rid, BlockStored(tuple(eng), None, tuple(tokens[: m * BS]), BS)))
        prompts.append(tokens)
    return prompts, plan


def build_fleet(total_blocks: int, replicas: int, kvfleet: bool, measure_memory: bool):
    """An index where `replicas` replicas hold `total_blocks` blocks in all: the probe prompts,
    40 system prompts of 32 blocks held by every replica, and per-replica chains of 128 blocks.
    Returns (index, probes by length, blocks held, bytes per held block or None)."""
    rng = random.Random(11)
    index = PrefixIndex(BS, MODEL)
    rids = [f"replica-{i}" for i in range(replicas)]
    # Build every event first so that only the index's own allocations are measured.
    plan = []
    probes = {}
    for n_tokens, count in PROBES.items():
        probes[n_tokens], events = probe_events(rng, n_tokens, count, rids, kvfleet)
        plan.extend(events)
    shared = [make_chain_events(rng, 32, 32, kvfleet) for _ in range(40)]
    for rid in rids:
        for events, _, _ in shared:
            plan.extend((rid, ev) for ev in events)
    held = sum(len(ev.block_hashes) for _, ev in plan)
    chains_per_replica = max(0, total_blocks - held) // (128 * replicas)
    chains = [[(rid, ev) for ev in make_chain_events(rng, 128, 32, kvfleet)[0]]
              for rid in rids for _ in range(chains_per_replica)]
    rng.shuffle(chains)  # the replicas' streams interleave on a real balancer (chains stay in order)
    for chain in chains:
        plan.extend(chain)
    del chains
    held = sum(len(ev.block_hashes) for _, ev in plan)
    gc.collect()
    # The engine ids are allocated with the events, outside the traced window: the index keeps
    # those it maps (vLLM ids), so their size is added below; kvfleet ids share our int object.
    if measure_memory:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    for rid, ev in plan:
        index.apply(rid, ev)
    del plan
    gc.collect()
    per_block = None
    if measure_memory:
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        kept_ids = sum(sys.getsizeof(eh) for r in index._replicas.values() for m in r.media.values()
                       for eh, oh in m.emap.items() if eh is not oh)
        per_block = (after - before + kept_ids) / held
    assert index.stats.unknown_parent == 0
    return index, probes, held, per_block


def bench_lookup(index: PrefixIndex, probes: list[list[int]], rounds: int, with_hashing: bool,
                 warm: bool) -> tuple[float, float]:
    """p50/p99 in us. warm: one prompt looked up again and again (its blocks stay in the CPU
    caches); cold: every prompt in turn (the working set is far larger than the caches)."""
    order = [probes[0]] * (rounds * 10) if warm else probes * rounds
    chains = {id(t): prompt_hashes(t, BS, MODEL) for t in probes}
    samples = []
    match = index.match
    for tokens in order:
        chain = chains[id(tokens)]
        t0 = time.perf_counter()
        if with_hashing:
            chain = prompt_hashes(tokens, BS, MODEL)
        result = match(chain)
        samples.append(time.perf_counter() - t0)
        assert sorted(result.values()) == [len(chain) // 2] * 2 + [len(chain)] * 2, result
    samples.sort()
    return statistics.median(samples) * 1e6, samples[int(0.99 * (len(samples) - 1))] * 1e6


def add_host_tier(index: PrefixIndex, probes: dict[int, list[list[int]]], rids: list[str]) -> None:
    """The replicas holding each probe's first half also hold its second half in host memory
    (medium CPU, as vLLM's OffloadingConnector publishes it): a lower-tier hit to walk."""
    for n_tokens, count in PROBES.items():
        for k, tokens in enumerate(probes[n_tokens]):
            ours = hash_blocks(tokens, BS, ROOT)
            half = len(ours) // 2
            for j in (2, 3):
                rid = rids[(k * 4 + j) % len(rids)]
                index.apply(rid, BlockStored(tuple(ours[half:]), ours[half - 1], tuple(tokens[half * BS : len(ours) * BS]),
                                             BS, medium="CPU"))


def bench_tiered_lookup(index: PrefixIndex, probes: list[list[int]], rounds: int) -> tuple[float, float]:
    """p50/p99 in us of what the router does per request: match, then match_offloaded (cold caches)."""
    chains = [prompt_hashes(t, BS, MODEL) for t in probes]
    samples = []
    match, offloaded = index.match, index.match_offloaded
    for chain in chains * rounds:
        t0 = time.perf_counter()
        device = match(chain)
        lower = offloaded(chain, device)
        samples.append(time.perf_counter() - t0)
        assert len(device) == 4 and sum(lower.values()) in (0, 2 * (len(chain) - len(chain) // 2)), lower
    samples.sort()
    return statistics.median(samples) * 1e6, samples[int(0.99 * (len(samples) - 1))] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--dict-tables", action="store_true", help="dict tables even where the C table is built")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.dict_tables:
        prefix_index._BlockTable = None  # read by PrefixIndex() at construction

    info = machine()
    print("\n## PrefixIndex benchmark\n")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    rows: list[list] = []
    native_table = PrefixIndex(BS, MODEL).native_tables and args.replicas <= 64
    rows.append(["native paths (C hash chain / C block table)",
                 f"hash chain {'C' if NATIVE_HASH else 'Python'}, table {'C BlockTable' if native_table else 'dict'}"])

    for per_event in (1, 32):
        for kvfleet in (False, True):
            store, remove = bench_ingest(per_event, kvfleet)
            ids = "kvfleet (engine = ours)" if kvfleet else "vLLM (engine != ours)"
            rows.append([f"ingest BlockStored, {per_event} blk/event, {ids}", f"{store / 1e3:,.0f}k block events/s"])
            rows.append([f"ingest BlockRemoved, {per_event} blk/event, {ids}", f"{remove / 1e3:,.0f}k block events/s"])
    for per_event in (1, 32):
        rate = bench_wire_ingest(per_event)
        rows.append([f"decode_batch + apply, {per_event} blk/event, 8 events/batch", f"{rate / 1e3:,.0f}k block events/s"])

    for kvfleet in (False, True):
        index, probes, held, per_block = build_fleet(args.blocks, args.replicas, kvfleet, measure_memory=True)
        label = "kvfleet ids" if kvfleet else "vLLM ids"
        rows.append([f"memory per held block, {label} ({held:,} held, {index.num_entries():,} distinct, "
                     f"{args.replicas} replicas)", f"{per_block:.0f} B"])
        if kvfleet:
            continue
        for n_tokens in PROBES:  # the router's per-request lookup, no replica offloading: one walk
            p50, p99 = bench_tiered_lookup(index, probes[n_tokens], args.rounds)
            rows.append([f"lookup {n_tokens // 1024}k tokens, match + match_offloaded, no lower tier, cold caches",
                         f"p50 {p50:,.0f} us, p99 {p99:,.0f} us"])
        for n_tokens in PROBES:
            for warm in (True, False):
                for with_hashing in (False, True):
                    p50, p99 = bench_lookup(index, probes[n_tokens], args.rounds, with_hashing, warm)
                    what = "hash + match" if with_hashing else "match only"
                    rows.append([f"lookup {n_tokens // 1024}k tokens ({n_tokens // BS} blocks), {what}, "
                                 f"{'warm' if warm else 'cold'} caches", f"p50 {p50:,.0f} us, p99 {p99:,.0f} us"])
        add_host_tier(index, probes, [f"replica-{i}" for i in range(args.replicas)])
        for n_tokens in PROBES:  # with a host tier: the any-medium table is walked as well
            p50, p99 = bench_tiered_lookup(index, probes[n_tokens], args.rounds)
            rows.append([f"lookup {n_tokens // 1024}k tokens, match + match_offloaded, half of it in a host tier, "
                         f"cold caches", f"p50 {p50:,.0f} us, p99 {p99:,.0f} us"])
        del index, probes
        gc.collect()

    print()
    print(table(["measure", "result"], rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
